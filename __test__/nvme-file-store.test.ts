/**
 * examples/nvme with its store off the event loop: commands complete when
 * the store is done (a file through BlockDevice), no more than the store's
 * depth run at once (the rest wait in their SQ), and a shutdown waits for
 * what is running before it flushes.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, test } from 'vitest';
import type { BlockCallback, DmaSpace, SgList } from '../ts/index.js';
import createDevice from '../examples/nvme/index.js';
import { Csts, NvmeController, Register } from '../examples/nvme/controller.js';
import { MemoryStore } from '../examples/nvme/store.js';
import { testCleanups } from './cleanups.js';
import { until } from './helpers.js';
import { attachNvme, Op, S } from './nvme-setup.js';

const cleanups = testCleanups();
const BLOCK = 512;

/** A raw image of `blocks` blocks, block n filled with n & 0xff. */
function image(blocks: number): string {
  const dir = mkdtempSync(join(tmpdir(), 'nvme-store-'));
  cleanups.defer(() => rmSync(dir, { recursive: true }));
  const bytes = Buffer.alloc(blocks * BLOCK);
  for (let n = 0; n < blocks; n++) bytes.fill(n & 0xff, n * BLOCK, (n + 1) * BLOCK);
  const path = join(dir, 'disk.img');
  writeFileSync(path, bytes);
  return path;
}

async function bringUp(device: NvmeController, entries: number) {
  const rig = await attachNvme(cleanups, device);
  expect((await rig.host.enable()) & Csts.RDY).toBe(Csts.RDY);
  expect((await rig.host.createIoQueuePair(1, entries)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
  return rig;
}

test('hundreds of reads from a file at once complete, each with its own block', async () => {
  const { host: h } = await bringUp(createDevice(['--image', image(2048)]), 1024);
  const count = 600;
  const buffer = h.alloc(count * BLOCK);
  // Block 1000 - i into slot i: every read has its own data.
  const reads = Array.from({ length: count }, (_, i) => h.enqueue(1, { opcode: Op.READ, nsid: 1, prp1: buffer + BigInt(i * BLOCK), cdw10: 1000 - i }));
  h.kick(1);
  expect((await Promise.all(reads)).filter((c) => c.status !== S.SUCCESS)).toEqual([]);
  const back = h.read(buffer, count * BLOCK);
  const wrong = Array.from({ length: count }, (_, i) => i).filter((i) => back.subarray(i * BLOCK, (i + 1) * BLOCK).some((b) => b !== ((1000 - i) & 0xff)));
  expect(wrong).toEqual([]);
});

test('a shutdown waits for the writes still running, then flushes; the image holds them', async () => {
  const path = image(300);
  const { host: h } = await bringUp(createDevice(['--image', path]), 64);
  const page = h.alloc(4096);
  h.write(page, Buffer.alloc(4096, 0xee));
  const writes = Array.from({ length: 32 }, (_, i) => h.enqueue(1, { opcode: Op.WRITE, nsid: 1, prp1: page, cdw10: 8 * i, cdw12: 7 }));
  h.kick(1);
  await h.setReg32(Register.CC, (await h.reg32(Register.CC)) | (1 << 14));
  expect((await h.reg32(Register.CSTS)) & Csts.SHST_MASK).toBe(Csts.SHST_COMPLETE);
  // Shutdown complete: every write reached the file before it said so.
  const disk = readFileSync(path);
  expect((await Promise.all(writes)).filter((c) => c.status !== S.SUCCESS)).toEqual([]);
  expect(disk.subarray(0, 32 * 4096).every((b) => b === 0xee)).toBe(true);
  expect(disk[257 * BLOCK]).toBe(1);
});

/** A store whose reads finish only when the test says so. */
class GatedStore extends MemoryStore {
  override readonly queueDepth = 4;
  readonly held: (() => void)[] = [];

  override read(dma: DmaSpace, sg: SgList, position: number, done: BlockCallback): void {
    this.held.push(() => super.read(dma, sg, position, done));
  }
}

test("commands past the store's depth wait in their SQ, and go on as the running ones finish", async () => {
  const store = new GatedStore(1 << 20);
  const { host: h, served } = await bringUp(new NvmeController({ store }), 64);
  const page = h.alloc(4096);
  const reads = Array.from({ length: 10 }, () => h.enqueue(1, { opcode: Op.READ, nsid: 1, prp1: page }));
  h.kick(1);
  // Mapped doorbells (the default) are seen by the watcher, not in the socket's order: wait for the store to fill.
  await until(() => store.held.length === 4);
  await h.reg32(Register.CSTS);
  expect([store.held.length, served.device.sqs[1]!.head]).toEqual([4, 4]);
  // Each finished read lets one more start, at the next turn of the event loop.
  for (let released = 0; released < 10; released++) {
    await until(() => store.held.length > 0);
    expect(store.held.length).toBeLessThanOrEqual(4);
    store.held.shift()!();
  }
  expect((await Promise.all(reads)).every((c) => c.status === S.SUCCESS)).toBe(true);
});
