/**
 * CI fuzzes examples/nvme at the NVMe level in every doorbell mode: the
 * nvme mode's hostile host (random admin and I/O commands with bad fields
 * and PRPs, bogus doorbells, commands cut short) beside the generic pci
 * mode. The controller runs in a child `vfio-user serve`, so a command that
 * wedges it is a finding, not a frozen test. The seed rotates and is
 * printed as in fuzz-examples.test.ts (FUZZ_SEED replays); FUZZ_NVME_OPS
 * sets the operations per mode.
 *
 * What the fuzzer found stays found: its saved reproducers replay here.
 */
import { resolve } from 'node:path';
import { describe, expect, test } from 'vitest';
import { readFileSync } from 'node:fs';
import { formatFinding, fuzzDevice, nvmeMode, type ReproducerFile } from '../ts/fuzz/index.js';
import { rotatingSeed } from './fuzz-seed.js';
import { SPAWNING_TEST_MS } from './helpers.js';

const SEED = rotatingSeed();
/**
 * An NVMe operation costs a few ms (commands complete through the
 * controller's queues; mapped doorbells are polled every millisecond), and
 * each of the three modes starts a child: 1500 operations keep the three
 * well under a minute on two loaded cores.
 */
const OPS = Number(process.env.FUZZ_NVME_OPS ?? 1500);
const nvme = resolve(__dirname, '../examples/nvme');

/** Replays spent shrinking a finding: enough to cut thousands of operations to a handful, within the test's bound. */
const SHRINK_ATTEMPTS = 12;

describe('examples/nvme survives a hostile NVMe host', () => {
  test.each(['trap', 'mmap', 'ioeventfd'])('doorbells %s', async (doorbells) => {
    const report = await fuzzDevice({ module: nvme, args: ['--size', '16M', '--doorbells', doorbells] }, { seed: SEED, ops: OPS, modes: [nvmeMode()], shrinkAttempts: SHRINK_ATTEMPTS });
    console.log(`fuzz nvme --doorbells ${doorbells}: seed ${report.seed}, ${report.ops} operations in ${report.elapsedMs} ms`);
    expect(report.finding, report.finding ? formatFinding(report) : '').toBeUndefined();
    expect(report.ops).toBe(OPS);
    // The host reached the controller's logic: many commands succeeded, and many kinds of error came back.
    const statuses = Object.keys(report.answers).filter((answer) => answer.startsWith('nvme: status'));
    expect(report.answers['nvme: success']).toBeGreaterThan(OPS / 4);
    expect(statuses.length, statuses.join(', ')).toBeGreaterThanOrEqual(5);
  }, SPAWNING_TEST_MS);

  test('ioeventfd doorbells: a kick racing a disconnect after a migration stop and start is served by the next client (a finding, replayed)', async () => {
    // IoEventfd armed its watch inside the request that resumed it, and the next client's kicks went unserved.
    const found = JSON.parse(readFileSync(resolve(__dirname, 'fixtures/fuzz-nvme-ioeventfd.json'), 'utf8')) as ReproducerFile;
    const report = await fuzzDevice({ module: nvme, args: ['--size', '16M', '--doorbells', 'ioeventfd'] }, { replay: found.ops, modes: [nvmeMode()], shrinkAttempts: 0 });
    expect(report.finding, report.finding ? formatFinding(report) : '').toBeUndefined();
    expect(report.ops).toBe(found.ops.length);
  }, SPAWNING_TEST_MS);

  test('mapped doorbells: a ring landing as the client disconnects is no device error (a finding, replayed)', async () => {
    // The controller read the shadow page for a ring batch after its client had gone, and failed;
    // the next client's reset hid it from EIO replies, and only serve's log told.
    const found = JSON.parse(readFileSync(resolve(__dirname, 'fixtures/fuzz-nvme-mmap-disconnect.json'), 'utf8')) as ReproducerFile;
    for (let round = 0; round < 3; round++) {
      const report = await fuzzDevice({ module: nvme, args: ['--size', '16M', '--doorbells', 'mmap'] }, { replay: found.ops, modes: [nvmeMode()], shrinkAttempts: 0 });
      expect(report.finding, report.finding ? formatFinding(report) : '').toBeUndefined();
    }
  }, SPAWNING_TEST_MS);
});
