/**
 * The fuzzer finds what it exists to find: devices with a bug planted behind
 * a crafted input (fixtures/fuzz-planted.ts), served by a child `vfio-user
 * serve` so that neither the throw nor the loop takes the test down (and
 * in this process, a throw from work deferred through the device's
 * DeviceContext). Each
 * must come back with the seed and a reproducer shrunk to the crafted write,
 * and replaying that reproducer must fail the same way. And a device that
 * leaks an fd per write is caught by the check at rest.
 */
import { resolve } from 'node:path';
import { describe, expect, test } from 'vitest';
import { fuzzDevice, type FuzzOp } from '../ts/fuzz/index.js';
import { PciDevice } from '../ts/index.js';
import { native } from '../ts/native.js';
import { plantedDevice, TRIGGER_BIT, TRIGGER_REGISTER } from './fixtures/fuzz-planted.js';
import { SPAWNING_TEST_MS } from './helpers.js';

const planted = resolve(__dirname, 'fixtures/fuzz-planted.ts');
/** A seed whose sequence reaches the crafted write early (any seed does, sooner or later). */
const SEED = 7;
/**
 * The loop is found by the missing reply: any deadline finds it, a short
 * one sooner. QEMU's 5 s, so that a slow reply on a loaded machine is not
 * mistaken for it.
 */
const DEADLINE_MS = 5000;

function isCraftedWrite(op: FuzzOp): boolean {
  if (op.kind !== 'region-write' || op.region !== 0 || BigInt(op.offset as string) !== BigInt(TRIGGER_REGISTER)) return false;
  return (Buffer.from(op.data as string, 'hex')[0] & TRIGGER_BIT) !== 0;
}

describe('planted bugs', () => {
  test('a device that throws from a timer: the fuzzer names the write', async () => {
    const report = await fuzzDevice({ module: planted, args: ['--bug', 'timer'] }, { seed: SEED, ops: 2000, deadlineMs: DEADLINE_MS });
    expect(report.seed).toBe(SEED);
    // The process dies of it, or (with serve's error boundary) fails the device: either is found.
    expect(['disconnected', 'device-error']).toContain(report.finding?.kind);
    expect(report.finding?.serverOutput).toContain('planted: thrown from a timer');
    expect(report.finding?.confirmed).toBe(true);
    expect(report.finding?.reproducer).toHaveLength(1);
    expect(isCraftedWrite(report.finding!.reproducer[0])).toBe(true);
    const replay = await fuzzDevice({ module: planted, args: ['--bug', 'timer'] }, { replay: report.finding!.reproducer, deadlineMs: DEADLINE_MS, shrinkAttempts: 0 });
    expect(replay.finding?.kind).toBe(report.finding?.kind);
  }, SPAWNING_TEST_MS);

  test('in this process: a throw from work deferred through the DeviceContext is a deviceError, named with its write', async () => {
    const report = await fuzzDevice(() => plantedDevice('deferred'), { seed: SEED, ops: 2000 });
    expect(report.finding?.kind).toBe('device-error');
    expect(report.finding?.message).toContain('planted: thrown from deferred work');
    expect(report.finding?.confirmed).toBe(true);
    expect(report.finding?.reproducer).toHaveLength(1);
    expect(isCraftedWrite(report.finding!.reproducer[0])).toBe(true);
  });

  test('a device that loops forever on a crafted write: the missing reply is found within the deadline', async () => {
    const report = await fuzzDevice({ module: planted, args: ['--bug', 'loop'] }, { seed: SEED, ops: 2000, deadlineMs: DEADLINE_MS });
    expect(report.finding?.kind).toBe('unanswered');
    expect(report.finding?.message).toContain('busy');
    expect(report.finding?.confirmed).toBe(true);
    expect(report.finding?.reproducer).toHaveLength(1);
    expect(isCraftedWrite(report.finding!.reproducer[0])).toBe(true);
  }, SPAWNING_TEST_MS);
});

describe('planted leak', () => {
  test('a device that keeps an fd per register write: the fds at rest grow, and the fuzzer says so', async () => {
    const leaked: number[] = [];
    const leaky = () => new PciDevice({
      vendorId: 0x1234, deviceId: 0xf023, classCode: 0xff0000,
      bars: { 0: { kind: 'memory', size: 16, write: () => void leaked.push(native.eventfdCreate()) } },
    });
    try {
      // The check at rest runs every 2500 operations and at the end.
      const report = await fuzzDevice(leaky, { seed: SEED, ops: 2600, shrinkAttempts: 0 });
      expect(report.finding?.kind).toBe('leak');
      expect(report.finding?.message).toMatch(/holds \d+ fds at rest, \d+ at the start/);
    } finally {
      for (const fd of leaked) native.closeFd(fd);
    }
  });
});
