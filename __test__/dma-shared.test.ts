import { afterEach, describe, expect, test } from 'vitest';
import { RegionInfoFlags, SharedMemory, UsageError } from '../ts/index.js';
import { native } from '../ts/native.js';
import { KvmIoeventfdFlags, RegionCapId } from '../ts/protocol/index.js';
import { openFdCount, serve, until, type Served } from './helpers.js';
import { DmaTestDevice, PAGE } from './dma-device.js';

let served: Served<DmaTestDevice>;
afterEach(async () => {
  await served?.close();
  served?.device.bar.close();
});

describe('SharedMemory regions', () => {
  test('the region info carries the fd, MMAP and a sparse area; the device sees client stores', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const before = openFdCount();
    const info = await client.getRegionInfo(0);
    expect(info.flags & RegionInfoFlags.MMAP).toBeTruthy();
    expect(info.caps).toEqual([{ id: RegionCapId.SPARSE_MMAP, areas: [{ offset: BigInt(PAGE), size: BigInt(PAGE) }] }]);
    expect(info.fd).toBeDefined();
    // The client maps only the doorbell page, as QEMU would.
    const doorbells = new native.NativeMapping(info.fd!, info.offset + BigInt(PAGE), BigInt(PAGE), true, true);
    native.closeFd(info.fd!);
    expect(openFdCount()).toBe(before); // the session's dup was closed after sending
    doorbells.write(8, Buffer.from([0x11, 0x22, 0x33, 0x44]));
    const bar = served.device.bar.bytes;
    expect(new DataView(bar.buffer, bar.byteOffset).getUint32(PAGE + 8, true)).toBe(0x44332211);
    // And the other way, plus the trapped path for the same bytes.
    bar[PAGE + 100] = 0x5a;
    expect(doorbells.read(100, 1)[0]).toBe(0x5a);
    expect((await client.regionRead(0, BigInt(PAGE + 100), 1))[0]).toBe(0x5a);
    // The register page stays trapped: its writes reach device code.
    const writes: number[] = [];
    served.device.onWrite = (offset) => { writes.push(offset); };
    await client.regionWrite(0, 12n, Buffer.from([1, 0, 0, 0]));
    expect(writes).toEqual([12]);
    doorbells.unmap();
  });

  test('descriptions are validated and close() detaches the device view', () => {
    expect(() => new SharedMemory(100)).toThrow(UsageError);
    const m = new SharedMemory(2 * PAGE);
    expect(() => m.region({ mmap: [{ offset: 100n, size: BigInt(PAGE) }] })).toThrow(UsageError);
    expect(() => m.region({ mmap: [{ offset: BigInt(PAGE), size: BigInt(2 * PAGE) }] })).toThrow(UsageError);
    expect(m.region().caps).toEqual([{ id: RegionCapId.SPARSE_MMAP, areas: [{ offset: 0n, size: BigInt(2 * PAGE) }] }]);
    const view = m.bytes;
    m.close();
    expect(view.byteLength).toBe(0);
    expect(m.closed).toBe(true);
  });
});

describe('GET_REGION_IO_FDS', () => {
  test('ioeventfds the device declares reach the client as dups; signalling one wakes the device', async () => {
    const device = new DmaTestDevice();
    const doorbell = native.eventfdCreate();
    device.ioFds = [
      { offset: BigInt(PAGE), size: 4n, fd: doorbell },
      { offset: BigInt(PAGE + 4), size: 4n, fd: doorbell, flags: KvmIoeventfdFlags.DATAMATCH, datamatch: 7n },
    ];
    served = await serve(device);
    const client = await served.client();
    const before = openFdCount();
    const reply = await client.getRegionIoFds(0);
    expect(reply.count).toBe(2);
    expect(reply.entries.map((e) => [e.offset, e.fdIndex, e.flags, e.datamatch])).toEqual([
      [BigInt(PAGE), 0, 0, 0n],
      [BigInt(PAGE + 4), 0, KvmIoeventfdFlags.DATAMATCH, 7n],
    ]);
    expect(reply.fds).toHaveLength(1);
    expect(reply.fds[0]).not.toBe(doorbell);
    native.eventfdSignal(reply.fds[0]);
    expect(native.eventfdTake(doorbell)).toBe(1);
    native.closeFd(reply.fds[0]);
    expect(openFdCount()).toBe(before);
    client.close();
    await until(() => served.server.session === undefined);
    native.closeFd(doorbell); // still the device's: the session never closed it
  });

  test('devices without io fds answer count 0', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const reply = await client.getRegionIoFds(0);
    expect([reply.count, reply.fds.length]).toEqual([0, 0]);
  });
});

