/**
 * Soak: a million requests against `vfio-user serve --example gpio` in a
 * child process, from a lean pipelining client: region reads (native and
 * JS) and writes, DMA_MAP/UNMAP with and without an fd, SET_IRQS wiring and
 * unwiring an eventfd, resets, and a reconnect every 100 000 requests. The
 * server's open fds must be the same at every reconnect after the first, its
 * live heap (after a full GC, through a preloaded probe) must not grow with
 * the requests, and its RSS must stay flat after warm-up. Nothing here is timed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, expect, test } from 'vitest';
import { Command, Region } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { native } from '../ts/native.js';
import { qemuVersion, tempSocketPath, until } from './helpers.js';
import { bytesPerStep } from './leaks.js';

const REQUESTS = 1_000_000;
const PER_CONNECTION = 100_000;
/** Requests in flight at once. */
const WINDOW = 64;
/** Connections before the baseline is taken: the heap has grown to its working size (measured: by the fourth). */
const WARM_UP = 3;
/** RSS may wander this much after warm-up (GC timing; measured under 1 MiB): a bound for leaks outside the JS heap. */
const RSS_SLACK_MIB = 32;
/**
 * The live heap's growth allowed per request, fitted over the samples after warm-up. Measured:
 * under 1 byte a request either way; a leak planted in the server's session, 16 bytes a
 * request, measured 16-20 and fails.
 */
const MAX_HEAP_BYTES_PER_REQUEST = 4;

const root = join(__dirname, '..');
let server: ChildProcess | undefined;
afterAll(() => {
  server?.kill('SIGKILL');
});

/** A request whose msg_id the sender fills in. */
const rawRequest = (command: number, payload: Buffer): Buffer => protocol.encodeMessage({ msgId: 0, command }, payload);

const u32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32LE(v); return b; };
const u64 = (v: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(v); return b; };

/** One cycle of the mix: every request the soak sends, in order, with the fds it carries. */
function cycle(memfd: number, eventfd: number): { message: Buffer; fds?: number[] }[] {
  const read = (region: number, offset: bigint, count: number) =>
    rawRequest(Command.REGION_READ, protocol.encodeRegionReadRequest({ region, offset, count }));
  const write = (offset: bigint, byte: number) =>
    rawRequest(Command.REGION_WRITE, protocol.encodeRegionWriteRequest({ region: Region.BAR2, offset }, Buffer.from([byte])));
  const map = (iova: bigint) =>
    rawRequest(Command.DMA_MAP, Buffer.concat([u32(32), u32(3), u64(0n), u64(iova), u64(0x10000n)]));
  const unmap = (iova: bigint) => rawRequest(Command.DMA_UNMAP, Buffer.concat([u32(24), u32(0), u64(iova), u64(0x10000n)]));
  const intx = (flags: number) => rawRequest(Command.DEVICE_SET_IRQS, Buffer.concat([u32(20), u32(flags), u32(0), u32(0), u32(1)]));
  const steps: { message: Buffer; fds?: number[] }[] = [];
  for (let i = 0; i < 4; i++) {
    steps.push({ message: map(BigInt(i) << 20n), fds: [memfd] });
    steps.push({ message: map((BigInt(i) << 20n) + 0x80000n) }); // no fd: a message-based window
  }
  for (let i = 0; i < 80; i++) {
    if (i % 4 === 0) steps.push({ message: write(BigInt((i >> 2) & 1), i & 0xff) });
    else if (i % 2 === 0) steps.push({ message: read(Region.CONFIG, BigInt((i * 4) % 64), 4) });
    else steps.push({ message: read(Region.BAR2, BigInt(i % 8), 1) });
  }
  steps.push({ message: intx(0x24), fds: [eventfd] }); // EVENTFD | TRIGGER
  steps.push({ message: intx(0x24) }); // the same with no fd: unwired
  for (let i = 0; i < 4; i++) {
    steps.push({ message: unmap(BigInt(i) << 20n) });
    steps.push({ message: unmap((BigInt(i) << 20n) + 0x80000n) });
  }
  steps.push({ message: rawRequest(Command.DEVICE_RESET, Buffer.alloc(0)) });
  while (steps.length < 100) steps.push({ message: read(Region.CONFIG, 0n, 2) });
  return steps;
}

interface Sample {
  rssKiB: number;
  fds: number;
  /** Live JS heap after a full GC, in bytes. */
  heap: number;
}

/** Reads the server's RSS and fds, and has its heap probe collect and report the live heap. */
async function sample(child: ChildProcess, heapReports: number[]): Promise<Sample> {
  const status = readFileSync(`/proc/${child.pid}/status`, 'utf8');
  const rssKiB = Number(/VmRSS:\s+(\d+)/.exec(status)![1]);
  const fds = readdirSync(`/proc/${child.pid}/fd`).length;
  const reported = heapReports.length;
  child.kill('SIGUSR2');
  await until(() => heapReports.length > reported);
  return { rssKiB, fds, heap: heapReports[reported] };
}

