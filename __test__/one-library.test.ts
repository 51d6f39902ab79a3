/**
 * Two copies of the library in one process (a bundler or loader that
 * duplicates the package): what one copy throws, the other recognises, and
 * `vfio-user serve` gives a device the copy that serves it.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, expect, test, vi } from 'vitest';
import * as first from '../ts/index.js';
import { Errno, PciDevice, Region, connect } from '../ts/index.js';
import { serve, SPAWNING_TEST_MS, STARTED_MS, tempSocketPath, until, type Served } from './helpers.js';
import { NvmeHost } from './nvme-host.js';

const root = join(__dirname, '..');

/** A second, separately evaluated copy of the library's modules. */
async function secondCopy(): Promise<typeof first> {
  vi.resetModules();
  const copy = await import('../ts/index.js');
  expect(copy.DmaAccessError).not.toBe(first.DmaAccessError);
  return copy;
}

let served: Served<PciDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served = undefined;
});

test('an error made by one copy is an instance of the other copy\'s class, and of its ancestors only', async () => {
  const second = await secondCopy();
  const dma = new first.DmaAccessError(Errno.EFAULT, 0x1000n, 8, 'no window');
  expect(dma).toBeInstanceOf(second.DmaAccessError);
  expect(dma).toBeInstanceOf(second.VfioUserError);
  expect(dma).not.toBeInstanceOf(second.UsageError);
  expect(new second.ProtocolError(Errno.EINVAL, 1)).toBeInstanceOf(first.ProtocolError);
  expect(new second.InvalidDeviceError('bars', 'wrong')).toBeInstanceOf(first.UsageError);
  expect(new second.UsageError('x')).not.toBeInstanceOf(first.InvalidDeviceError);
  expect(new Error('plain')).not.toBeInstanceOf(first.VfioUserError);
  // A subclass declared outside the library is an ordinary class: its instances only.
  class Mine extends second.UsageError {}
  expect(new Mine('m')).toBeInstanceOf(first.UsageError);
  expect(new first.UsageError('u')).not.toBeInstanceOf(Mine);
});

test('a device built with another copy: its ProtocolError reaches the client, a DmaAccessError from the server\'s copy is caught by its class', async () => {
  const second = await secondCopy();
  const caught: unknown[] = [];
  const device = new second.PciDevice({
    vendorId: 0x1234, deviceId: 0x5678, classCode: 0,
    bars: {
      2: {
        kind: 'memory', size: 4096,
        read: (offset) => {
          if (offset === 0) throw new second.ProtocolError(Errno.ENOTSUP, first.Command.REGION_READ, 'not this register');
          try {
            device.dma.read(0x1000n, 4);
          } catch (error) {
            if (!(error instanceof second.DmaAccessError)) throw error;
            caught.push(error);
          }
          return 0;
        },
      },
    },
  });
  served = await serve(device as unknown as PciDevice);
  const errors: Error[] = [];
  served.server.on('deviceError', (error) => errors.push(error));
  const client = await served.client();
  await expect(client.regionRead(Region.BAR2, 0n, 4)).rejects.toMatchObject({ errno: Errno.ENOTSUP });
  expect((await client.regionRead(Region.BAR2, 4n, 4)).readUInt32LE(0)).toBe(0);
  expect(caught).toHaveLength(1);
  expect(caught[0]).toBeInstanceOf(first.DmaAccessError);
  expect(errors).toEqual([]);
});

test('vfio-user serve (from dist) gives the device the copy it runs: one copy of the library in the process', { timeout: SPAWNING_TEST_MS }, async () => {
  const socket = tempSocketPath();
  const child = spawn(process.execPath, [join(root, 'dist/ts/cli/main.js'), 'serve', join(__dirname, 'fixtures/library-copies.ts'), '--socket', socket.path], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk));
  try {
    await until(() => stderr.includes('serving'), STARTED_MS);
    const client = await connect(socket.path);
    expect((await client.regionRead(Region.BAR2, 0n, 4)).readUInt32LE(0)).toBe(1);
    client.close();
  } finally {
    child.kill();
    socket.cleanup();
  }
});

test('vfio-user serve examples/nvme (from dist): a Read into memory the guest does not have is Data Transfer Error', { timeout: SPAWNING_TEST_MS }, async () => {
  const socket = tempSocketPath();
  const child = spawn(process.execPath, [join(root, 'dist/ts/cli/main.js'), 'serve', join(root, 'examples/nvme'), '--socket', socket.path, '--', '--size', '1M'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk));
  let host: NvmeHost | undefined;
  try {
    await until(() => stderr.includes('serving'), STARTED_MS);
    host = await NvmeHost.attach(await connect(socket.path));
    await host.enable();
    const [cq, sq] = await host.createIoQueuePair(1, 16);
    expect([cq.status, sq.status]).toEqual([0, 0]);
    // 0x1000 is below the host's guest memory (MEMORY_BASE): no DMA window covers it.
    const read = await host.submit(1, { opcode: 0x02, nsid: 1, prp1: 0x1000n, cdw12: 0 });
    expect(read.status).toBe(0x004);
  } finally {
    host?.close();
    child.kill();
    socket.cleanup();
  }
  expect(stderr).not.toContain('device error');
});
