/**
 * The virtio examples under the virtio fuzz mode (a hostile driver beside
 * the generic PCI one): nothing found. The seed rotates as in
 * fuzz-examples.test.ts and is printed; FUZZ_SEED=<seed> replays it.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { formatFinding, fuzzDevice, type FuzzReport } from '../ts/fuzz/index.js';
import { BlockDevice, VirtioDevice, virtioMode } from '../ts/index.js';
import { VirtioRng } from '../examples/virtio-rng.js';
import { VirtioConsole } from '../examples/virtio-console.js';
import { VirtioNet } from '../examples/virtio-net/index.js';
import { VirtioBlk } from '../examples/virtio-blk/index.js';
import { testCleanups } from './cleanups.js';

const t = testCleanups();
const SEED = process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) >>> 0 : Math.floor(Date.now() / 86_400_000) >>> 0;
const OPS = Number(process.env.FUZZ_OPS ?? 400);

function expectNothingFound(name: string, report: FuzzReport): void {
  console.log(`virtio fuzz ${name}: seed ${report.seed}, ${report.ops} operations in ${report.elapsedMs} ms`);
  expect(report.finding, report.finding ? formatFinding(report) : '').toBeUndefined();
  expect(report.ops).toBe(OPS);
}

describe('the virtio fuzz mode', () => {
  test('virtio-rng', async () => {
    expectNothingFound('virtio-rng', await fuzzDevice(() => new VirtioRng(), { seed: SEED, ops: OPS, modes: [virtioMode()] }));
  }, 120_000);

  // The fuzzer notifies by REGION_WRITE: on a mapped page those land in the watched words, and 'avail' watches the rings too.
  test.each(['mmap', 'ioeventfd', 'avail'] as const)('virtio-rng notified by %s', async (notify) => {
    expectNothingFound(`virtio-rng (${notify})`, await fuzzDevice(() => new VirtioRng({ notify }), { seed: SEED, ops: OPS, modes: [virtioMode()] }));
  }, 120_000);

  test('virtio-blk, two queues', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'virtio-fuzz-'));
    t.defer(() => rmSync(dir, { recursive: true, force: true }));
    const image = join(dir, 'disk.img');
    writeFileSync(image, Buffer.alloc(1 << 20));
    const create = () => new VirtioBlk(BlockDevice.open(image), { queues: 2 });
    expectNothingFound('virtio-blk', await fuzzDevice(create, { seed: SEED, ops: OPS, modes: [virtioMode()] }));
  }, 120_000);

  test('virtio-console and virtio-net (their receive queues keep chains: only the other queues owe an answer)', async () => {
    expectNothingFound('virtio-console', await fuzzDevice(() => new VirtioConsole(), { seed: SEED, ops: OPS, modes: [virtioMode()] }));
    expectNothingFound('virtio-net', await fuzzDevice(() => new VirtioNet(Buffer.from('525400000001', 'hex')), { seed: SEED, ops: OPS, modes: [virtioMode()] }));
  }, 120_000);

  test('finds a device that takes chains and never answers them', async () => {
    const forgetful = () => new VirtioDevice({ deviceId: 4, queues: [{ size: 64 }], onQueue: (q) => { while (q.pop()); } });
    const report = await fuzzDevice(forgetful, { seed: SEED, ops: 200, modes: [virtioMode()], deadlineMs: 500, shrinkAttempts: 2 });
    expect(report.finding?.kind).toBe('stalled');
    expect(report.finding?.message).toMatch(/a used entry or NEEDS_RESET after a chain/);
  }, 60_000);
});
