/**
 * The error boundary around device code (ts/boundary.ts): what device code
 * throws, in a handler or in work it scheduled, fails the device, never the
 * process; the client gets EIO until a reset, and the next client finds the
 * device reset.
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { connect, Errno, PciDevice, Region } from '../ts/index.js';
import { serve, SPAWNING_TEST_MS, STARTED_MS, tempSocketPath, until, type Served } from './helpers.js';

let served: Served<PciDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served?.device.close();
  served = undefined;
});

/** A device whose BAR2 write of `n` runs `actions[n]` (device code), and whose reset hook counts. */
function device(actions: Record<number, (d: PciDevice) => void>): PciDevice & { resets: number } {
  const d = new PciDevice({
    vendorId: 0x1234, deviceId: 0x5678, classCode: 0,
    bars: {
      0: { kind: 'memory', size: 4096, ioeventfds: [{ offset: 0x10, size: 4 }] },
      2: { kind: 'memory', size: 4096, read: () => d.resets, write: (_offset, data) => actions[data[0]]?.(d) },
    },
    onReset: () => void d.resets++,
  }) as PciDevice & { resets: number };
  d.resets = 0;
  return d;
}

async function deviceErrors(s: Served<PciDevice>): Promise<{ errors: { error: Error; command: number | undefined }[] }> {
  const seen = { errors: [] as { error: Error; command: number | undefined }[] };
  s.server.on('deviceError', (error, command) => seen.errors.push({ error, command }));
  return seen;
}

test('a context timer that throws: deviceError with the device\'s stack, EIO until reset, the next client gets a reset device', async () => {
  served = await serve(device({ 1: (d) => d.context.setTimeout(function timerOfTheDevice() { throw new Error('timer failed'); }, 1) }), { deviceErrors: 'expected' });
  const seen = await deviceErrors(served);
  const client = await served.client();
  await client.regionWrite(Region.BAR2, 0n, Buffer.from([1]));
  await until(() => seen.errors.length > 0);
  expect(seen.errors[0].command).toBeUndefined();
  expect(seen.errors[0].error.message).toBe('timer failed');
  expect(seen.errors[0].error.stack).toContain('timerOfTheDevice');
  expect(served.device.context.failed).toBe(true);
  await expect(client.regionRead(Region.BAR2, 0n, 4)).rejects.toMatchObject({ errno: Errno.EIO });
  await expect(client.regionRead(Region.CONFIG, 0n, 2)).rejects.toMatchObject({ errno: Errno.EIO });
  client.close();
  await until(() => served!.server.session === undefined);
  const next = await served.client();
  expect((await next.regionRead(Region.BAR2, 0n, 4)).readUInt32LE(0)).toBe(1);
  expect(served.device.context.failed).toBe(false);
  expect(seen.errors).toHaveLength(1);
});

test('work scheduled before a failure is dropped: neither a pending timeout nor an interval runs', async () => {
  const ran: string[] = [];
  served = await serve(device({
    1: (d) => {
      d.context.setTimeout(() => ran.push('timeout'), 5);
      d.context.setInterval(() => ran.push('interval'), 5);
      d.context.run(() => { throw new Error('now'); });
      // Scheduled after the device's timers with the same delay, twice: runs after two of their turns.
      setTimeout(() => setTimeout(() => ran.push('after'), 5), 5);
    },
  }), { deviceErrors: 'expected' });
  const client = await served.client();
  await client.regionWrite(Region.BAR2, 0n, Buffer.from([1]));
  await until(() => ran.length > 0);
  expect(ran).toEqual(['after']);
});

test('async work that rejects, and an ioeventfd listener that throws, fail the device and not the process', async () => {
  served = await serve(device({ 1: (d) => d.context.run(async () => { await Promise.resolve(); throw new Error('async work failed'); }) }), { deviceErrors: 'expected' });
  const seen = await deviceErrors(served);
  const kick = served.device.bar(0).ioeventfds[0];
  kick.on('signal', () => { throw new Error('listener failed'); });
  const client = await served.client();
  await client.regionWrite(Region.BAR2, 0n, Buffer.from([1]));
  await until(() => seen.errors.length === 1);
  expect(seen.errors[0].error.message).toBe('async work failed');
  await client.reset();
  expect(served.device.context.failed).toBe(false);
  kick.signal();
  await until(() => seen.errors.length === 2);
  expect(seen.errors[1].error.message).toBe('listener failed');
  expect(served.device.context.failed).toBe(true);
});

test('vfio-user serve: a plain timer\'s exception and an unhandled rejection of device code fail the device, logged; the process lives', { timeout: SPAWNING_TEST_MS }, async () => {
  const socket = tempSocketPath();
  const child = spawn(process.execPath, [join(__dirname, '../dist/ts/cli/main.js'), 'serve', join(__dirname, 'fixtures/own-timer-device.ts'), '--socket', socket.path], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk));
  const exited = once(child, 'exit');
  try {
    await until(() => stderr.includes('serving'), STARTED_MS);
    for (const [byte, message] of [[1, 'thrown by a plain timer'], [2, 'rejected by a plain promise']] as const) {
      const client = await connect(socket.path);
      const resets = (await client.regionRead(Region.BAR2, 0n, 4)).readUInt32LE(0);
      await client.regionWrite(Region.BAR2, 0n, Buffer.from([byte]));
      await until(() => stderr.includes(message));
      await expect(client.regionRead(Region.BAR2, 0n, 4)).rejects.toMatchObject({ errno: Errno.EIO });
      client.close();
      const next = await connect(socket.path);
      expect((await next.regionRead(Region.BAR2, 0n, 4)).readUInt32LE(0)).toBe(resets + 1);
      next.close();
    }
    expect(child.exitCode).toBeNull();
  } finally {
    child.kill();
    await exited;
    socket.cleanup();
  }
  expect(stderr).toMatch(/device error in device code running on its own .*thrown by a plain timer\n\s+at .*own-timer-device\.ts:\d+/);
});

test('the test helper fails a test whose device threw where it expected no deviceError', async () => {
  const unexpected = await serve(device({ 1: () => { throw new Error('not expected'); } }));
  const client = await unexpected.client();
  await expect(client.regionWrite(Region.BAR2, 0n, Buffer.from([1]))).rejects.toMatchObject({ errno: Errno.EIO });
  await expect(unexpected.close()).rejects.toThrow(/deviceError.*not expected/s);
  unexpected.device.close();
});