/** One connection: VERSION, then `count` requests of the mix, WINDOW in flight. Resolves with errors seen. */
function connection(path: string, steps: ReturnType<typeof cycle>, count: number, onNegotiated: () => Promise<void>): Promise<number> {
  return new Promise((resolve, reject) => {
    let sent = 0;
    let answered = 0;
    let errors = 0;
    let negotiated = false;
    let expected = 1;
    const send = () => {
      while (sent < count && sent - answered < WINDOW) {
        const step = steps[sent % steps.length];
        // msg_ids 2.. (1 was VERSION), wrapping in 16 bits; replies come back in order.
        step.message.writeUInt16LE((sent + 2) & 0xffff, 0);
        conn.send(step.message, step.fds);
        sent++;
      }
    };
    const conn = new native.NativeConnection(native.connectUnix(path), 2 << 20, (buffer, offset) => {
      const bytes = Buffer.from(buffer, offset, 16);
      const msgId = bytes.readUInt16LE(0);
      const flags = bytes.readUInt32LE(8);
      if (msgId !== expected) {
        reject(new Error(`reply #${msgId} where #${expected} was due`));
        conn.close();
        return;
      }
      expected = (expected + 1) & 0xffff;
      if (flags !== 1) errors++;
      if (!negotiated) {
        negotiated = true;
        onNegotiated().then(send, reject);
        return;
      } else if (++answered === count) {
        conn.close();
        resolve(errors);
        return;
      }
      send();
    }, (error) => reject(new Error(`the server closed the connection: ${error ?? 'EOF'}`)));
    conn.send(qemuVersion());
  });
}

test(`${REQUESTS} mixed requests over ${REQUESTS / PER_CONNECTION} connections: fds unchanged, live heap flat, RSS bounded`, async () => {
  const socket = tempSocketPath();
  const probe = join(__dirname, 'fixtures/heap-probe.cjs');
  server = spawn(process.execPath, ['--expose-gc', '--require', probe, join(root, 'dist/ts/cli/main.js'), 'serve', '--example', 'gpio', '--socket', socket.path], { stdio: ['ignore', 'ignore', 'pipe'] });
  const child = server;
  const heapReports: number[] = [];
  let pending = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    const lines = (pending + chunk.toString()).split('\n');
    pending = lines.pop()!;
    for (const line of lines) {
      const probed = /^heap-probe (\d+)$/.exec(line);
      if (probed) heapReports.push(Number(probed[1]));
      else process.stderr.write(`${line}\n`);
    }
  });
  await until(() => existsSync(socket.path) || server!.exitCode !== null, 15000);
  const memory = native.memfdCreate('soak-guest-ram', 1n << 16n, true);
  const eventfd = native.eventfdCreate();
  const steps = cycle(memory, eventfd);
  const samples: Sample[] = [];
  const started = process.hrtime.bigint();
  let errors = 0;
  for (let done = 0; done < REQUESTS; done += PER_CONNECTION) {
    // Sampled just after VERSION: nothing mapped or wired, the previous client fully gone.
    errors += await connection(socket.path, steps, PER_CONNECTION, async () => void samples.push(await sample(child, heapReports)));
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  native.closeFd(memory);
  native.closeFd(eventfd);
  expect(server.exitCode).toBeNull();
  server.kill('SIGTERM');
  socket.cleanup();
  const steady = samples.slice(WARM_UP);
  const mib = (kib: number) => (kib / 1024).toFixed(1);
  console.log(
    `soak: ${REQUESTS} requests in ${seconds.toFixed(1)} s (${Math.round(REQUESTS / seconds)}/s); server RSS MiB by connection: ` +
      `${samples.map((s) => mib(s.rssKiB)).join(' ')}; live heap MiB: ${samples.map((s) => mib(s.heap / 1024)).join(' ')}; ` +
      `fds: ${samples.map((s) => s.fds).join(' ')}`,
  );
  const heapPerRequest = bytesPerStep(steady.map((s) => s.heap)) / PER_CONNECTION;
  console.log(`soak: the live heap grew ${heapPerRequest.toFixed(2)} bytes a request`);
  // Every request of the mix succeeds: a reply with the error bit would be a defect the soak found.
  expect(errors).toBe(0);
  // From the second connection on: Node opens (and drops) a few fds of its own on first use.
  expect(new Set(samples.slice(1).map((s) => s.fds))).toEqual(new Set([samples[1].fds]));
  expect(heapPerRequest).toBeLessThan(MAX_HEAP_BYTES_PER_REQUEST);
  const floor = Math.min(...steady.map((s) => s.rssKiB));
  expect((steady.at(-1)!.rssKiB - floor) / 1024).toBeLessThan(RSS_SLACK_MIB);
}, 180_000);
