/** Shareable BARs: memfd-backed, mapped in part by the client, seen by the device as bytes. */
import { afterAll, afterEach, describe, expect, test } from 'vitest';
import {
  InvalidDeviceError,
  PciDevice,
  RegionInfoFlags,
  SharedMemory,
  UsageError,
  type MemoryBar,
  type PciDeviceDescription,
} from '../ts/index.js';
import { native } from '../ts/native.js';
import { Channel } from '../ts/channel.js';
import {
  Command,
  decodeRegionInfoReply,
  decodeRegionReadReply,
  encodeRegionInfoRequest,
  encodeRegionReadRequest,
  encodeVersion,
  RegionCapId,
} from '../ts/protocol/index.js';
import { openFdCount, serve, until, type Served } from './helpers.js';
import { base, fieldOf } from './pci-helpers.js';

const PAGE = 4096;

let served: Served<PciDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served?.device.close();
  served = undefined;
});

/** BAR0: four pages, pages 1 and 3 mappable, the rest trapped to `bar`'s handlers. */
function sparseDevice(bar: Partial<MemoryBar> = {}): PciDevice {
  return new PciDevice({
    ...base,
    bars: { 0: { kind: 'memory', size: 4 * PAGE, shared: true, mmap: [{ offset: PAGE, size: PAGE }, { offset: 3 * PAGE, size: PAGE }], ...bar } },
  });
}

const u32 = (bytes: Uint8Array, offset: number) => new DataView(bytes.buffer, bytes.byteOffset).getUint32(offset, true);

describe('region info and mappings', () => {
  test('the reply carries the fd, MMAP and the sparse areas; client mapping and device bytes are one memory', async () => {
    served = await serve(sparseDevice());
    const client = await served.client();
    const info = await client.getRegionInfo(0);
    expect(info.flags).toBe(RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP | RegionInfoFlags.CAPS);
    expect(info.size).toBe(BigInt(4 * PAGE));
    expect(info.caps).toEqual([{ id: RegionCapId.SPARSE_MMAP, areas: [{ offset: BigInt(PAGE), size: BigInt(PAGE) }, { offset: BigInt(3 * PAGE), size: BigInt(PAGE) }] }]);
    expect(info.fd).toBeDefined();
    const mapping = new native.NativeMapping(info.fd!, info.offset + BigInt(3 * PAGE), BigInt(PAGE), true, true);
    native.closeFd(info.fd!);
    const bytes = served.device.bar(0).bytes!;
    mapping.write(16, Buffer.from([0x78, 0x56, 0x34, 0x12]));
    expect(u32(bytes, 3 * PAGE + 16)).toBe(0x12345678);
    bytes[3 * PAGE + 100] = 0xa5;
    expect(mapping.read(100, 1)[0]).toBe(0xa5);
    mapping.unmap();
  });

  test('the default mappable area is the whole BAR; unshared BARs have no fd', async () => {
    served = await serve(new PciDevice({ ...base, bars: { 0: { kind: 'memory', size: 2 * PAGE, shared: true }, 2: { kind: 'memory', size: PAGE } } }));
    const client = await served.client();
    const info = await client.getRegionInfo(0);
    expect(info.caps).toEqual([{ id: RegionCapId.SPARSE_MMAP, areas: [{ offset: 0n, size: BigInt(2 * PAGE) }] }]);
    native.closeFd(info.fd!);
    const plain = await client.getRegionInfo(2);
    expect([plain.flags & RegionInfoFlags.MMAP, plain.fd, plain.caps]).toEqual([0, undefined, []]);
  });
});

describe('a client that takes no fds (max_msg_fds 0)', () => {
  test('gets the BAR as trapped-only: no MMAP, no sparse areas, no fd; its bytes still answer reads', async () => {
    served = await serve(sparseDevice());
    const channel = new Channel(native.connectUnix(served.path), { side: 'client', onCommand: () => {}, onClose: () => {} });
    await channel.request(Command.VERSION, encodeVersion({ major: 0, minor: 0, capabilities: { maxMsgFds: 0 } }));
    const reply = await channel.request(Command.DEVICE_GET_REGION_INFO, encodeRegionInfoRequest({ index: 0, argsz: 256 }));
    const info = decodeRegionInfoReply(reply.payload);
    expect([info.flags, info.caps, reply.fds]).toEqual([RegionInfoFlags.READ | RegionInfoFlags.WRITE, [], []]);
    served.device.bar(0).bytes![PAGE] = 0x3c;
    const read = await channel.request(Command.REGION_READ, encodeRegionReadRequest({ offset: BigInt(PAGE), region: 0, count: 1 }));
    expect(decodeRegionReadReply(read.payload).data[0]).toBe(0x3c);
    channel.close();
  });
});

