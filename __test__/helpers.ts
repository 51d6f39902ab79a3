/** Shared set-up for tests that talk over real sockets. */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createConnection, type Socket } from 'node:net';
import { once } from 'node:events';
import { connect, createServer, type PciDevice, type VfioUserClient, type VfioUserDevice, type VfioUserServer } from '../ts/index.js';
import { native } from '../ts/native.js';
import { PciIdio16 } from '../examples/gpio.js';

export function tempSocketPath(name = 'dev.sock'): { path: string; cleanup(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'vfu-test-'));
  return { path: join(dir, name), cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export interface Served<D extends VfioUserDevice | PciDevice = PciIdio16> {
  device: D;
  server: VfioUserServer;
  path: string;
  client(): Promise<VfioUserClient>;
  close(): Promise<void>;
}

export interface ServeOptions {
  /**
   * 'expected' when the test makes device code throw (and checks the
   * `deviceError` events itself); otherwise any `deviceError` fails the test
   * when it closes the server.
   */
  deviceErrors?: 'expected';
}

/** Serves `device` (the GPIO card by default) on a fresh socket. */
export async function serve<D extends VfioUserDevice | PciDevice = PciIdio16>(device?: D, options: ServeOptions = {}): Promise<Served<D>> {
  const dev = (device ?? new PciIdio16()) as D;
  const server = createServer(dev);
  const unexpected: Error[] = [];
  if (options.deviceErrors !== 'expected') server.on('deviceError', (error) => unexpected.push(error));
  const socket = tempSocketPath();
  await server.listen(socket.path);
  const clients: VfioUserClient[] = [];
  return {
    device: dev,
    server,
    path: socket.path,
    async client() {
      const c = await connect(socket.path);
      clients.push(c);
      return c;
    },
    async close() {
      for (const c of clients) c.close();
      for (const s of rawSockets) s.destroy();
      await server.close();
      socket.cleanup();
      if (unexpected.length > 0) {
        throw new AggregateError(unexpected, `device code threw (deviceError) where the test expected none: ${unexpected.map((e) => e.stack ?? e.message).join('\n')}`);
      }
    },
  };
}

const rawSockets = new Set<Socket>();

/** A plain stream socket to the server, for sending malformed bytes (destroyed by close()). */
export async function rawConnect(path: string): Promise<Socket> {
  const s = createConnection(path);
  rawSockets.add(s);
  s.on('close', () => rawSockets.delete(s));
  await once(s, 'connect');
  return s;
}

/**
 * How long a helper waits for something that should happen soon: long enough
 * that only a thing that never happens fails on a loaded machine, short of
 * vitest's 20 s per test so the failure names what was awaited.
 */
const WAIT_MS = 15_000;

/**
 * How long a spawned Node (with tsx) may take to start or answer on a loaded
 * machine, and a test that spawns some: only a command that never gets there
 * fails, nothing is timed.
 */
export const STARTED_MS = 60_000;
export const SPAWNING_TEST_MS = 180_000;

/** Resolves once `predicate` holds, polling the event loop. */
export async function until(predicate: () => boolean, timeoutMs = WAIT_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 5));
  }
}

interface MessageReader {
  buffered: Buffer;
  messages: Buffer[];
  waiting?: () => void;
}
const readers = new WeakMap<Socket, MessageReader>();

/** Reads whole messages from a raw socket (one reader per socket, so pipelined replies are never lost). */
function readerOf(s: Socket): MessageReader {
  let reader = readers.get(s);
  if (!reader) {
    const r: MessageReader = { buffered: Buffer.alloc(0), messages: [] };
    s.on('data', (chunk: Buffer) => {
      r.buffered = Buffer.concat([r.buffered, chunk]);
      while (r.buffered.length >= 16 && r.buffered.length >= r.buffered.readUInt32LE(4)) {
        const size = r.buffered.readUInt32LE(4);
        r.messages.push(r.buffered.subarray(0, size));
        r.buffered = r.buffered.subarray(size);
      }
      if (r.messages.length > 0) r.waiting?.();
    });
    readers.set(s, r);
    reader = r;
  }
  return reader;
}

/** Resolves with the next whole message the server sent on a raw socket. */
export async function nextMessage(s: Socket, timeoutMs = WAIT_MS): Promise<Buffer> {
  const reader = readerOf(s);
  if (reader.messages.length === 0) {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => { reader.waiting = undefined; reject(new Error('no message in time')); }, timeoutMs);
      reader.waiting = () => { clearTimeout(timer); reader.waiting = undefined; resolve(); };
    });
  }
  return reader.messages.shift()!;
}

/** Resolves when the peer closes the raw socket. */
export function closedBy(s: Socket, timeoutMs = WAIT_MS): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('socket not closed in time')), timeoutMs);
    s.on('close', () => { clearTimeout(timer); resolve(); });
    s.resume();
  });
}

/** A message with the given header fields and payload. */
export function rawMessage(fields: { msgId?: number; command: number; flags?: number; error?: number; size?: number }, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(16 + payload.length);
  b.writeUInt16LE(fields.msgId ?? 1, 0);
  b.writeUInt16LE(fields.command, 2);
  b.writeUInt32LE(fields.size ?? 16 + payload.length, 4);
  b.writeUInt32LE(fields.flags ?? 0, 8);
  b.writeUInt32LE(fields.error ?? 0, 12);
  payload.copy(b, 16);
  return b;
}

/** The VERSION message QEMU 10.1 sends (§4 of the digest). */
export function qemuVersion(msgId = 1): Buffer {
  const json = '{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}';
  const payload = Buffer.concat([Buffer.from([0, 0, 0, 0]), Buffer.from(json), Buffer.from([0])]);
  return rawMessage({ msgId, command: 1 }, payload);
}

export const openFdCount = (): number => native.openFds().length;

/**
 * Runs `body` (TypeScript, top-level await allowed) in a child Node, for
 * what a regression would kill or freeze the process with: `lib` is
 * ts/index.ts, `SOCK` a socket path in a fresh directory, `TESTS` this
 * directory (to import helpers from). Resolves with how it ended and its output.
 */
export function runChild(body: string, timeoutMs = 60_000): { status: number | null; signal: string | null; out: string } {
  const dir = mkdtempSync(join(tmpdir(), 'vfu-child-'));
  try {
    const file = join(dir, 'child.mts');
    const lib = resolve(__dirname, '../ts/index.ts');
    writeFileSync(file, [
      `import * as lib from ${JSON.stringify(lib)};`,
      `const SOCK = ${JSON.stringify(join(dir, 's.sock'))};`,
      `const TESTS = ${JSON.stringify(__dirname)};`,
      body,
    ].join('\n'));
    const r = spawnSync(process.execPath, ['--import', 'tsx', file], { cwd: resolve(__dirname, '..'), encoding: 'utf8', timeout: timeoutMs });
    return { status: r.status, signal: r.signal, out: `${r.stdout}${r.stderr}` };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
