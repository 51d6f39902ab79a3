/**
 * Block I/O between real files and real guest memory: the client maps
 * GuestMemory with DMA_MAP, and the served device's DmaSpace is what the
 * BlockDevice reads into and writes from.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { constants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import {
  BlockDevice,
  BlockDeviceClosedError,
  BlockIoError,
  BlockOpenError,
  BlockQueueFullError,
  DmaAccessError,
  Errno,
  GuestMemory,
  type BlockEngine,
  type DmaSpace,
  type VfioUserClient,
} from '../ts/index.js';
import { native } from '../ts/native.js';
import { testCleanups } from './cleanups.js';
import { DmaTestDevice, PAGE } from './dma-device.js';
import { serve } from './helpers.js';

const cleanups = testCleanups();
const KIB = 1024;

/** Engines to test: the thread engine always, io_uring where this kernel lets us have it. */
const engines: BlockEngine[] = (() => {
  const dir = mkdtempSync(join(tmpdir(), 'block-probe-'));
  writeFileSync(join(dir, 'probe'), Buffer.alloc(PAGE));
  try {
    BlockDevice.open(join(dir, 'probe'), { engine: 'io_uring' }).close();
    return ['io_uring', 'threads'];
  } catch (error) {
    console.warn(`io_uring unavailable here, testing the thread engine only: ${(error as Error).message}`);
    return ['threads'];
  } finally {
    rmSync(dir, { recursive: true });
  }
})();

/** An image of `size` bytes, byte i = (i * 7) & 0xff, in a fresh directory of `under`. */
function image(size: number, under = tmpdir()): string {
  const dir = mkdtempSync(join(under, 'block-'));
  cleanups.defer(() => rmSync(dir, { recursive: true }));
  const path = join(dir, 'disk.img');
  writeFileSync(path, pattern(0, size));
  return path;
}

function pattern(at: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) out[i] = ((at + i) * 7) & 0xff;
  return out;
}

/** toEqual on large Buffers compares element by element: slow. */
function expectBytes(actual: Buffer, expected: Buffer): void {
  if (!actual.equals(expected)) expect(actual).toEqual(expected);
}

function open(path: string, options: Parameters<typeof BlockDevice.open>[1] = {}): BlockDevice {
  const device = BlockDevice.open(path, options);
  cleanups.defer(() => device.close());
  return device;
}

/** A served device with guest memory mapped by fd: `memory` at iova 0x100000 (+ `second` right after, a separate memfd). */
async function guest(pages = 16): Promise<{ dma: DmaSpace; client: VfioUserClient; memory: GuestMemory; second: GuestMemory }> {
  const served = await serve(new DmaTestDevice());
  cleanups.defer(async () => {
    await served.close();
    served.device.bar.close();
  });
  const client = await served.client();
  const memory = cleanups.memory(pages * PAGE);
  const second = cleanups.memory(pages * PAGE);
  await client.dmaMap({ iova: 0x100000n, memory });
  await client.dmaMap({ iova: 0x100000n + BigInt(pages * PAGE), memory: second });
  return { dma: served.device.dma, client, memory, second };
}

