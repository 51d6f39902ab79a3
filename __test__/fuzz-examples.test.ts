/**
 * CI fuzzes every shipped example (issue 14 item 5): each served in this
 * process to `fuzzDevice()`, whose hostile client must find nothing. The
 * seed rotates (FUZZ_SEED, else the CI run, else the day) and is printed, so
 * a failure replays: FUZZ_SEED=<seed> npx vitest run __test__/fuzz-examples.test.ts.
 * FUZZ_OPS sets the operations per example.
 */
import { describe, expect, test } from 'vitest';
import { formatFinding, fuzzDevice, type FuzzReport } from '../ts/fuzz/index.js';
import createGpio from '../examples/gpio.js';
import createDoorbellDevice from '../examples/msix-device.js';
import createQueueCard from '../examples/nvme-doorbell.js';
import { VirtioConsole } from '../examples/virtio-console.js';
import { VirtioNet } from '../examples/virtio-net/index.js';
import { rotatingSeed } from './fuzz-seed.js';

const SEED = rotatingSeed();
/**
 * 10000 operations per example: 1500-3000 operations a second on two cores
 * at a load of 18 (the three examples in 15 s), several times that idle.
 */
const OPS = Number(process.env.FUZZ_OPS ?? 10_000);

function expectNothingFound(name: string, report: FuzzReport): void {
  // The seed goes to the log either way; a finding prints its reproducer.
  console.log(`fuzz ${name}: seed ${report.seed}, ${report.ops} operations in ${report.elapsedMs} ms`);
  expect(report.finding, report.finding ? formatFinding(report) : '').toBeUndefined();
  expect(report.ops).toBe(OPS);
}

describe('every shipped example survives the fuzzer', () => {
  test.each([
    ['gpio', createGpio],
    ['msix-device', createDoorbellDevice],
    ['nvme-doorbell', createQueueCard],
  ] as const)('%s', async (name, create) => {
    expectNothingFound(name, await fuzzDevice(() => create(), { seed: SEED, ops: OPS }));
  }, 120_000);
});

/**
 * The virtio examples virtio-fuzz.test.ts does not run, unattached to a host
 * stream or a switch, under the generic mode (the virtio mode waits for a
 * used entry after every chain, which receive queues hold until data comes).
 */
describe('every shipped virtio example survives the fuzzer', () => {
  test.each([
    ['virtio-console', () => new VirtioConsole()],
    ['virtio-net', () => new VirtioNet(Buffer.from('020000000001', 'hex'))],
  ] as const)('%s', async (name, create) => {
    expectNothingFound(name, await fuzzDevice(create, { seed: SEED, ops: OPS }));
  }, 120_000);
});
