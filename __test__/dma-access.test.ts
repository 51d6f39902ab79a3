import { afterEach, describe, expect, test } from 'vitest';
import {
  AsyncDmaRequiredError,
  DmaAccessError,
  DmaViewError,
  Errno,
  GuestMemory,
  MAX_VIEW_LENGTH,
  type DmaSpace,
  type SgList,
} from '../ts/index.js';
import { native } from '../ts/native.js';
import { serve, until, type Served } from './helpers.js';
import { DmaTestDevice, PAGE } from './dma-device.js';

let served: Served<DmaTestDevice>;
const memories: GuestMemory[] = [];
afterEach(async () => {
  await served?.close();
  served?.device.bar.close();
  memories.splice(0).forEach((m) => m.close());
});

function memory(size: number, sealSize = true): GuestMemory {
  const m = new GuestMemory(size, { sealSize });
  memories.push(m);
  return m;
}

/**
 * The copy engine: a write to register 0 gives the IOVA of a descriptor
 * { u32 srcCount, u32 dstCount, then (u64 iova, u32 length, u32 pad) entries,
 * sources first }; the device copies sources to destinations and writes 1 to
 * the descriptor's status word (+4 after the entries).
 */
async function copyEngine(_offset: number, data: Buffer, dma: DmaSpace): Promise<void> {
  const desc = data.readBigUInt64LE(0);
  const head = await dma.readAsync(desc, 8);
  const [srcCount, dstCount] = [head.readUInt32LE(0), head.readUInt32LE(4)];
  const entries = await dma.readAsync(desc + 8n, 16 * (srcCount + dstCount));
  const list = (from: number, n: number): SgList => Array.from({ length: n }, (_, i) => ({
    iova: entries.readBigUInt64LE(16 * (from + i)),
    length: entries.readUInt32LE(16 * (from + i) + 8),
  }));
  await dma.copySgAsync(list(srcCount, dstCount), list(0, srcCount));
  await dma.writeAsync(desc + 8n + BigInt(entries.length), Buffer.from([1, 0, 0, 0]));
}

function descriptor(src: SgList, dst: SgList): Buffer {
  const b = Buffer.alloc(8 + 16 * (src.length + dst.length) + 4);
  b.writeUInt32LE(src.length, 0);
  b.writeUInt32LE(dst.length, 4);
  [...src, ...dst].forEach((e, i) => {
    b.writeBigUInt64LE(e.iova, 8 + 16 * i);
    b.writeUInt32LE(e.length, 16 + 16 * i);
  });
  return b;
}

const iovaBytes = (iova: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(iova);
  return b;
};

