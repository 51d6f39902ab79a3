/** A live NVMe controller migrated to a second server on the same image: queues, doorbells, features and AERs carry on. */
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { migrate, MigrationState } from '../ts/index.js';
import createDevice from '../examples/nvme/index.js';
import { Csts, Register, type NvmeController } from '../examples/nvme/controller.js';
import { serve, tempSocketPath, until, type Served } from './helpers.js';
import { MEMORY_BASE, NvmeHost, PAGE } from './nvme-host.js';

const servers: Served<NvmeController>[] = [];
let host: NvmeHost | undefined;
const dir = tempSocketPath();
afterEach(async () => {
  host?.close();
  host = undefined;
  for (const s of servers.splice(0)) {
    await s.close();
    s.device.close();
  }
});

async function serveImage(doorbells: string): Promise<Served<NvmeController>> {
  const s = await serve(createDevice(['--image', join(dir.path, '..', `migrate-${doorbells}.img`), '--size', '16M', '--doorbells', doorbells]));
  servers.push(s);
  return s;
}

describe.each(['mmap', 'mmap+shadow', 'trap', 'trap+shadow', 'ioeventfd'])('with %s doorbells', (setup) => {
  test('I/O continues on the destination, with a command rung while the source was stopped', async () => {
    const [doorbells, shadow] = setup.split('+');
    const source = await serveImage(doorbells);
    const h = (host = await NvmeHost.attach(await source.client()));
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    if (shadow || doorbells === 'ioeventfd') expect((await h.shadowDoorbells()).status).toBe(0);
    expect((await h.admin({ opcode: 0x09, cdw10: 0x08, cdw11: 0x0a05 })).status).toBe(0); // interrupt coalescing
    expect((await h.createIoQueuePair(1, 16)).map((c) => c.status)).toEqual([0, 0]);
    const before = h.alloc(PAGE);
    h.write(before, Buffer.alloc(PAGE, 0x5a));
    expect((await h.submit(1, { opcode: 0x01, nsid: 1, prp1: before, cdw10: 64, cdw12: 7 })).status).toBe(0);
    const event = h.admin({ opcode: 0x0c }); // outstanding across the migration

    // Stopped: a write rung now is held, not run.
    const sourceClient = h.client;
    await sourceClient.migration.setState(MigrationState.STOP);
    const data = h.alloc(PAGE);
    h.write(data, Buffer.alloc(PAGE, 0xa7));
    const held = h.submit(1, { opcode: 0x01, nsid: 1, prp1: data, cdw10: 128, cdw12: 7 });
    await new Promise((r) => setTimeout(r, 20));
    expect(source.device.sqs[1]!.head).toBe(1);

    const destination = await serveImage(doorbells);
    const target = await destination.client();
    await target.dmaMap({ iova: MEMORY_BASE, memory: h.memory }); // a VMM maps guest memory before the device runs
    await migrate(sourceClient, target);
    // A mapped CQ head is read only when needed, yet the saved state has the host's last one. (With
    // shadow doorbells elsewhere the host rings a head only when EventIdx asks: an older one is fine.)
    if (doorbells === 'mmap') expect(destination.device.cqs[1]!.head).toBe(h.queues.get(1)!.cqHead);
    await h.moveTo(target);
    expect((await held).status).toBe(0);
    expect(destination.device.features.values.get(0x08)).toBe(0x0a05);
    expect(destination.device.shadow?.shadow).toBe(source.device.shadow?.shadow);
    expect(await h.reg32(Register.CSTS)).toBe(Csts.RDY);

    // Reads see both writes; new I/O and the outstanding AER complete on the destination.
    const back = h.alloc(PAGE * 2);
    const prps = h.prps([back, back + BigInt(PAGE)]);
    expect((await h.submit(1, { opcode: 0x02, nsid: 1, ...prps, cdw10: 64, cdw12: 15 })).status).toBe(0);
    expect(h.read(back, PAGE)).toEqual(Buffer.alloc(PAGE, 0x5a));
    expect((await h.submit(1, { opcode: 0x02, nsid: 1, prp1: back, cdw10: 128, cdw12: 7 })).status).toBe(0);
    expect(h.read(back, PAGE)).toEqual(Buffer.alloc(PAGE, 0xa7));
    h.ring(2, 99); // an SQ tail past the ring
    const e = await event;
    expect([e.status, (e.dw0 >> 8) & 0xff]).toEqual([0, 1]);
    h.ring(2, h.queues.get(1)!.sqTail);
    expect((await h.submit(1, { opcode: 0x00, nsid: 1 })).status).toBe(0);
  });

  test('an interrupt that coalescing holds is signalled when the source stops, not left to a timer of a stopped device', async () => {
    const [doorbells, shadow] = setup.split('+');
    const source = await serveImage(doorbells);
    const h = (host = await NvmeHost.attach(await source.client()));
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    if (shadow || doorbells === 'ioeventfd') expect((await h.shadowDoorbells()).status).toBe(0);
    expect((await h.createIoQueuePair(1, 16)).map((c) => c.status)).toEqual([0, 0]);
    // THR 7, TIME 255 (25.5 ms): a single completion's interrupt is held.
    expect((await h.admin({ opcode: 0x09, cdw10: 0x08, cdw11: 0xff07 })).status).toBe(0);
    h.vectors[1].take();
    // An interrupt-driven host: the completion stays unconsumed.
    h.hold = true;
    const cq = source.device.cqs[1]!;
    const read = h.submit(1, { opcode: 0x02, nsid: 1, prp1: h.alloc(PAGE) });
    await until(() => cq.tail === 1);
    await h.client.migration.setState(MigrationState.STOP);
    // Sent by the stop (or by its time, had that come first): with the device stopped it could only be a pending bit.
    expect(h.vectors[1].take()).toBe(1);
    await h.client.migration.setState(MigrationState.RUNNING);
    h.hold = false;
    expect((await read).status).toBe(0);
  });
});

test('a destination refuses state from a controller of another kind', async () => {
  const source = await serveImage('mmap');
  const h = (host = await NvmeHost.attach(await source.client()));
  await h.enable();
  const destination = await serveImage('trap'); // a trapped BAR0 is laid out differently
  await expect(migrate(h.client, await destination.client())).rejects.toThrow();
  expect(await h.client.migration.state()).toBe(MigrationState.RUNNING);
});
