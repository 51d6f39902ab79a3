import { afterEach, describe, expect, test } from 'vitest';
import { Command, Errno, PciDevice, Region, RegionInfoFlags, type RegionDescription } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { native } from '../ts/native.js';
import { openFdCount, serve, until, type Served } from './helpers.js';
import { pciFunction } from '../ts/pci/device.js';

let served: Served<PciDevice>;
afterEach(async () => served?.close());

describe('region info', () => {
  test('reports every region of the GPIO card', async () => {
    served = await serve();
    const client = await served.client();
    const rw = RegionInfoFlags.READ | RegionInfoFlags.WRITE;
    expect(await client.getRegionInfo(Region.CONFIG)).toMatchObject({ index: 7, size: 256n, flags: rw, caps: [] });
    expect(await client.getRegionInfo(Region.BAR2)).toMatchObject({ index: 2, size: 8n, flags: rw });
    expect(await client.getRegionInfo(Region.BAR0)).toMatchObject({ size: 0n, flags: 0 });
    await expect(client.getRegionInfo(9)).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.DEVICE_GET_REGION_INFO });
  });
});

describe('mappable regions', () => {
  test('the fd goes only with the complete reply, as a copy, and none leak', async () => {
    const memfd = native.memfdCreate('bar0', 8192n);
    // BAR0 answered as a sparse mappable region over a memfd of the test's own.
    const device = new PciDevice({ vendorId: 1, deviceId: 2, classCode: 0, bars: { 0: { kind: 'memory', size: 8192 } } });
    const fn = pciFunction(device);
    const regionInfo = fn.regionInfo.bind(fn);
    fn.regionInfo = (index: number): RegionDescription => {
      if (index !== Region.BAR0) return regionInfo(index);
      const flags = RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP;
      return { size: 8192n, flags, fd: memfd, offset: 0n, caps: [{ id: 1, areas: [{ offset: 4096n, size: 4096n }] }] };
    };
    served = await serve(device);
    const client = await served.client();
    const before = openFdCount();
    for (let i = 0; i < 5; i++) {
      const info = await client.getRegionInfo(Region.BAR0);
      expect(info.caps).toEqual([{ id: 1, areas: [{ offset: 4096n, size: 4096n }] }]);
      expect(info.fd).toBeGreaterThan(2);
      native.closeFd(info.fd!);
    }
    expect(openFdCount()).toBe(before);
    native.closeFd(memfd);
  });
});

describe('region read and write', () => {
  test('config space is answered natively, without entering JS', async () => {
    served = await serve();
    const client = await served.client();
    const before = served.server.session!.readsAnsweredNatively;
    const id = await client.regionRead(Region.CONFIG, 0n, 4);
    expect(id.readUInt32LE(0)).toBe(0x0dc8494f);
    expect(served.server.session!.readsAnsweredNatively).toBe(before + 1);
    // Accesses of any width at any offset, across register boundaries.
    expect((await client.regionRead(Region.CONFIG, 1n, 2)).toString('hex')).toBe('49c8');
    expect((await client.regionRead(Region.CONFIG, 0x2cn, 4)).readUInt32LE(0)).toBe(0x0dc8494f);
  });

  test('writes then reads see the device state, posted or not, in order', async () => {
    served = await serve();
    const client = await served.client();
    await client.regionWrite(Region.BAR2, 0n, Buffer.from([0x12]));
    await client.regionWrite(Region.BAR2, 4n, Buffer.from([0x34]), { posted: true });
    // The posted write has no reply; the read after it must still see it.
    expect((await client.regionRead(Region.BAR2, 4n, 1))[0]).toBe(0x34);
    expect((await client.regionRead(Region.BAR2, 0n, 1))[0]).toBe(0x12);
  });

  test('out-of-bounds, oversized and read-only accesses get the right errno', async () => {
    served = await serve(new PciDevice({ vendorId: 1, deviceId: 2, classCode: 0, rom: Buffer.from('ROM!'), bars: { 0: { kind: 'memory', size: 4096 } } }));
    const client = await served.client();
    await expect(client.regionRead(Region.BAR0, 4094n, 4)).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.REGION_READ });
    await expect(client.regionRead(12, 0n, 4)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.regionRead(Region.BAR1, 0n, 4)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.regionWrite(Region.ROM, 0n, Buffer.from([1]))).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.REGION_WRITE });
    expect((await client.regionRead(Region.ROM, 0n, 4)).toString()).toBe('ROM!');
  });

  test('REGION_WRITE_MULTI with one bad entry writes nothing', async () => {
    served = await serve();
    const client = await served.client();
    await client.regionWrite(Region.BAR2, 0n, Buffer.from([0x11]));
    const multi = protocol.encodeRegionWriteMultiRequest([
      { region: Region.BAR2, offset: 0n, data: Buffer.from([0x22]) },
      { region: Region.BAR2, offset: 8n, data: Buffer.from([0x33]) }, // past the 8-byte BAR
    ]);
    await expect((client as any).request(Command.REGION_WRITE_MULTI, multi)).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.REGION_WRITE_MULTI });
    expect((await client.regionRead(Region.BAR2, 0n, 1))[0]).toBe(0x11);
  });

  test('a read larger than max_data_xfer_size is E2BIG', async () => {
    served = await serve(new PciDevice({ vendorId: 1, deviceId: 2, classCode: 0, bars: { 0: { kind: 'memory', size: 4 << 20 } } }));
    const client = await served.client();
    // Force one oversized request past the client's own chunking.
    Object.defineProperty(client, 'chunk', { get: () => 2 << 20 });
    await expect(client.regionRead(Region.BAR0, 0n, 2 << 20)).rejects.toMatchObject({ errno: Errno.E2BIG });
  });

  test('memory BARs keep what is written and large transfers are chunked', async () => {
    served = await serve(new PciDevice({ vendorId: 1, deviceId: 2, classCode: 0, bars: { 0: { kind: 'memory', size: 4 << 20 } } }));
    const client = await served.client();
    const data = Buffer.alloc(3 << 20);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    await client.regionWrite(Region.BAR0, 4096n, data);
    expect((await client.regionRead(Region.BAR0, 4096n, data.length)).equals(data)).toBe(true);
  });

  test('async handlers keep replies in order, even with native reads behind them', async () => {
    const order: string[] = [];
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    served = await serve(new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      bars: { 2: { kind: 'io', size: 4, read: async () => { await gate; order.push('slow'); return 0xabcd; } } },
    }));
    const client = await served.client();
    const slow = client.regionRead(Region.BAR2, 0n, 2).then((b) => { order.push('slow-reply'); return b; });
    const fast = client.regionRead(Region.CONFIG, 0n, 2).then((b) => { order.push('config-reply'); return b; });
    // The config read has reached the server and waits behind the slow one, not answered natively.
    await until(() => served.server.session?.requestsWaiting === 1);
    expect(served.server.session!.readsAnsweredNatively).toBe(0);
    expect(order).toEqual([]);
    release();
    expect((await slow).readUInt16LE(0)).toBe(0xabcd);
    expect((await fast).readUInt16LE(0)).toBe(1);
    expect(order).toEqual(['slow', 'slow-reply', 'config-reply']);
  });

  test('a throwing device handler answers EIO and fails the device until DEVICE_RESET; the server keeps serving', async () => {
    const errors: Error[] = [];
    served = await serve(new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      bars: { 2: { kind: 'io', size: 4, read: () => { throw new Error('boom'); }, write: async () => { throw new Error('async boom'); } } },
    }), { deviceErrors: 'expected' });
    served.server.on('deviceError', (e) => errors.push(e));
    const client = await served.client();
    await expect(client.regionRead(Region.BAR2, 0n, 1)).rejects.toMatchObject({ errno: Errno.EIO, command: Command.REGION_READ });
    // Failed: config space too is EIO, not answered natively, and nothing reaches the handlers.
    await expect(client.regionRead(Region.CONFIG, 0n, 2)).rejects.toMatchObject({ errno: Errno.EIO });
    await expect(client.regionWrite(Region.BAR2, 0n, Buffer.from([1]))).rejects.toMatchObject({ errno: Errno.EIO });
    expect(errors.map((e) => e.message)).toEqual(['boom']);
    await client.reset();
    expect((await client.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).toBe(1);
    await expect(client.regionWrite(Region.BAR2, 0n, Buffer.from([1]))).rejects.toMatchObject({ errno: Errno.EIO });
    expect(errors.map((e) => e.message)).toEqual(['boom', 'async boom']);
  });
});