describe('device access to mapped guest memory', () => {
  test('a device copies between two guest buffers by SG list, across separate maps', async () => {
    served = await serve(new DmaTestDevice());
    served.device.onWrite = copyEngine;
    const client = await served.client();
    // Two maps that are adjacent in IOVA but separate memfds: entries span both.
    const low = memory(64 * 1024);
    const high = memory(64 * 1024);
    await client.dmaMap({ iova: 0x100000n, memory: low });
    await client.dmaMap({ iova: 0x110000n, memory: high });
    const pattern = Buffer.from(Array.from({ length: 40000 }, (_, i) => (i * 7) & 0xff));
    low.write(0x8000, pattern.subarray(0, 0x8000)); // 0x108000..0x110000
    high.write(0, pattern.subarray(0x8000)); // 0x110000..
    const src = [{ iova: 0x108000n, length: 30000 }, { iova: 0x108000n + 30000n, length: 10000 }];
    const dst = [{ iova: 0x101000n, length: 100 }, { iova: 0x113000n, length: 39900 }];
    const desc = descriptor(src, dst);
    low.write(0, desc);
    await client.regionWrite(0, 0n, iovaBytes(0x100000n));
    expect(low.read(desc.length - 4, 4).readUInt32LE(0)).toBe(1);
    expect(Buffer.concat([low.read(0x1000, 100), high.read(0x3000, 39900)])).toEqual(pattern);
    expect(served.device.dma.readSg(dst)).toEqual(pattern);
  });

  test('sync reads, writes and integers by IOVA; errors are typed', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const ram = memory(16 * PAGE);
    await client.dmaMap({ iova: 0x40000n, memory: ram });
    await client.dmaMap({ iova: 0x80000n, memory: ram, size: PAGE, writable: false });
    const dma = served.device.dma;
    dma.writeU8(0x40000n, 0xab);
    dma.writeU16(0x40002n, 0xbeef);
    dma.writeU32(0x40004n, 0xdeadbeef);
    dma.writeU64(0x40008n, 0x0123456789abcdefn);
    expect(ram.read(0, 16).toString('hex')).toBe('ab00efbeefbeaddeefcdab8967452301');
    expect([dma.readU8(0x40000n), dma.readU16(0x40002n), dma.readU32(0x40004n), dma.readU64(0x40008n)])
      .toEqual([0xab, 0xbeef, 0xdeadbeef, 0x0123456789abcdefn]);
    expect(await dma.readAsync(0x40000n, 2)).toEqual(Buffer.from([0xab, 0]));
    expect(() => dma.read(0x50000n, 4)).toThrow(expect.objectContaining({ errno: Errno.EFAULT, iova: 0x50000n }));
    expect(() => dma.read(0x4f000n, 8192)).toThrow(DmaAccessError); // runs off the end of the window
    expect(() => dma.write(0x80000n, Buffer.from([1]))).toThrow(expect.objectContaining({ errno: Errno.EPERM }));
    await expect(dma.writeAsync(0x80000n, Buffer.from([1]))).rejects.toBeInstanceOf(DmaAccessError);
  });

  test('views are zero-copy, mark pages dirty, and are detached by DMA_UNMAP and by disconnect', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const ram = memory(64 * PAGE);
    await client.dmaMap({ iova: 0x200000n, memory: ram });
    const dma = served.device.dma;
    expect([...dma.dirtyPages(0x200000n, 64 * PAGE)]).toEqual([0n]);
    const view = dma.view(0x201000n, 2 * PAGE);
    view[5] = 42;
    expect(ram.read(PAGE + 5, 1)[0]).toBe(42);
    ram.write(PAGE + 6, Buffer.from([43]));
    expect(view[6]).toBe(43);
    dma.write(0x20a000n, Buffer.from([1])); // page 10
    expect(dma.dirtyPages(0x200000n, 64 * PAGE)[0]).toBe(0b10000000110n);
    expect(dma.dirtyPages(0x200000n, 64 * PAGE, true)[0]).toBe(0b10000000110n);
    // The live view's pages stay dirty (its stores cannot be seen); page 10 was cleared.
    expect(dma.dirtyPages(0x200000n, 64 * PAGE)[0]).toBe(0b110n);

    await client.dmaUnmap(0x200000n, BigInt(64 * PAGE));
    // Node's behaviour for a detached ArrayBuffer: length 0, reads undefined, writes dropped.
    expect(view.byteLength).toBe(0);
    expect(view.buffer.byteLength).toBe(0);
    expect(view[5]).toBeUndefined();
    view[5] = 1;
    expect(view[5]).toBeUndefined();
    expect(() => new DataView(view.buffer)).toThrow(TypeError);

    await client.dmaMap({ iova: 0x200000n, memory: ram });
    const again = served.device.dma.view(0x200000n, PAGE);
    expect(again[PAGE - PAGE + 0]).toBe(ram.read(0, 1)[0]);
    client.close();
    await until(() => again.byteLength === 0);
  });

  test('withView lends a view for one call and marks its pages dirty, sealed or not', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const sealed = memory(16 * PAGE);
    const unsealed = memory(16 * PAGE, false);
    await client.dmaMap({ iova: 0x200000n, memory: sealed });
    await client.dmaMap({ iova: 0x300000n, memory: unsealed });
    const dma = served.device.dma;
    for (const [iova, ram] of [[0x200000n, sealed], [0x300000n, unsealed]] as const) {
      expect(dma.withView(iova + BigInt(PAGE) + 10n, 2 * PAGE, (view) => {
        expect(view.byteLength).toBe(2 * PAGE);
        view[0] = 7;
        view[2 * PAGE - 1] = 9;
        return view[0] + 1;
      })).toBe(8);
      expect([ram.read(PAGE + 10, 1)[0], ram.read(3 * PAGE + 9, 1)[0]]).toEqual([7, 9]);
      expect(dma.dirtyPages(iova, 16 * PAGE, true)[0] & 0b1110n).toBe(0b1110n);
    }
    expect(() => dma.withView(0x200000n + BigInt(15 * PAGE), 2 * PAGE, () => 0)).toThrow(DmaAccessError);
    expect(() => dma.withView(0x900000n, 1, () => 0)).toThrow(DmaAccessError);
    // Plain access (withView free, nothing can fault): only inside one sealed, writable window.
    expect(dma.hasPlainAccess(0x200000n, 16 * PAGE)).toBe(true);
    expect(dma.hasPlainAccess(0x300000n, PAGE)).toBe(false);
    expect(dma.hasPlainAccess(0x200000n + BigInt(15 * PAGE), 2 * PAGE)).toBe(false);
    expect(dma.hasPlainAccess(0x900000n, 1)).toBe(false);
    const readOnly = memory(PAGE);
    await client.dmaMap({ iova: 0x400000n, memory: readOnly, writable: false });
    expect(dma.hasPlainAccess(0x400000n, PAGE)).toBe(false);
  });

  test('views are refused with a typed reason where they cannot be safe', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const ram = memory(4 * PAGE);
    await client.dmaMap({ iova: 0x10000n, memory: ram, size: PAGE, writable: false });
    await client.dmaMap({ iova: 0x11000n, memory: ram, offset: PAGE, size: PAGE });
    await client.dmaMap({ iova: 0x12000n, memory: ram, offset: 2 * PAGE, size: PAGE, shareFd: false });
    const dma = served.device.dma;
    const reason = (f: () => unknown) => {
      try {
        f();
      } catch (error) {
        return error instanceof DmaViewError ? error.reason : error;
      }
    };
    expect(reason(() => dma.view(0x10000n, 16))).toBe('read-only');
    expect(reason(() => dma.view(0x11000n, PAGE + 1))).toBe('spans-windows');
    expect(reason(() => dma.view(0x12000n, 16))).toBe('message-based');
    expect(reason(() => dma.view(0x11000n, MAX_VIEW_LENGTH + 1))).toBe('too-large');
    expect(reason(() => dma.view(0x90000n, 16))).toBeInstanceOf(DmaAccessError);
    expect(() => dma.read(0x12000n, 4)).toThrow(AsyncDmaRequiredError);
  });

  test('a client that truncates its backing file gets EFAULT from the helpers, not a dead server', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    // Unsealed, unlike QEMU's RAM (and ours by default), so it can shrink.
    const ram = memory(4 * PAGE, false);
    await client.dmaMap({ iova: 0x100000n, memory: ram });
    const dma = served.device.dma;
    expect(dma.find(0x100000n, 1)!.mapping!.sizeSealed).toBe(false);
    dma.write(0x100000n, Buffer.from('fine'));
    native.truncateFd(ram.fd, BigInt(PAGE));
    expect(() => dma.read(0x102000n, 16)).toThrow(expect.objectContaining({ errno: Errno.EFAULT }));
    expect(() => dma.writeU32(0x103ffcn, 1)).toThrow(expect.objectContaining({ errno: Errno.EFAULT }));
    expect(() => dma.copySg([{ iova: 0x102000n, length: 8 }], [{ iova: 0x100000n, length: 8 }])).toThrow(DmaAccessError);
    await expect(dma.readAsync(0x101000n, 8)).rejects.toMatchObject({ errno: Errno.EFAULT });
    expect(dma.read(0x100000n, 4).toString()).toBe('fine'); // the first page still exists
    // The session is alive and well.
    expect((await client.regionRead(0, BigInt(PAGE), 4)).length).toBe(4);
  });
});
