/** Server lifecycle: the socket file, one client at a time, state across clients. */
import { existsSync, readSync, renameSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { afterEach, describe, expect, test } from 'vitest';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { createServer as createNetServer } from 'node:net';
import { once } from 'node:events';
import { constants as os } from 'node:os';
import { Command, connect, ConnectionClosedError, createServer, DmaSpaceClosedError, Errno, GuestMemory, PciDevice, Region, UsageError } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { native } from '../ts/native.js';
import { PciIdio16 } from '../examples/gpio.js';
import { nextMessage, qemuVersion, rawConnect, rawMessage, serve, SPAWNING_TEST_MS, STARTED_MS, tempSocketPath, until, type Served } from './helpers.js';
import { pciFunction } from '../ts/pci/device.js';

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

describe('out of file descriptors', { timeout: SPAWNING_TEST_MS }, () => {
  test('an accept that fails with EMFILE is reported and retried, not spun on', async () => {
    const socket = tempSocketPath();
    const script = join(__dirname, 'fixtures/emfile-server.ts');
    const child = spawn('prlimit', ['--nofile=256:256', process.execPath, '--import', 'tsx', script, socket.path], { cwd: join(__dirname, '..') });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    try {
      await until(() => out.includes('ready'), STARTED_MS);
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
    let connections = 0;
    served.server.on('connection', () => connections++);
    const first = await served.client();
    await first.regionWrite(Region.BAR2, 0n, Buffer.from([0x5a]));
    const second = await rawConnect(served.path);
    second.write(qemuVersion());
    // The server shares this loop: once the first client's reply is back, the turn in which the
    // server saw that request has ended, and a listener still polled would have taken the second.
    await first.regionRead(Region.BAR2, 0n, 1);
    expect(connections).toBe(1);
    first.close();
    expect((await nextMessage(second)).readUInt16LE(2)).toBe(Command.VERSION);
    expect(connections).toBe(2);
    second.destroy();
    const client = await served.client();
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

  test('a handler that closes the server still lets the replies before it in the batch out', async () => {
    // Replies to one wake-up's messages are gathered for one sendmsg; closing must send them.
    const device = new PciIdio16();
    served = await serve(device);
    const fn = pciFunction(device);
    const write = fn.write.bind(fn);
    fn.write = (region, offset, data) => (offset === 7 ? void served.server.close() : write(region, offset, data));
    const s = await rawConnect(served.path);
    s.write(qemuVersion());
    await nextMessage(s);
    const read = protocol.encodeRegionReadRequest({ offset: 0n, region: Region.BAR2, count: 1 });
    const write7 = protocol.encodeRegionWriteRequest({ offset: 7n, region: Region.BAR2 }, Buffer.from([1]));
    // One write, so that both arrive in one read on the server.
    s.write(Buffer.concat([rawMessage({ msgId: 2, command: Command.REGION_READ }, read), rawMessage({ msgId: 3, command: Command.REGION_WRITE }, write7)]));
    const reply = await nextMessage(s);
    expect([reply.readUInt16LE(0), reply.readUInt16LE(2), reply.readUInt32LE(8)]).toEqual([2, Command.REGION_READ, 1]);
  });
});

describe('a client that drops the connection', () => {
  test('with replies unread: the disconnect names the errno, not the poll that saw it', async () => {
    // A plain-memory BAR: its reads are answered natively, counted by the session.
    served = await serve(new PciDevice({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0, bars: { 0: { kind: 'memory', size: 4096 } } })) as unknown as Served;
    const disconnected = once(served.server, 'disconnect');
    // A bare fd: a Node socket would read ahead into its own buffer even when paused.
    const fd = native.connectUnix(served.path);
    writeSync(fd, qemuVersion());
    const versionReply = Buffer.alloc(4096);
    await until(() => {
      try {
        return readSync(fd, versionReply) > 0;
      } catch (error) {
        if ((error as { code?: string }).code === 'EAGAIN') return false;
        throw error;
      }
    });
    writeSync(fd, rawMessage({ msgId: 2, command: Command.REGION_READ }, protocol.encodeRegionReadRequest({ offset: 0n, region: Region.BAR0, count: 4 })));
    await until(() => served.server.session!.readsAnsweredNatively === 1);
    native.closeFd(fd); // the reply is still in its receive queue: ECONNRESET
    const [, error] = (await disconnected) as [unknown, ConnectionClosedError];
    expect(error).toBeInstanceOf(ConnectionClosedError);
    expect([error.message, error.errno]).toEqual(['connection lost: ECONNRESET (connection reset by peer)', os.errno.ECONNRESET]);
  });
});

describe('a handler that never finishes', () => {
  /** A device whose BAR2 accesses wait for `release()`; `late` collects what its handlers then meet. */
  function stalling() {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const late: unknown[] = [];
    let writing = false;
    const device: PciDevice = new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      bars: {
        2: {
          kind: 'io', size: 4,
          read: async () => { await gate; return 0x77; },
          write: async (_offset, data) => {
            const held = device.dma;
            writing = true;
            await gate;
            for (const dma of [held, device.dma]) {
              try {
                dma.write(0x10000n, data);
                late.push('wrote');
              } catch (error) {
                late.push(error);
              }
            }
          },
        },
      },
    });
    return { device, release, late, writing: () => writing };
  }

  async function listen(device: PciDevice, options?: { requestTimeoutMs?: number }) {
    const socket = tempSocketPath();
    const server = createServer(device, options);
    await server.listen(socket.path);
    const close = async () => { await server.close(); socket.cleanup(); };
    return { server, path: socket.path, close };
  }

  test('past requestTimeoutMs the client gets ETIMEDOUT, the server says so and serves the next command', async () => {
    const { device, release } = stalling();
    const { server, path, close } = await listen(device, { requestTimeoutMs: 50 });
    const timeouts: number[] = [];
    server.on('requestTimeout', (command) => timeouts.push(command));
    const s = await rawConnect(path);
    s.write(qemuVersion());
    await nextMessage(s);
    s.write(rawMessage({ msgId: 7, command: Command.REGION_READ }, Buffer.from('000000000000000002000000' + '01000000', 'hex')));
    s.write(rawMessage({ msgId: 8, command: Command.REGION_READ }, Buffer.from('000000000000000007000000' + '02000000', 'hex')));
    const expired = protocol.decodeHeader(await nextMessage(s));
    expect(expired).toMatchObject({ msgId: 7, flags: 0x21, error: Errno.ETIMEDOUT });
    expect(timeouts).toEqual([Command.REGION_READ]);
    expect((await nextMessage(s)).readUInt16LE(32)).toBe(1); // the config read behind it
    // The late answer is dropped: the next message is the reply to the next request.
    release();
    await new Promise((r) => setImmediate(r));
    s.write(rawMessage({ msgId: 9, command: Command.REGION_READ }, Buffer.from('000000000000000007000000' + '02000000', 'hex')));
    expect(protocol.decodeHeader(await nextMessage(s))).toMatchObject({ msgId: 9, flags: 1 });
    s.destroy();
    await close();
  });

  test("after a disconnect, a late handler meets DmaSpaceClosedError, not the next client's memory", async () => {
    const { device, release, late, writing } = stalling();
    const { path, close } = await listen(device);
    const first = await connect(path);
    const firstRam = new GuestMemory(1 << 20);
    await first.dmaMap({ iova: 0n, memory: firstRam });
    void first.regionWrite(Region.BAR2, 0n, Buffer.from('late'), { posted: true });
    await until(writing);
    first.close();
    const second = await connect(path);
    const secondRam = new GuestMemory(1 << 20);
    await second.dmaMap({ iova: 0n, memory: secondRam });
    release();
    await until(() => late.length === 2);
    expect(late[0]).toBeInstanceOf(DmaSpaceClosedError);
    expect(late[1]).toBeInstanceOf(DmaSpaceClosedError);
    expect(secondRam.read(0x10000, 4).toString()).toBe('\0\0\0\0');
    // The new client's memory is the device's outside that late handler.
    device.dma.write(0x10000n, Buffer.from('ok'));
    expect(secondRam.read(0x10000, 2).toString()).toBe('ok');
    second.close();
    firstRam.close();
    secondRam.close();
    await close();
  });
});