describe('config space header', () => {
  test('BAR sizing returns ~(size - 1) with the type bits, then takes the address', async () => {
    served = await serve(new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      bars: { 0: { kind: 'memory', size: 1 << 20, width: 64, prefetchable: true }, 2: { kind: 'io', size: 8 }, 4: { kind: 'memory', size: 4096 } },
    }));
    const client = await served.client();
    const all = Buffer.from([0xff, 0xff, 0xff, 0xff]);
    const bar = async (n: number) => (await client.regionRead(Region.CONFIG, BigInt(0x10 + 4 * n), 4)).readUInt32LE(0);
    for (let n = 0; n < 6; n++) await client.regionWrite(Region.CONFIG, BigInt(0x10 + 4 * n), all);
    expect(await bar(0)).toBe(0xfff0000c); // 64-bit prefetchable, 1 MiB
    expect(await bar(1)).toBe(0xffffffff); // upper half: all ones above the size
    expect(await bar(2)).toBe(0xfffffff9); // I/O, 8 bytes
    expect(await bar(3)).toBe(0); // unimplemented
    expect(await bar(4)).toBe(0xfffff000);
    await client.regionWrite(Region.CONFIG, 0x10n, Buffer.from('0000e0fe', 'hex'));
    expect(await bar(0)).toBe(0xfee0000c);
  });

  test('read-only fields hold, RW bits stick, status errors clear on 1', async () => {
    served = await serve();
    const client = await served.client();
    await client.regionWrite(Region.CONFIG, 0n, Buffer.from([0, 0, 0, 0]));
    expect((await client.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0x0dc8494f);
    await client.regionWrite(Region.CONFIG, 4n, Buffer.from([0xff, 0xff]));
    expect((await client.regionRead(Region.CONFIG, 4n, 2)).readUInt16LE(0)).toBe(0x0547);
    expect((await client.regionRead(Region.CONFIG, 0x3dn, 1))[0]).toBe(1); // INTA
    expect((await client.regionRead(Region.CONFIG, 9n, 3)).toString('hex')).toBe('008011');
    pciFunction(served.device).config.bytes.writeUInt16LE(0x8000, 6);
    await client.regionWrite(Region.CONFIG, 6n, Buffer.from([0x00, 0x80]));
    expect((await client.regionRead(Region.CONFIG, 6n, 2)).readUInt16LE(0)).toBe(0);
  });

  test('DEVICE_RESET restores config space and calls the reset hook', async () => {
    const gpio = await serve();
    served = gpio;
    const client = await served.client();
    await client.regionWrite(Region.CONFIG, 4n, Buffer.from([0x07, 0x00]));
    await client.regionWrite(Region.BAR2, 0n, Buffer.from([0xee]));
    await client.reset();
    expect((await client.regionRead(Region.CONFIG, 4n, 2)).readUInt16LE(0)).toBe(0);
    expect(gpio.device.outputs).toBe(0);
  });
});
