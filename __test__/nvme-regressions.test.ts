/**
 * The three findings of an independent NVMe host against examples/nvme
 * (issue 14), each in every doorbell mode, over a real socket: each once
 * wedged the server, lost a command or killed the process; now each is the
 * status QEMU's NVMe answers, for that command only, and the controller
 * goes on.
 */
import { describe, expect, test } from 'vitest';
import { MigrationState } from '../ts/index.js';
import createDevice from '../examples/nvme/index.js';
import { Csts, Register } from '../examples/nvme/controller.js';
import { testCleanups } from './cleanups.js';
import { until } from './helpers.js';
import { NvmeHost, PAGE } from './nvme-host.js';
import { attachNvme, bringUpNvme, Op, roundTrip, S, SETUPS, u64 } from './nvme-setup.js';

const cleanups = testCleanups();

/** A Write of `pages` pages (PRP2 a list past two) from PRP1 `page`. */
const write = (pages: number, prp1: bigint, prp2: bigint) => ({ opcode: Op.WRITE, nsid: 1, prp1, prp2, cdw12: (pages * PAGE) / 512 - 1 });

describe.each(SETUPS)('with %s doorbells', (setup) => {
  test('finding 1: a PRP list entry that points at itself is PRP Offset Invalid; lists that loop or chain outside memory end', async () => {
    const { host: h, deviceErrors } = await bringUpNvme(cleanups, setup);
    const data = h.alloc(PAGE * 4);
    // PRP2 is the last qword of a page, and holds PRP2: a one-entry list whose chain pointer has an offset.
    const selfList = h.alloc(PAGE) + BigInt(PAGE - 8);
    h.write(selfList, u64(selfList));
    const self = await h.submit(1, write(3, data, selfList));
    expect([self.status, self.dnr]).toEqual([S.PRP_OFFSET_INVALID, true]);
    // A chain pointer into the middle of another page.
    const offsetList = h.alloc(PAGE) + BigInt(PAGE - 8);
    h.write(offsetList, u64(h.alloc(PAGE) + 8n));
    expect((await h.submit(1, write(3, data, offsetList))).status).toBe(S.PRP_OFFSET_INVALID);
    // A list chaining to a page outside guest memory.
    const outsideList = h.alloc(PAGE) + BigInt(PAGE - 16);
    h.write(outsideList, Buffer.concat([u64(data + BigInt(PAGE)), u64(0x1000n)]));
    expect((await h.submit(1, write(4, data, outsideList))).status).toBe(S.DATA_TRANSFER_ERROR);
    // A list that chains back to its own page (a loop): walked once for the transfer's pages, then done.
    const loop = h.alloc(PAGE);
    h.write(loop, Buffer.concat([u64(data + 2n * BigInt(PAGE)), u64(data + 3n * BigInt(PAGE))]));
    h.write(loop + BigInt(PAGE - 16), Buffer.concat([u64(data + BigInt(PAGE)), u64(loop)]));
    h.write(data, Buffer.alloc(4 * PAGE, 0x3c));
    expect((await h.submit(1, write(4, data, loop + BigInt(PAGE - 16)))).status).toBe(S.SUCCESS);
    // Past MDTS (512 KiB): Invalid Field before any list is read.
    expect((await h.submit(1, write(129, data, selfList))).status).toBe(S.INVALID_FIELD);
    await roundTrip(h, 0x11);
    expect(deviceErrors).toEqual([]);
  });

  test('finding 2: Get Log Page NUMD is unsigned, bounded by MDTS and by the log; its offset is checked', async () => {
    const { host: h, deviceErrors } = await bringUpNvme(cleanups, setup);
    const identify = h.alloc(PAGE);
    expect((await h.admin({ opcode: 0x06, prp1: identify, cdw10: 1 })).status).toBe(S.SUCCESS);
    expect(h.read(identify, PAGE)[77]).toBe(7); // MDTS: 2^7 pages
    const buffer = h.alloc(2 * PAGE);
    /** SMART / Health of `dwords` dwords at `offset`. */
    const log = (dwords: number, offset = 0n, nsid = 0xffffffff) => {
      h.write(buffer, Buffer.alloc(2 * PAGE, 0xee));
      const numd = dwords - 1;
      return h.admin({
        opcode: 0x02, nsid, prp1: buffer, prp2: buffer + BigInt(PAGE),
        cdw10: 0x02 | ((numd & 0xffff) << 16), cdw11: Math.floor(numd / 0x10000), cdw12: Number(offset & 0xffffffffn), cdw13: Number(offset >> 32n),
      });
    };
    // NUMDU with its top bit set (a negative size once), past 4 GiB, and one dword past MDTS.
    for (const dwords of [0x1_0000_0000, 0x8000_0001, 0x4000_0001, 0x100_0000, (512 << 10) / 4 + 1]) {
      const c = await log(dwords);
      expect([c.status, c.dnr]).toEqual([S.INVALID_FIELD, true]);
    }
    const whole = await log(128);
    expect(whole.status).toBe(S.SUCCESS);
    const smart = h.read(buffer, 512);
    // Exactly MDTS: the log's 512 bytes are returned, nothing past them is written.
    expect((await log((512 << 10) / 4)).status).toBe(S.SUCCESS);
    expect(h.read(buffer, 512)).toEqual(smart);
    expect(h.read(buffer + 512n, 2 * PAGE - 512)).toEqual(Buffer.alloc(2 * PAGE - 512, 0xee));
    // An offset inside the log: the rest of it; unaligned, at or past its end, or past 4 GiB: Invalid Field.
    expect((await log(128, 8n)).status).toBe(S.SUCCESS);
    expect(h.read(buffer, 504)).toEqual(smart.subarray(8));
    expect(h.read(buffer + 504n, 8)).toEqual(Buffer.alloc(8, 0xee));
    for (const offset of [2n, 512n, 1n << 32n, (1n << 64n) - 4n]) expect((await log(128, offset)).status).toBe(S.INVALID_FIELD);
    // SMART / Health is the controller's only: namespace 1 is Invalid Field, NSID 0 is the controller.
    expect((await log(128, 0n, 1)).status).toBe(S.INVALID_FIELD);
    expect((await log(128, 0n, 0)).status).toBe(S.SUCCESS);
    await roundTrip(h, 0x22);
    expect(deviceErrors).toEqual([]);
  });

  test('finding 3: DMA outside guest memory is a Data Transfer Error for that command only', async () => {
    const { host: h, deviceErrors } = await bringUpNvme(cleanups, setup);
    const page = h.alloc(PAGE);
    const list = h.alloc(PAGE);
    h.write(list, Buffer.concat([u64(0x2000n), u64(0x3000n)]));
    const commands = [
      { opcode: Op.READ, nsid: 1, prp1: 0x1000n, cdw12: 7 }, // the finding: PRP1 = 0x1000
      { opcode: Op.WRITE, nsid: 1, prp1: 0x1000n, cdw12: 7 },
      { opcode: Op.READ, nsid: 1, prp1: page, prp2: 0x1000n, cdw12: 15 }, // the second page
      { opcode: Op.READ, nsid: 1, prp1: page, prp2: list, cdw12: 23 }, // list entries
      { opcode: Op.READ, nsid: 1, prp1: page, prp2: 0x1000n, cdw12: 23 }, // the list itself
      { opcode: Op.DSM, nsid: 1, prp1: 0x1000n, cdw11: 4 }, // the range list
    ];
    for (const sqe of commands) {
      const c = await h.submit(1, sqe);
      expect([c.status, c.dnr]).toEqual([S.DATA_TRANSFER_ERROR, true]);
    }
    expect((await h.admin({ opcode: 0x06, prp1: 0x1000n, cdw10: 1 })).status).toBe(S.DATA_TRANSFER_ERROR);
    expect((await h.admin({ opcode: 0x02, nsid: 0xffffffff, prp1: 0x1000n, cdw10: 0x02 | (127 << 16) })).status).toBe(S.DATA_TRANSFER_ERROR);
    await roundTrip(h, 0x33);
    expect(deviceErrors).toEqual([]);
  });
});

test('found by vfio-user fuzz --mode nvme: ioeventfd kicks after a client that resumed the device left reach the next client\'s queues', async () => {
  const { host: first, served } = await attachNvme(cleanups, createDevice(['--size', '4M', '--doorbells', 'ioeventfd']));
  expect((await first.enable()) & Csts.RDY).toBe(Csts.RDY);
  // Resuming re-arms the ioeventfd watches inside this client's request.
  await first.client.migration.setState(MigrationState.STOP);
  await first.client.migration.setState(MigrationState.RUNNING);
  first.client.close();
  await until(() => served.server.session === undefined);
  const next = await NvmeHost.attach(await served.client());
  cleanups.defer(() => next.close());
  await next.disable();
  expect((await next.enable()) & Csts.RDY).toBe(Csts.RDY);
  expect((await next.createIoQueuePair(1, 16)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
  expect((await next.shadowDoorbells()).status).toBe(S.SUCCESS);
  // Kicked through the ioeventfd: once run in the first client's context, on its closed guest memory (a Data Transfer Error, then a fatal status).
  await roundTrip(next, 0x44);
  expect(await next.reg32(Register.CSTS)).toBe(Csts.RDY);
});
