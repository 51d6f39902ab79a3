/** Server lifecycle: the socket file, one client at a time, state across clients. */
import { existsSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { afterEach, describe, expect, test } from 'vitest';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { createServer as createNetServer } from 'node:net';
import { connect, createServer, Region, UsageError } from '../ts/index.js';
import { native } from '../ts/native.js';
import { PciIdio16 } from '../examples/gpio.js';
import { serve, tempSocketPath, until, type Served } from './helpers.js';

let served: Served;
afterEach(async () => served?.close());

describe('listening', () => {
  test('the socket is owner-only by default and removed on close()', async () => {
    served = await serve();
    expect(statSync(served.path).mode & 0o777).toBe(0o600);
    await served.server.close();
    expect(existsSync(served.path)).toBe(false);
  });

  test('another mode on request; listening twice or on a live socket is refused', async () => {
    const socket = tempSocketPath();
    const server = createServer(new PciIdio16());
    await server.listen(socket.path, { mode: 0o660 });
    expect(statSync(socket.path).mode & 0o777).toBe(0o660);
    await expect(server.listen(socket.path)).rejects.toThrow(UsageError);
    const other = createServer(new PciIdio16());
    await expect(other.listen(socket.path)).rejects.toThrow(/EADDRINUSE|E98/);
    await server.close();
    socket.cleanup();
  });

  test('serves on a listening socket passed by fd, and leaves its file alone on close', async () => {
    const socket = tempSocketPath();
    // A socket some other program bound: Node's server unlinks its path on close,
    // so it listens under another name that is then renamed into place.
    const outside = createNetServer();
    await new Promise<void>((r) => outside.listen(`${socket.path}.bound`, r));
    renameSync(`${socket.path}.bound`, socket.path);
    const fd = native.dupFd((outside as unknown as { _handle: { fd: number } })._handle.fd);
    outside.close();
    const server = createServer(new PciIdio16());
    await server.listen({ fd });
    expect(server.address()).toBeUndefined();
    const client = await connect(socket.path);
    expect((await client.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).toBe(0x494f);
    client.close();
    await server.close();
    expect(native.openFds()).not.toContain(fd);
    socket.cleanup();
  });

  test('an fd that is not a listening UNIX socket is refused', async () => {
    const [a, b] = native.socketPair();
    await expect(createServer(new PciIdio16()).listen({ fd: a })).rejects.toThrow(/not a listening UNIX stream socket/);
    native.closeFd(b);
  });

  test('a regular file at the path is never replaced', async () => {
    const socket = tempSocketPath();
    writeFileSync(socket.path, 'precious');
    await expect(createServer(new PciIdio16()).listen(socket.path)).rejects.toThrow();
    socket.cleanup();
  });
});

describe('out of file descriptors', () => {
  test('an accept that fails with EMFILE is reported and retried, not spun on', async () => {
    const socket = tempSocketPath();
    const script = join(__dirname, 'fixtures/emfile-server.ts');
    const child = spawn('prlimit', ['--nofile=256:256', process.execPath, '--import', 'tsx', script, socket.path], { cwd: join(__dirname, '..') });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    try {
      await until(() => out.includes('ready'), 15000);
      const client = await connect(socket.path);
      expect((await client.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).toBe(0x494f);
      client.close();
      expect(out).toMatch(/acceptError accept failed: errno 24|acceptError accept failed: EMFILE/);
      expect(out).toContain('connection');
    } finally {
      child.kill('SIGKILL');
      socket.cleanup();
    }
  });
});

describe('clients', () => {
  test('one at a time: the next waits until the first leaves, and sees the same device state', async () => {
    served = await serve();
    const first = await served.client();
    await first.regionWrite(Region.BAR2, 0n, Buffer.from([0x5a]));
    let secondReady = false;
    const second = connect(served.path).then((c) => { secondReady = true; return c; });
    await new Promise((r) => setTimeout(r, 50));
    expect(secondReady).toBe(false);
    first.close();
    const client = await second;
    expect((await client.regionRead(Region.BAR2, 0n, 1))[0]).toBe(0x5a);
    client.close();
  });

  test('events tell connection and disconnect; close() ends the current session', async () => {
    served = await serve();
    const seen: string[] = [];
    served.server.on('connection', () => seen.push('connection'));
    served.server.on('disconnect', (_s, error) => seen.push(error ? 'error' : 'disconnect'));
    const client = await served.client();
    const closed = new Promise<Error | undefined>((r) => client.on('close', r));
    await served.server.close();
    await closed;
    await until(() => seen.length === 2);
    expect(seen).toEqual(['connection', 'disconnect']);
    await expect(client.getDeviceInfo()).rejects.toThrow(/closed/);
  });
});