describe('trapped and mapped accesses', () => {
  test('trapped accesses reach the handlers; REGION_READ/WRITE of mapped areas use the bytes', async () => {
    const writes: [number, number[]][] = [];
    served = await serve(sparseDevice({
      read: (offset, size) => (offset === 0 && size === 4 ? 0xc0ffee : 0),
      write: (offset, data) => { writes.push([offset, [...data]]); },
    }));
    const client = await served.client();
    const bytes = served.device.bar(0).bytes!;
    expect((await client.regionRead(0, 0n, 4)).readUInt32LE(0)).toBe(0xc0ffee);
    await client.regionWrite(0, 8n, Buffer.from([1, 2]));
    expect(writes).toEqual([[8, [1, 2]]]);
    expect(bytes[8]).toBe(0); // a read handler computes the trapped part: writes are not stored

    bytes[PAGE + 4] = 0x5a;
    expect((await client.regionRead(0, BigInt(PAGE + 4), 1))[0]).toBe(0x5a);
    await client.regionWrite(0, BigInt(PAGE + 8), Buffer.from([9]));
    expect(bytes[PAGE + 8]).toBe(9);
    expect(writes).toHaveLength(1);

    // An access spanning both is split at the area's edge.
    bytes[PAGE] = 0x77;
    expect([...(await client.regionRead(0, BigInt(PAGE - 2), 3))]).toEqual([0, 0, 0x77]);
  });

  test('without a read handler every read is native, from the shared bytes; writes are stored, then seen', async () => {
    const writes: number[] = [];
    served = await serve(sparseDevice({ write: (offset) => { writes.push(offset); } }));
    const client = await served.client();
    const bytes = served.device.bar(0).bytes!;
    bytes.set([1, 2, 3, 4], 0x20);
    bytes[3 * PAGE] = 0x42;
    const before = served.server.session!.readsAnsweredNatively;
    expect([...(await client.regionRead(0, 0x20n, 4))]).toEqual([1, 2, 3, 4]);
    expect((await client.regionRead(0, BigInt(3 * PAGE), 1))[0]).toBe(0x42);
    expect(served.server.session!.readsAnsweredNatively).toBe(before + 2);
    await client.regionWrite(0, 0x40n, Buffer.from([0xee]));
    expect([bytes[0x40], writes]).toEqual([0xee, [0x40]]);
  });

  test('a SharedMemory passed in backs the BAR and stays open after close()', async () => {
    const memory = new SharedMemory(PAGE);
    try {
      served = await serve(new PciDevice({ ...base, bars: { 2: { kind: 'memory', size: PAGE, shared: memory } } }));
      memory.bytes[7] = 0x99;
      const client = await served.client();
      expect((await client.regionRead(2, 7n, 1))[0]).toBe(0x99);
      await served.close();
      served.device.close();
      served = undefined;
      expect(memory.closed).toBe(false);
      expect(memory.bytes[7]).toBe(0x99);
    } finally {
      memory.close();
    }
  });
});

