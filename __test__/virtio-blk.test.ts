/** virtio-blk over a file, driven by the package's virtio driver over a real socket and memfd guest memory. */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { BlockDevice, featureBit, VirtioStatus as S, type DriverQueue, type InitOptions } from '../ts/index.js';
import { BlkFeature, BlkRequest as R, BlkStatus, SECTOR, VirtioBlk, type VirtioBlkOptions } from '../examples/virtio-blk/index.js';
import { testCleanups } from './cleanups.js';
import { drive } from './virtio-helpers.js';

const t = testCleanups();
const DISK = 1 << 20;

async function blk(options: VirtioBlkOptions = {}, image?: Buffer, init: InitOptions = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'virtio-blk-'));
  t.defer(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'disk.img');
  writeFileSync(path, image ?? Buffer.alloc(DISK));
  const device = new VirtioBlk(BlockDevice.open(path, { readOnly: options.readOnly ?? false }), { serial: 'vfio-user-blk-0', ...options });
  const { driver } = await drive(t, device);
  await driver.initialize(init);
  return { path, device, driver };
}

function header(type: number, sector = 0n): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32LE(type, 0);
  h.writeBigUInt64LE(sector, 8);
  return h;
}

/** One request: header, data out or `read` bytes in, status. */
async function request(q: DriverQueue, type: number, sector: bigint, io: { data?: Uint8Array; read?: number } = {}) {
  const done = await q.submit([
    { data: header(type, sector) },
    ...(io.data ? [{ data: io.data }] : []),
    ...(io.read ? [{ writable: io.read }] : []),
    { writable: 1 },
  ]);
  const status = done.writable[done.writable.length - 1][0];
  return { status, written: done.written, data: io.read ? done.writable[0] : undefined };
}

function segment(sector: bigint, count: number, flags = 0): Buffer {
  const s = Buffer.alloc(16);
  s.writeBigUInt64LE(sector, 0);
  s.writeUInt32LE(count, 8);
  s.writeUInt32LE(flags, 12);
  return s;
}

function pattern(length: number, seed: number): Buffer {
  const bytes = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 7 + seed) & 0xff;
  return bytes;
}

