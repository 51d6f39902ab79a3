/** virtio-console: one port bridged to host streams, driven by the package's virtio driver. */
import { PassThrough } from 'node:stream';
import { describe, expect, test } from 'vitest';
import { featureBit, migrate } from '../ts/index.js';
import { ConsoleFeature, VirtioConsole } from '../examples/virtio-console.js';
import { testCleanups } from './cleanups.js';
import { until } from './helpers.js';
import { drive, serveDestination } from './virtio-helpers.js';

const t = testCleanups();

async function consoleDevice() {
  const input = new PassThrough();
  const output = new PassThrough();
  let written = '';
  output.on('data', (chunk: Buffer) => (written += chunk.toString('latin1')));
  const device = new VirtioConsole();
  device.attachStream(input, output);
  const { driver } = await drive(t, device);
  await driver.initialize();
  return { device, driver, input, output: () => written };
}

describe('virtio-console', () => {
  test('transmit: what the driver sends comes out of the host stream', async () => {
    const { driver, output } = await consoleDevice();
    expect((await driver.queues[1].submit([{ data: Buffer.from('hello, ') }, { data: Buffer.from('host\n') }])).written).toBe(0);
    await until(() => output() === 'hello, host\n');
  });

  test('receive: host input fills the oldest buffers, split across them', async () => {
    const { driver, input } = await consoleDevice();
    const [rx] = driver.queues;
    const first = rx.submit([{ writable: 8 }]);
    const second = rx.submit([{ writable: 8 }]);
    input.write('abcdefghij');
    const [a, b] = await Promise.all([first, second]);
    expect(a.written).toBe(8);
    expect(a.writable[0].toString()).toBe('abcdefgh');
    expect(b.written).toBe(2);
    expect(b.writable[0].subarray(0, 2).toString()).toBe('ij');
  });

  test('input that arrives before any buffer waits for one', async () => {
    const { driver, input, device } = await consoleDevice();
    input.write('early');
    await until(() => input.readableLength === 0);
    const done = await driver.queues[0].submit([{ writable: 16 }]);
    expect(done.writable[0].subarray(0, done.written).toString()).toBe('early');
    expect(device.needsReset).toBeUndefined();
  });

  test('EMERG_WRITE: a byte written to emerg_wr goes out at once', async () => {
    const { driver, output } = await consoleDevice();
    expect(driver.features & featureBit(ConsoleFeature.EMERG_WRITE)).toBe(featureBit(ConsoleFeature.EMERG_WRITE));
    await driver.writeConfig(8, Uint8Array.of(0x21, 0, 0, 0));
    await until(() => output() === '!');
  });

  test('migration carries the receive buffers the device holds; input on the destination fills them', async () => {
    const { driver, device } = await consoleDevice();
    const [rx] = driver.queues;
    const waiting = rx.submit([{ writable: 16 }]);
    await until(() => device.queues[0].pending === 1);
    const input = new PassThrough();
    const { device: destinationDevice, client: to } = await serveDestination(t, new VirtioConsole());
    destinationDevice.attachStream(input, new PassThrough());
    const from = driver.client;
    await driver.moveTo(to); // the destination VMM maps guest memory before the device runs
    await migrate(from, to);
    input.write('after the move');
    const done = await waiting;
    expect(done.writable[0].subarray(0, done.written).toString()).toBe('after the move');
  });

  test('input for a buffer whose client left breaks the device, not the process', async () => {
    const { driver, device, input } = await consoleDevice();
    void driver.queues[0].submit([{ writable: 16 }]).catch(() => undefined);
    await until(() => device.queues[0].pending === 1);
    driver.client.close();
    await until(() => !device.attached);
    input.write('nobody home');
    await until(() => device.needsReset !== undefined);
    expect(device.needsReset?.name).toMatch(/DmaSpaceClosedError|UsageError/);
  });
});