describe('reset and lifetime', () => {
  test('DEVICE_RESET zeroes shared memory, as it does plain-memory BARs', async () => {
    served = await serve(sparseDevice());
    const client = await served.client();
    const info = await client.getRegionInfo(0);
    const mapping = new native.NativeMapping(info.fd!, BigInt(PAGE), BigInt(PAGE), true, true);
    native.closeFd(info.fd!);
    mapping.write(0, Buffer.from([1, 2, 3]));
    served.device.bar(0).bytes![0x10] = 4;
    await client.reset();
    expect([...mapping.read(0, 3), served.device.bar(0).bytes![0x10]]).toEqual([0, 0, 0, 0]);
    mapping.unmap();
  });

  test('a client leaves no fds behind; close() frees the memfd; a bad description frees what it made', async () => {
    const start = openFdCount();
    const device = sparseDevice({ ioeventfds: [{ offset: 0, size: 4 }] });
    expect(openFdCount()).toBe(start + 2); // the memfd and the eventfd (the mapping needs no fd)
    served = await serve(device);
    const before = openFdCount();
    const client = await served.client();
    const info = await client.getRegionInfo(0);
    native.closeFd(info.fd!);
    const ioFds = await client.getRegionIoFds(0);
    ioFds.fds.forEach((fd) => native.closeFd(fd));
    expect(() => device.close()).toThrow(UsageError);
    client.close();
    await until(() => served!.server.session === undefined);
    expect(openFdCount()).toBe(before);
    await served.close();
    served = undefined;
    const bytes = device.bar(0).bytes!;
    device.close();
    device.close(); // idempotent
    expect(bytes.byteLength).toBe(0); // detached, not dangling
    expect(openFdCount()).toBe(start);

    expect(() => new PciDevice({
      ...base,
      bars: { 0: { kind: 'memory', size: PAGE, shared: true, ioeventfds: [{ offset: 0, size: 4 }] } },
      capabilities: [{ kind: 'msi', vectors: 3 as never }],
    })).toThrow(InvalidDeviceError);
    expect(openFdCount()).toBe(start);
  });

  test('bar() names undeclared BARs; plain-memory BARs expose their bytes too', () => {
    const device = new PciDevice({ ...base, bars: { 1: { kind: 'memory', size: 16 }, 2: { kind: 'io', size: 4, read: () => 0 } } });
    expect(() => device.bar(0)).toThrow(/BAR0 is not declared/);
    expect(device.bar(1).bytes).toHaveLength(16);
    expect(device.bar(1).shared).toBeUndefined();
    expect(device.bar(2).bytes).toBeUndefined();
  });
});

describe('invalid shared BARs throw InvalidDeviceError naming the field', () => {
  const onePage = new SharedMemory(PAGE);
  afterAll(() => onePage.close());
  const shared = (bar: Partial<MemoryBar>): PciDeviceDescription => ({ ...base, bars: { 0: { kind: 'memory', size: 4 * PAGE, shared: true, ...bar } } });
  const msix = (mmap: MemoryBar['mmap'], table: number, pba: number): PciDeviceDescription => ({
    ...shared({ mmap }),
    capabilities: [{ kind: 'msix', vectors: 4, table: { bar: 0, offset: table }, pba: { bar: 0, offset: pba } }],
  });
  const cases: [string, PciDeviceDescription, string][] = [
    ['an I/O BAR', { ...base, bars: { 0: { kind: 'io', size: 16, shared: true } as never } }, 'bars[0].shared'],
    ['a BAR smaller than a page', shared({ size: 2048 }), 'bars[0].size'],
    ['shared: something else', shared({ shared: 'yes' as never }), 'bars[0].shared'],
    ['a SharedMemory of another size', shared({ shared: onePage }), 'bars[0].shared'],
    ['mmap without shared', { ...base, bars: { 0: { kind: 'memory', size: PAGE, mmap: [{ offset: 0, size: PAGE }] } } }, 'bars[0].mmap'],
    ['an empty mmap list', shared({ mmap: [] }), 'bars[0].mmap'],
    ['an unaligned area', shared({ mmap: [{ offset: 100, size: PAGE }] }), 'bars[0].mmap[0]'],
    ['a partial page', shared({ mmap: [{ offset: 0, size: 100 }] }), 'bars[0].mmap[0]'],
    ['an area past the BAR', shared({ mmap: [{ offset: 0, size: PAGE }, { offset: 3 * PAGE, size: 2 * PAGE }] }), 'bars[0].mmap[1]'],
    ['overlapping areas', shared({ mmap: [{ offset: PAGE, size: 2 * PAGE }, { offset: 2 * PAGE, size: PAGE }] }), 'bars[0].mmap[1]'],
    ['an MSI-X table in the default (whole-BAR) area', msix(undefined, 0, 0x800), 'capabilities[0].table.offset'],
    ['an MSI-X table in a mappable area', msix([{ offset: 0, size: PAGE }], 0x10, 2 * PAGE), 'capabilities[0].table.offset'],
    ['a PBA in a mappable area', msix([{ offset: 3 * PAGE, size: PAGE }], 0, 3 * PAGE + 8), 'capabilities[0].pba.offset'],
  ];
  test.each(cases)('%s', (_name, description, field) => {
    expect(fieldOf(description)).toBe(field);
  });

  test('the MSI-X table and PBA may sit in trapped pages of a shared BAR', () => {
    expect(() => new PciDevice(msix([{ offset: PAGE, size: PAGE }], 2 * PAGE, 3 * PAGE)).close()).not.toThrow();
  });
});