describe('virtio-blk', () => {
  test('config and features: capacity, block size, flush, discard, write-zeroes', async () => {
    const { driver } = await blk();
    const config = await driver.readConfig(0, 60);
    expect(config.readBigUInt64LE(0)).toBe(BigInt(DISK / SECTOR));
    expect(config.readUInt32LE(20)).toBe(SECTOR);
    expect(config.readUInt16LE(34)).toBe(1);
    for (const bit of [BlkFeature.FLUSH, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES, BlkFeature.BLK_SIZE]) {
      expect(driver.features & featureBit(bit)).toBe(featureBit(bit));
    }
    expect(driver.features & featureBit(BlkFeature.RO)).toBe(0n);
  });

  test('a write lands in the file and reads back; the used length counts data and status', async () => {
    const { driver, path } = await blk();
    const [q] = driver.queues;
    const data = pattern(8192, 3);
    expect(await request(q, R.OUT, 8n, { data })).toMatchObject({ status: BlkStatus.OK, written: 1 });
    expect(readFileSync(path).subarray(8 * SECTOR, 8 * SECTOR + 8192).equals(data)).toBe(true);
    const read = await request(q, R.IN, 8n, { read: 8192 });
    expect(read).toMatchObject({ status: BlkStatus.OK, written: 8193 });
    expect(read.data!.equals(data)).toBe(true);
    expect((await request(q, R.FLUSH, 0n)).status).toBe(BlkStatus.OK);
  });

  test('a driver keeps 32 reads of 4 KiB outstanding for 640 requests: its buffer area is reused as chains are used', async () => {
    const image = pattern(DISK, 3);
    const { driver } = await blk({}, image, { bufferBytes: 160 * 1024 });
    const [q] = driver.queues;
    let next = 0;
    let checked = 0;
    const one = async (): Promise<void> => {
      while (next < 640) {
        const sector = BigInt((next++ * 8) % (DISK / SECTOR));
        const { status, data } = await request(q, R.IN, sector, { read: 4096 });
        expect(status).toBe(BlkStatus.OK);
        expect(data!.equals(image.subarray(Number(sector) * SECTOR, Number(sector) * SECTOR + 4096))).toBe(true);
        checked++;
      }
    };
    await Promise.all(Array.from({ length: 32 }, one));
    expect(checked).toBe(640);
    expect(q.outstanding).toBe(0);
  });

  test('any layout: header, data and status in one chain of odd-sized buffers', async () => {
    const { driver } = await blk({}, pattern(DISK, 9));
    const [q] = driver.queues;
    // Header and the first 100 bytes of nothing special: the device reads by byte offset.
    const done = await q.submit([{ data: header(R.IN, 2n) }, { writable: 100 }, { writable: 413 }]);
    expect(done.writable[done.writable.length - 1][512 - 100]).toBe(BlkStatus.OK);
    expect(Buffer.concat(done.writable).subarray(0, 512).equals(pattern(DISK, 9).subarray(1024, 1536))).toBe(true);
  });

  test('requests outside the disk, misaligned lengths and unknown types fail alone', async () => {
    const { driver, device } = await blk();
    const [q] = driver.queues;
    expect((await request(q, R.IN, BigInt(DISK / SECTOR), { read: 512 })).status).toBe(BlkStatus.IOERR);
    expect((await request(q, R.IN, 2n ** 63n, { read: 512 })).status).toBe(BlkStatus.IOERR);
    // Ends past the disk by one sector; a sector whose low word alone is inside it.
    expect((await request(q, R.IN, BigInt(DISK / SECTOR - 1), { read: 1024 })).status).toBe(BlkStatus.IOERR);
    expect((await request(q, R.IN, 2n ** 32n, { read: 512 })).status).toBe(BlkStatus.IOERR);
    expect((await request(q, R.OUT, 0n, { data: Buffer.alloc(100) })).status).toBe(BlkStatus.IOERR);
    expect((await request(q, 99, 0n)).status).toBe(BlkStatus.UNSUPP);
    expect((await request(q, R.WRITE_ZEROES, 0n, { data: segment(0n, 1, 2) })).status).toBe(BlkStatus.UNSUPP);
    expect(device.needsReset).toBeUndefined();
    expect((await request(q, R.IN, 0n, { read: 512 })).status).toBe(BlkStatus.OK);
  });

  test('discard and write-zeroes make ranges read as zeros', async () => {
    const { driver, path } = await blk({}, pattern(DISK, 1));
    const [q] = driver.queues;
    expect((await request(q, R.DISCARD, 0n, { data: Buffer.concat([segment(0n, 8), segment(64n, 16)]) })).status).toBe(BlkStatus.OK);
    expect((await request(q, R.WRITE_ZEROES, 0n, { data: segment(200n, 3) })).status).toBe(BlkStatus.OK);
    expect((await request(q, R.WRITE_ZEROES, 0n, { data: segment(300n, 2, 1) })).status).toBe(BlkStatus.OK);
    const file = readFileSync(path);
    const zero = (from: number, count: number) => file.subarray(from * SECTOR, (from + count) * SECTOR).every((b) => b === 0);
    expect([zero(0, 8), zero(64, 16), zero(200, 3), zero(300, 2)]).toEqual([true, true, true, true]);
    expect(file.subarray(8 * SECTOR, 64 * SECTOR).equals(pattern(DISK, 1).subarray(8 * SECTOR, 64 * SECTOR))).toBe(true);
    // A list with one bad segment changes nothing.
    expect((await request(q, R.DISCARD, 0n, { data: Buffer.concat([segment(400n, 1), segment(BigInt(DISK / SECTOR), 1)]) })).status).toBe(BlkStatus.IOERR);
    expect(readFileSync(path).subarray(400 * SECTOR, 401 * SECTOR).equals(pattern(DISK, 1).subarray(400 * SECTOR, 401 * SECTOR))).toBe(true);
  });

  test('read-only: offered as VIRTIO_BLK_F_RO, every change fails, reads work', async () => {
    const { driver } = await blk({ readOnly: true }, pattern(DISK, 5));
    expect(driver.features & featureBit(BlkFeature.RO)).toBe(featureBit(BlkFeature.RO));
    const [q] = driver.queues;
    expect((await request(q, R.OUT, 0n, { data: Buffer.alloc(512) })).status).toBe(BlkStatus.IOERR);
    expect((await request(q, R.DISCARD, 0n, { data: segment(0n, 1) })).status).toBe(BlkStatus.IOERR);
    const read = await request(q, R.IN, 0n, { read: 512 });
    expect(read.data!.equals(pattern(DISK, 5).subarray(0, 512))).toBe(true);
  });

  test('GET_ID answers the serial, zero-padded to 20 bytes', async () => {
    const { driver } = await blk({ serial: 'SN-1234' });
    const id = await request(driver.queues[0], R.GET_ID, 0n, { read: 20 });
    expect(id.status).toBe(BlkStatus.OK);
    expect(id.data!.toString('latin1')).toBe('SN-1234'.padEnd(20, '\0'));
  });

  test('multiple queues: each takes requests at once, each interrupts on its own vector', async () => {
    const { driver } = await blk({ queues: 4 });
    expect(driver.features & featureBit(BlkFeature.MQ)).toBe(featureBit(BlkFeature.MQ));
    expect((await driver.readConfig(34, 2)).readUInt16LE(0)).toBe(4);
    expect(driver.queues.length).toBe(4);
    await Promise.all(driver.queues.map((q, i) => request(q, R.OUT, BigInt(16 * i), { data: pattern(4096, i) })));
    const reads = await Promise.all(driver.queues.map((q, i) => request(q, R.IN, BigInt(16 * i), { read: 4096 })));
    reads.forEach((r, i) => expect(r.data!.equals(pattern(4096, i))).toBe(true));
  });

  test('a chain with no room for the header breaks the device (NEEDS_RESET), the process lives on', async () => {
    const { driver, device } = await blk();
    const configChange = driver.vectors[0].next();
    void driver.queues[0].submit([{ data: Buffer.alloc(8) }, { writable: 1 }]);
    await configChange;
    expect((await driver.status()) & S.NEEDS_RESET).toBe(S.NEEDS_RESET);
    expect(device.needsReset?.message).toMatch(/no room for the header/);
  });
});
