/** The NVMe-pattern example end to end: mapped doorbells, ioeventfd kicks, MSI-X in trapped pages. */
import { afterEach, describe, expect, test } from 'vitest';
import { CapabilityId, IrqIndex, type EventfdIrq, Region, RegionInfoFlags, type VfioUserClient } from '../ts/index.js';
import { native } from '../ts/native.js';
import type { NativeMapping } from '../ts/native.js';
import { RegionCapId } from '../ts/protocol/index.js';
import { BAR_SIZE, DOORBELL_PAGE, MSIX_PBA, MSIX_TABLE, QUEUE_CARD_ID, QUEUE_REGISTERS, QueueCard, QUEUES } from '../examples/nvme-doorbell.js';
import { openFdCount, serve, until, type Served } from './helpers.js';
import { COMMAND_MEMORY_BUS_MASTER, Eventfds, guest, kvmSignal } from './pci-helpers.js';

let served: Served<QueueCard> | undefined;
const eventfds = new Eventfds();
afterEach(async () => {
  await served?.close();
  served?.device.close();
  served = undefined;
  eventfds.closeAll();
});

interface Driver {
  client: VfioUserClient;
  doorbells: NativeMapping;
  /** The client's copies of the NOTIFY ioeventfds, by queue (from the datamatch). */
  kicks: number[];
  vectors: EventfdIrq[];
  close(): void;
}

/** Serves a card, unless one is served, and does what a VMM and a guest driver do: map the doorbell page, wire the kicks, enable MSI-X. */
async function drive(): Promise<Driver> {
  served ??= await serve(new QueueCard());
  const client = await served.client();
  const info = await client.getRegionInfo(Region.BAR0);
  const [area] = info.caps[0].id === RegionCapId.SPARSE_MMAP ? info.caps[0].areas : [];
  const doorbells = new native.NativeMapping(info.fd!, info.offset + area.offset, area.size, true, true);
  native.closeFd(info.fd!);
  const io = await client.getRegionIoFds(Region.BAR0);
  const kicks: number[] = [];
  for (const e of io.entries) kicks[Number(e.datamatch)] = io.fds[e.fdIndex];
  const g = guest(client);
  const msix = (await g.capabilities()).get(CapabilityId.MSIX)!;
  await g.setCfg16(0x04, COMMAND_MEMORY_BUS_MASTER);
  await g.setCfg16(msix + 2, 0x8000);
  const vectors = eventfds.create(QUEUES);
  await client.setIrqs({ index: IrqIndex.MSIX, eventfds: vectors });
  return {
    client, doorbells, kicks, vectors,
    close() {
      doorbells.unmap();
      io.fds.forEach((fd) => native.closeFd(fd));
    },
  };
}

describe('the queue card', () => {
  test('only the doorbell page is mappable; registers and MSI-X stay trapped', async () => {
    const d = await drive();
    const info = await d.client.getRegionInfo(Region.BAR0);
    native.closeFd(info.fd!);
    expect(info.flags & RegionInfoFlags.MMAP).toBeTruthy();
    expect(info.caps).toEqual([{ id: RegionCapId.SPARSE_MMAP, areas: [{ offset: BigInt(DOORBELL_PAGE), size: 4096n }] }]);
    expect(info.size).toBe(BigInt(BAR_SIZE));
    const read = async (offset: number) => (await d.client.regionRead(Region.BAR0, BigInt(offset), 4)).readUInt32LE(0);
    expect([await read(QUEUE_REGISTERS.ID), await read(QUEUE_REGISTERS.QUEUES)]).toEqual([QUEUE_CARD_ID, QUEUES]);
    expect(await read(MSIX_TABLE + 12)).toBe(1); // entry 0 masked at power-on
    expect(await read(MSIX_PBA)).toBe(0);
    expect(d.kicks).toHaveLength(QUEUES);
    d.close();
  });

  test('a tail stored through the mapping and a kick through the ioeventfd: consumed, vector raised', async () => {
    const d = await drive();
    d.doorbells.write(4 * 2, Buffer.from([5, 0, 0, 0])); // queue 2's tail: no message
    await d.client.regionRead(Region.BAR0, 0n, 4); // a round trip: the loop has turned
    expect(served!.device.entries).toBe(0); // not kicked: not looked at
    kvmSignal(d.kicks[2]);
    await until(() => served!.device.entries === 5);
    expect(d.vectors.map((irq) => irq.take())).toEqual([0, 0, 1, 0]);
    expect((await d.client.regionRead(Region.BAR0, BigInt(QUEUE_REGISTERS.COMPLETED), 4)).readUInt32LE(0)).toBe(5);
    d.close();
  });

  test('a kick the VMM forwards as a REGION_WRITE signals the same eventfd', async () => {
    const d = await drive();
    d.doorbells.write(4 * 1, Buffer.from([3, 0, 0, 0]));
    await d.client.regionWrite(Region.BAR0, BigInt(QUEUE_REGISTERS.NOTIFY), Buffer.from([1, 0, 0, 0]));
    await until(() => served!.device.entries === 3);
    expect(d.vectors[1].take()).toBe(1);
    d.close();
  });

  test('reset zeroes the doorbells the client mapped, the count, and pending kicks', async () => {
    const d = await drive();
    d.doorbells.write(0, Buffer.from([9, 0, 0, 0]));
    kvmSignal(d.kicks[0]);
    await until(() => served!.device.entries === 9);
    kvmSignal(d.kicks[3]);
    await d.client.reset();
    const pending = served!.device.bar(0).ioeventfds.map((kick) => kick.take());
    expect([...d.doorbells.read(0, 4), served!.device.entries, ...pending]).toEqual([0, 0, 0, 0, 0, 0, 0, 0, 0]);
    d.close();
  });

  test('a client leaves no fds behind', async () => {
    served = await serve(new QueueCard());
    const before = openFdCount();
    const d = await drive();
    d.close();
    d.client.close();
    await until(() => served!.server.session === undefined);
    eventfds.closeAll();
    expect(openFdCount()).toBe(before);
  });
});
