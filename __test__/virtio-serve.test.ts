/** The virtio examples as users run them: `vfio-user serve examples/virtio-<name>`, driven from another process. */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createConnection } from 'node:net';
import { once } from 'node:events';
import { describe, expect, test } from 'vitest';
import { connect, VirtioDriver } from '../ts/index.js';
import { testCleanups } from './cleanups.js';
import { SPAWNING_TEST_MS, STARTED_MS, tempSocketPath, until } from './helpers.js';
import { GUEST_MEMORY } from './virtio-helpers.js';
import { L2Switch } from '../examples/virtio-net/index.js';

const t = testCleanups();
const root = join(__dirname, '..');

/** Serves `example` with `args` in a child process; returns a driver (not initialized) of it. */
async function served(example: string, args: string[] = []): Promise<VirtioDriver> {
  const socket = tempSocketPath();
  t.defer(() => socket.cleanup());
  const cli = ['--import', 'tsx', join(root, 'ts/cli/main.ts'), 'serve', join(root, 'examples', example), '--socket', socket.path, '--', ...args];
  const child = spawn(process.execPath, cli, { cwd: root, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  t.defer(async () => {
    child.kill('SIGTERM');
    if (child.exitCode === null) await new Promise((r) => child.on('exit', r));
  });
  await until(() => existsSync(socket.path) || child.exitCode !== null, STARTED_MS);
  if (child.exitCode !== null) throw new Error(`serve exited: ${stderr}`);
  const client = await connect(socket.path, { timeoutMs: STARTED_MS });
  t.defer(() => client.close());
  const driver = await VirtioDriver.connect(client, { memory: t.memory(GUEST_MEMORY) });
  t.defer(() => driver.close());
  return driver;
}

describe('vfio-user serve', { timeout: SPAWNING_TEST_MS }, () => {
  test('examples/virtio-rng', async () => {
    const driver = await served('virtio-rng');
    await driver.initialize();
    const done = await driver.queues[0].submit([{ writable: 256 }]);
    expect(done.written).toBe(256);
    expect(new Set(done.writable[0]).size).toBeGreaterThan(64);
  });

  test('examples/virtio-blk -- --image FILE --queues 2 --serial ID', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'virtio-serve-'));
    t.defer(() => rmSync(dir, { recursive: true, force: true }));
    const image = join(dir, 'disk.img');
    writeFileSync(image, Buffer.alloc(64 * 1024));
    const driver = await served('virtio-blk', ['--image', image, '--queues', '2', '--serial', 'served-1']);
    await driver.initialize();
    expect(driver.queues.length).toBe(2);
    const header = Buffer.alloc(16);
    header.writeUInt32LE(1, 0); // OUT
    header.writeBigUInt64LE(4n, 8);
    const data = Buffer.alloc(512, 0x5a);
    const done = await driver.queues[1].submit([{ data: header }, { data }, { writable: 1 }]);
    expect(done.writable[0][0]).toBe(0);
    expect(readFileSync(image).subarray(2048, 2560).equals(data)).toBe(true);
    header.writeUInt32LE(8, 0); // GET_ID
    const id = await driver.queues[0].submit([{ data: header }, { writable: 20 }, { writable: 1 }]);
    expect(id.writable[0].toString('latin1').replace(/\0+$/, '')).toBe('served-1');
  });

  test('examples/virtio-console -- --listen PATH: the port is the socket\'s connection', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'virtio-serve-'));
    t.defer(() => rmSync(dir, { recursive: true, force: true }));
    const port = join(dir, 'console.sock');
    const driver = await served('virtio-console', ['--listen', port]);
    await driver.initialize();
    const socket = createConnection(port);
    t.defer(() => void socket.destroy());
    await once(socket, 'connect');
    let received = '';
    socket.on('data', (d: Buffer) => (received += d.toString()));
    const [rx, tx] = driver.queues;
    // Host to guest first: once the line arrives, the device has taken the connection as its port
    // (output sent before it accepts the connection has nowhere to go).
    const reply = rx.submit([{ writable: 64 }]);
    socket.write('pong\n');
    const done = await reply;
    expect(done.writable[0].subarray(0, done.written).toString()).toBe('pong\n');
    await tx.submit([{ data: Buffer.from('ping\n') }]);
    await until(() => received === 'ping\n');
  });

  test('examples/virtio-net -- --switch PATH --mac M: frames out through the switch', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'virtio-serve-'));
    t.defer(() => rmSync(dir, { recursive: true, force: true }));
    const path = join(dir, 'switch.sock');
    const l2 = new L2Switch();
    await l2.listen(path);
    t.defer(() => l2.close());
    // A second port of the switch, listening as a NIC would.
    const other = createConnection(path);
    t.defer(() => void other.destroy());
    await once(other, 'connect');
    let heard = Buffer.alloc(0);
    other.on('data', (d: Buffer) => (heard = Buffer.concat([heard, d])));
    const driver = await served('virtio-net', ['--switch', path, '--mac', '52:54:00:00:00:42']);
    await driver.initialize();
    expect((await driver.readConfig(0, 6)).toString('hex')).toBe('525400000042');
    const frame = Buffer.concat([Buffer.alloc(6, 0xff), Buffer.from('525400000042', 'hex'), Buffer.from('88b5', 'hex'), Buffer.from('broadcast')]);
    await driver.queues[1].submit([{ data: Buffer.alloc(12) }, { data: frame }]);
    await until(() => heard.length >= 4 + frame.length);
    expect(heard.readUInt32LE(0)).toBe(frame.length);
    expect(heard.subarray(4).equals(frame)).toBe(true);
  });
});