describe.each(engines)('block I/O with the %s engine', (engine) => {
  test('a read lands in guest memory along an SG list that spans two DMA windows', async () => {
    const { dma, memory, second } = await guest();
    const block = open(image(256 * KIB), { engine });
    expect([block.engine, block.size, block.alignment, block.readOnly]).toEqual([engine, 256n * 1024n, null, false]);
    const end = 0x100000n + 16n * BigInt(PAGE);
    await block.read(dma, [{ iova: 0x100010n, length: 100 }, { iova: end - 300n, length: 5000 }], 7000n);
    expectBytes(memory.read(0x10, 100), pattern(7000, 100));
    expectBytes(Buffer.concat([memory.read(16 * PAGE - 300, 300), second.read(0, 4700)]), pattern(7100, 5000));
    // The kernel wrote those pages: they are dirty for migration.
    expect(dma.dirtyPages(0x100000n, 2 * PAGE)[0]).toBe(1n);
  });

  test('writes leave from guest memory; flush, discard and write-zeroes complete', async () => {
    const { dma, memory } = await guest();
    const path = image(256 * KIB);
    const block = open(path, { engine });
    memory.write(PAGE, Buffer.from('hello, disk'));
    await block.write(dma, [{ iova: 0x100000n + BigInt(PAGE), length: 11 }], 123n);
    await block.flush();
    await Promise.all([block.discard(64n * 1024n, 8192n), block.writeZeroes(100_000n, 50_000n)]);
    const back = readFileSync(path);
    expect(back.subarray(120, 137)).toEqual(Buffer.concat([pattern(120, 3), Buffer.from('hello, disk'), pattern(134, 3)]));
    expect(back.subarray(64 * KIB, 72 * KIB).every((b) => b === 0)).toBe(true);
    expect(back.subarray(100_000, 150_000).every((b) => b === 0)).toBe(true);
    expectBytes(back.subarray(150_000, 150_010), pattern(150_000, 10));
  });

  test('many requests in flight settle, each with its own data; the depth bounds them', async () => {
    const { dma, memory } = await guest(64);
    const block = open(image(512 * KIB), { engine, queueDepth: 32 });
    const reads = Array.from({ length: 32 }, (_, i) => block.read(dma, [{ iova: 0x100000n + BigInt(i * 2 * PAGE), length: 2 * PAGE }], BigInt(i * 3 * PAGE)));
    expect(block.inFlight).toBe(32);
    await expect(block.read(dma, [{ iova: 0x100000n, length: 16 }], 0n)).rejects.toBeInstanceOf(BlockQueueFullError);
    await Promise.all(reads);
    expect(block.inFlight).toBe(0);
    for (let i = 0; i < 32; i++) expectBytes(memory.read(i * 2 * PAGE, 2 * PAGE), pattern(i * 3 * PAGE, 2 * PAGE));
  });

  test('with a callback, no promise: each request reports once, refusals too, and a callback that throws leaves the others settled', async () => {
    const { dma, memory } = await guest();
    const block = open(image(64 * KIB), { engine, queueDepth: 4 });
    const results: Array<[number, Error | null]> = [];
    let returned = false;
    const all = new Promise<void>((resolve) => {
      const report = (i: number) => (error: Error | null) => {
        expect(returned).toBe(true); // never before read/write returned
        results.push([i, error]);
        if (i === 1) throw new Error('a device bug in a callback');
        if (results.length === 5) resolve();
      };
      for (let i = 0; i < 4; i++) {
        expect(block.read(dma, [{ iova: 0x100000n + BigInt(i * PAGE), length: 100 }], BigInt(i * 1000), report(i))).toBeUndefined();
      }
      // The fifth finds the queue full: refused through its callback, later.
      block.read(dma, [{ iova: 0x100000n, length: 16 }], 0n, report(4));
      returned = true;
    });
    const thrown = new Promise<Error>((resolve) => process.once('uncaughtException', resolve));
    await all;
    expect((await thrown).message).toBe('a device bug in a callback');
    expect(results.map(([i]) => i).sort()).toEqual([0, 1, 2, 3, 4]);
    for (const [i, error] of results) {
      if (i === 4) expect(error).toBeInstanceOf(BlockQueueFullError);
      else {
        expect(error).toBeNull();
        expectBytes(memory.read(i * PAGE, 100), pattern(i * 1000, 100));
      }
    }
    expect(block.inFlight).toBe(0);
    const outside = await new Promise<Error | null>((resolve) => block.read(dma, [{ iova: 0x100000n, length: 16 }], 1n << 40n, resolve));
    expect(outside).toMatchObject({ constructor: BlockIoError, errno: Errno.EINVAL });
  });

  test('guest addresses outside memory or its permissions fail that request alone', async () => {
    const { dma, client, memory } = await guest();
    const readOnly = cleanups.memory(PAGE);
    await client.dmaMap({ iova: 0x900000n, memory: readOnly, writable: false });
    const block = open(image(64 * KIB), { engine });
    const outside = block.read(dma, [{ iova: 0x100000n, length: 16 }, { iova: 0x5000_0000n, length: 16 }], 0n);
    await expect(outside).rejects.toMatchObject({ constructor: DmaAccessError, errno: Errno.EFAULT });
    await expect(block.read(dma, [{ iova: 0x900000n, length: 16 }], 0n)).rejects.toMatchObject({ errno: Errno.EPERM });
    // Nothing of the refused requests was started, and the next one is unaffected.
    expect(block.inFlight).toBe(0);
    await block.read(dma, [{ iova: 0x100000n, length: 16 }], 32n);
    expectBytes(memory.read(0, 16), pattern(32, 16));
  });

  test('requests outside the device, writes to a read-only one and requests after close are refused', async () => {
    const { dma } = await guest();
    const path = image(64 * KIB);
    const block = open(path, { engine });
    await expect(block.read(dma, [{ iova: 0x100000n, length: 16 }], 64n * 1024n - 15n)).rejects.toMatchObject({ constructor: BlockIoError, errno: Errno.EINVAL, op: 'read' });
    await expect(block.writeZeroes(2n ** 63n, 1n)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(() => block.discard(-1n, 1n)).toThrow(/non-negative bigint/);
    const readOnly = open(path, { engine, readOnly: true });
    await expect(readOnly.write(dma, [{ iova: 0x100000n, length: 16 }], 0n)).rejects.toMatchObject({ errno: Errno.EBADF, op: 'write' });
    await expect(readOnly.discard(0n, 4096n)).rejects.toMatchObject({ errno: Errno.EBADF });
    const pending = readOnly.read(dma, [{ iova: 0x100000n, length: 16 }], 0n);
    const closed = readOnly.close();
    await expect(readOnly.flush()).rejects.toBeInstanceOf(BlockDeviceClosedError);
    await pending; // close waits for what is in flight
    await closed;
  });

  test('a window unmapped while a read is in flight stays mapped until the read is done', async () => {
    const { dma, memory } = await guest();
    const block = open(image(64 * KIB), { engine });
    const read = block.read(dma, [{ iova: 0x100000n, length: 64 * KIB }], 0n);
    dma.unmap(0x100000n, 16n * BigInt(PAGE)); // as DMA_UNMAP does
    await read;
    expectBytes(memory.read(0, 64 * KIB), pattern(0, 64 * KIB));
    await expect(block.read(dma, [{ iova: 0x100000n, length: 16 }], 0n)).rejects.toMatchObject({ errno: Errno.EFAULT });
  });

  test('guest memory the client truncated fails the I/O with EFAULT, and the server lives on', async () => {
    const served = await serve(new DmaTestDevice());
    cleanups.defer(async () => {
      await served.close();
      served.device.bar.close();
    });
    const client = await served.client();
    const ram = new GuestMemory(4 * PAGE, { sealSize: false });
    cleanups.defer(() => ram.close());
    await client.dmaMap({ iova: 0x100000n, memory: ram });
    native.truncateFd(ram.fd, BigInt(PAGE));
    const block = open(image(64 * KIB), { engine });
    await expect(block.read(served.device.dma, [{ iova: 0x102000n, length: PAGE }], 0n)).rejects.toMatchObject({ constructor: BlockIoError, errno: Errno.EFAULT });
    await block.read(served.device.dma, [{ iova: 0x100000n, length: 16 }], 16n);
  });
});

describe('opening', () => {
  test('O_DIRECT reports its alignment and refuses misaligned requests', async () => {
    const { dma, memory } = await guest();
    const block = open(image(64 * KIB), { direct: true });
    const { memory: memAlign, offset } = block.alignment!;
    expect(memAlign).toBeGreaterThan(0);
    expect(offset).toBeGreaterThan(0);
    await expect(block.read(dma, [{ iova: 0x100000n, length: PAGE }], BigInt(offset / 2 + 1))).rejects.toMatchObject({ errno: Errno.EINVAL, message: /O_DIRECT/ });
    await block.read(dma, [{ iova: 0x100000n + BigInt(PAGE), length: 2 * PAGE }], BigInt(2 * PAGE));
    expectBytes(memory.read(PAGE, 2 * PAGE), pattern(2 * PAGE, 2 * PAGE));
  });

  test('VFIO_USER_BLOCK_ENGINE=threads forces the thread engine', () => {
    const before = process.env.VFIO_USER_BLOCK_ENGINE;
    process.env.VFIO_USER_BLOCK_ENGINE = 'threads';
    try {
      expect(open(image(PAGE)).engine).toBe('threads');
    } finally {
      if (before === undefined) delete process.env.VFIO_USER_BLOCK_ENGINE;
      else process.env.VFIO_USER_BLOCK_ENGINE = before;
    }
  });

  test('failures to open carry the errno', () => {
    expect(() => BlockDevice.open('/nonexistent/disk.img')).toThrow(expect.objectContaining({ constructor: BlockOpenError, errno: Errno.ENOENT }));
    expect(() => BlockDevice.open(tmpdir())).toThrow(expect.objectContaining({ errno: constants.errno.EISDIR }));
    expect(() => BlockDevice.open(image(PAGE), { queueDepth: 0 })).toThrow(/queueDepth 0/);
  });

  test('memory mapped without an fd is refused with ENOTSUP', async () => {
    const served = await serve(new DmaTestDevice());
    cleanups.defer(async () => {
      await served.close();
      served.device.bar.close();
    });
    const client = await served.client();
    await client.dmaMap({ iova: 0x100000n, memory: cleanups.memory(PAGE), shareFd: false });
    const block = open(image(PAGE));
    await expect(block.read(served.device.dma, [{ iova: 0x100000n, length: 16 }], 0n)).rejects.toMatchObject({ errno: Errno.ENOTSUP });
  });
});
