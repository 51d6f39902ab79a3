/**
 * `npm run bench`: a 4-byte REGION_READ round trip against our served GPIO example, beside two
 * baselines, in one run.
 *
 *   native floor   bench-floor: a bare blocking request/reply server in Rust (2 recv + 1 send per
 *                  request) on a UNIX socket path; the floor for any server on this machine.
 *   node net floor bench/net-floor.ts: a bare responder on Node's own `net`; the floor for any JS
 *                  handler (it cannot carry fds).
 *   ours           `vfio-user serve dist/examples/gpio.js`: region 7 (PCI config space, answered
 *                  natively) and region 2 (GPIO BAR, answered by JS device code).
 *
 * Every one of those is driven by the same small native client (bench-client), so the client
 * costs the same. Our server is also driven through our own TS client, in this process.
 *
 * Rounds are interleaved (each round runs every target once, in a rotating order) and the
 * reported figure per target is the median over rounds of that round's ops/s, p50 and p99.
 *
 * Environment: BENCH_ITERATIONS (default 20000), BENCH_ROUNDS (5), BENCH_WARMUP (1000),
 * BENCH_TARGETS (comma-separated target keys, default all), BENCH_START_TIMEOUT_MS (15000).
 *
 * Builds nothing: expects target/release/bench-client, target/release/bench-floor (cargo build
 * --release -p vfio-user-bench) and the compiled dist/ tree (tsc).
 *
 * Exit code: 0 whether or not the targets are met; 1 if any target crashed or could not run.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { connect } from '../ts/index.js';
import {
  describeExit, envInt, median, ROOT, runMain, runToEnd, scratchDir, startChild, stopChild, waitForAccept, waitForReadyLine,
  type Child,
} from './children.js';

// ---------------------------------------------------------------------------------------------
// Configuration

const ITERATIONS = envInt('BENCH_ITERATIONS', 20000, 1);
const ROUNDS = envInt('BENCH_ROUNDS', 5, 1);
const WARMUP = envInt('BENCH_WARMUP', Math.min(1000, ITERATIONS), 0);
const CLIENT_TIMEOUT_MS = 120_000;

const CONFIG_REGION = 7; // PCI config space: served natively, never enters JS
const GPIO_REGION = 2; // GPIO card's I/O BAR: handled by JS device code
const READ_OFFSET = 0;
const READ_COUNT = 4;

const BENCH_CLIENT = path.join(ROOT, 'target', 'release', 'bench-client');
const BENCH_FLOOR = path.join(ROOT, 'target', 'release', 'bench-floor');
const NET_FLOOR = path.join(__dirname, 'net-floor.js');
const SERVER_CLI_CANDIDATES = [path.join(ROOT, 'dist', 'ts', 'cli', 'main.js'), path.join(ROOT, 'dist', 'cli', 'main.js')];
const GPIO_EXAMPLE = path.join(ROOT, 'dist', 'examples', 'gpio.js');

// ---------------------------------------------------------------------------------------------
// Statistics

interface Sample {
  opsPerSec: number;
  p50Us: number;
  p99Us: number;
}

/** Nearest-rank percentile of an ascending-sorted array (same definition as bench-client). */
function percentile(sorted: ArrayLike<number>, p: number): number {
  const n = sorted.length;
  if (n === 0) return 0;
  const rank = Math.ceil((p / 100) * n);
  return sorted[Math.min(Math.max(rank, 1), n) - 1];
}

// ---------------------------------------------------------------------------------------------
// Drivers

/** One run of bench-client against `socketPath`. */
async function runBenchClient(socketPath: string, region: number): Promise<Sample> {
  const args = [
    '--socket', socketPath,
    '--region', String(region),
    '--offset', String(READ_OFFSET),
    '--count', String(READ_COUNT),
    '--iterations', String(ITERATIONS),
    '--warmup', String(WARMUP),
  ];
  const line = await runToEnd(`bench-client (region ${region})`, BENCH_CLIENT, args, CLIENT_TIMEOUT_MS);
  let j: { ops_per_sec?: unknown; p50_us?: unknown; p99_us?: unknown };
  try {
    j = JSON.parse(line) as typeof j;
  } catch {
    throw new Error(`bench-client printed no JSON: ${JSON.stringify(line)}`);
  }
  if (typeof j.ops_per_sec !== 'number' || typeof j.p50_us !== 'number' || typeof j.p99_us !== 'number') {
    throw new Error(`bench-client JSON lacks fields: ${line}`);
  }
  return { opsPerSec: j.ops_per_sec, p50Us: j.p50_us, p99Us: j.p99_us };
}

/** One run of our TS client, in this process, against `socketPath`. */
async function runTsClient(socketPath: string, region: number): Promise<Sample> {
  const client = await connect(socketPath);
  try {
    const offset = BigInt(READ_OFFSET);
    const first = await client.regionRead(region, offset, READ_COUNT);
    if (first.length !== READ_COUNT) {
      throw new Error(`regionRead(${region}, ${offset}, ${READ_COUNT}) returned ${first.length} bytes`);
    }
    for (let i = 1; i < WARMUP; i++) await client.regionRead(region, offset, READ_COUNT);
    const samples = new Float64Array(ITERATIONS);
    const start = process.hrtime.bigint();
    for (let i = 0; i < ITERATIONS; i++) {
      const t0 = process.hrtime.bigint();
      await client.regionRead(region, offset, READ_COUNT);
      samples[i] = Number(process.hrtime.bigint() - t0);
    }
    const totalNs = Number(process.hrtime.bigint() - start);
    samples.sort();
    return {
      opsPerSec: ITERATIONS / (totalNs / 1e9),
      p50Us: percentile(samples, 50) / 1000,
      p99Us: percentile(samples, 99) / 1000,
    };
  } finally {
    await client.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Targets

type ServerKey = 'native' | 'net' | 'ours';

interface Target {
  key: string;
  label: string;
  server: ServerKey;
  driver: 'bench-client' | 'ts-client';
  region: number;
  samples: Sample[];
  error?: string;
}

function makeTargets(): Target[] {
  const all: Target[] = [
    { key: 'native_floor', label: 'native floor (Rust bench-floor, UNIX socket path)', server: 'native', driver: 'bench-client', region: CONFIG_REGION, samples: [] },
    { key: 'net_floor', label: 'node net floor (bench/net-floor.ts)', server: 'net', driver: 'bench-client', region: CONFIG_REGION, samples: [] },
    { key: 'ours_config', label: 'ours: config read (region 7, native path)', server: 'ours', driver: 'bench-client', region: CONFIG_REGION, samples: [] },
    { key: 'ours_gpio', label: 'ours: GPIO BAR2 read (region 2, JS handler)', server: 'ours', driver: 'bench-client', region: GPIO_REGION, samples: [] },
    { key: 'ts_client_config', label: 'ours via TS client: config read (region 7)', server: 'ours', driver: 'ts-client', region: CONFIG_REGION, samples: [] },
    { key: 'ts_client_gpio', label: 'ours via TS client: GPIO BAR2 read (region 2)', server: 'ours', driver: 'ts-client', region: GPIO_REGION, samples: [] },
  ];
  const only = (process.env.BENCH_TARGETS ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  if (only.length === 0) return all;
  const unknown = only.filter((k) => !all.some((t) => t.key === k));
  if (unknown.length) throw new Error(`BENCH_TARGETS: unknown ${unknown.join(', ')} (known: ${all.map((t) => t.key).join(', ')})`);
  return all.filter((t) => only.includes(t.key));
}

interface Server {
  child: Child;
  socket: string;
}

async function startServer(key: ServerKey, dir: string): Promise<Server> {
  const socket = path.join(dir, `${key}.sock`);
  if (key === 'native') {
    const child = startChild('bench-floor', BENCH_FLOOR, ['--socket', socket, '--clients', '0']);
    await waitForReadyLine(child, socket);
    return { child, socket };
  }
  if (key === 'net') {
    if (!fs.existsSync(NET_FLOOR)) throw new Error(`${NET_FLOOR} not found (run tsc first)`);
    const child = startChild('net-floor', process.execPath, [NET_FLOOR, socket, '0']);
    await waitForReadyLine(child, socket);
    return { child, socket };
  }
  const cli = SERVER_CLI_CANDIDATES.find((p) => fs.existsSync(p));
  if (!cli) throw new Error(`our CLI not found (looked for ${SERVER_CLI_CANDIDATES.join(', ')}; run tsc first)`);
  if (!fs.existsSync(GPIO_EXAMPLE)) throw new Error(`${GPIO_EXAMPLE} not found (run tsc first)`);
  const child = startChild('vfio-user serve (gpio example)', process.execPath, [cli, 'serve', GPIO_EXAMPLE, '--socket', socket]);
  await waitForAccept(child, socket);
  return { child, socket };
}

// ---------------------------------------------------------------------------------------------
// Report

function fmtNum(n: number, digits: number): string {
  return Number.isFinite(n) ? n.toFixed(digits) : '-';
}

function pad(s: string, w: number, right = false): string {
  return right ? s.padStart(w) : s.padEnd(w);
}

interface Summary {
  opsPerSec: number;
  p50Us: number;
  p99Us: number;
}

function summarize(t: Target): Summary | null {
  if (t.error || t.samples.length === 0) return null;
  return {
    opsPerSec: median(t.samples.map((s) => s.opsPerSec)),
    p50Us: median(t.samples.map((s) => s.p50Us)),
    p99Us: median(t.samples.map((s) => s.p99Us)),
  };
}

interface Ratio {
  key: string;
  label: string;
  value: number | null;
  target: number | null;
  pass: boolean | null;
}

function ratio(key: string, label: string, num: Summary | null, den: Summary | null, target: number | null): Ratio {
  const value = num && den && den.p50Us > 0 ? num.p50Us / den.p50Us : null;
  const pass = value === null || target === null ? null : value <= target;
  return { key, label, value, target, pass };
}

function round3(n: number): number {
  return Math.round(n * 1000) / 1000;
}

// ---------------------------------------------------------------------------------------------
// Main

async function main(): Promise<number> {
  for (const bin of [BENCH_CLIENT, BENCH_FLOOR]) {
    if (!fs.existsSync(bin)) {
      throw new Error(`${bin} not found; build it with: cargo build --release -p vfio-user-bench`);
    }
  }
  const targets = makeTargets();
  const tmpDir = scratchDir();

  console.log(
    `vfio-user bench: ${READ_COUNT}-byte REGION_READ round trips, ${ROUNDS} rounds x ${ITERATIONS} iterations ` +
      `(+${WARMUP} warm-up) per target; node ${process.version}, ${os.cpus().length} CPUs, ${os.cpus()[0]?.model ?? '?'}`,
  );

  // Start every server once; each stays up (serving clients one after another) for all rounds.
  const servers = new Map<ServerKey, Server>();
  const serverErrors = new Map<ServerKey, string>();
  for (const key of new Set(targets.map((t) => t.server))) {
    try {
      servers.set(key, await startServer(key, tmpDir));
    } catch (e) {
      serverErrors.set(key, (e as Error).message);
    }
  }
  for (const t of targets) {
    const err = serverErrors.get(t.server);
    if (err) t.error = `server did not start: ${err}`;
  }

  let crashed = false;
  try {
    for (let round = 0; round < ROUNDS; round++) {
      const live = targets.filter((t) => !t.error);
      if (live.length === 0) break;
      process.stdout.write(`round ${round + 1}/${ROUNDS}:`);
      // Rotate the order so that no target always runs first (or right after a given other one).
      for (let i = 0; i < live.length; i++) {
        const t = live[(i + round) % live.length];
        const server = servers.get(t.server)!;
        try {
          if (server.child.exited) throw new Error(describeExit(server.child));
          const s =
            t.driver === 'bench-client'
              ? await runBenchClient(server.socket, t.region)
              : await runTsClient(server.socket, t.region);
          t.samples.push(s);
          process.stdout.write(` ${t.key}=${fmtNum(s.p50Us, 1)}us`);
        } catch (e) {
          let msg = (e as Error).message ?? String(e);
          if (server.child.exited) msg += `\n  (server: ${describeExit(server.child)})`;
          t.error = msg;
          process.stdout.write(` ${t.key}=FAILED`);
        }
      }
      process.stdout.write('\n');
    }
  } finally {
    await Promise.all([...servers.values()].map((s) => stopChild(s.child)));
  }

  // Table.
  const sums = new Map(targets.map((t) => [t.key, summarize(t)] as const));
  const W = Math.max(...targets.map((t) => t.label.length), 6);
  console.log('');
  console.log(`${pad('target', W)}  ${pad('ops/s', 10, true)}  ${pad('p50 us', 8, true)}  ${pad('p99 us', 8, true)}`);
  console.log(`${'-'.repeat(W)}  ${'-'.repeat(10)}  ${'-'.repeat(8)}  ${'-'.repeat(8)}`);
  for (const t of targets) {
    const s = sums.get(t.key);
    if (s) {
      console.log(
        `${pad(t.label, W)}  ${pad(fmtNum(s.opsPerSec, 0), 10, true)}  ${pad(fmtNum(s.p50Us, 2), 8, true)}  ${pad(fmtNum(s.p99Us, 2), 8, true)}`,
      );
    } else {
      console.log(`${pad(t.label, W)}  FAILED`);
    }
  }
  console.log('(each figure is the median over rounds of that round\'s ops/s, p50 and p99)');

  // Ratios of p50 latency.
  const get = (k: string) => sums.get(k) ?? null;
  const ratios: Ratio[] = [
    ratio('config_vs_native_floor', 'ours config read / native floor (p50)', get('ours_config'), get('native_floor'), 1.3),
    ratio('js_vs_net_floor', 'ours GPIO JS read / node net floor (p50)', get('ours_gpio'), get('net_floor'), 1.0),
    ratio('ts_client_config_vs_native_floor', 'TS client config read / native floor (p50)', get('ts_client_config'), get('native_floor'), null),
    ratio('ts_client_gpio_vs_net_floor', 'TS client GPIO read / node net floor (p50)', get('ts_client_gpio'), get('net_floor'), null),
    ratio('net_floor_vs_native_floor', 'node net floor / native floor (p50)', get('net_floor'), get('native_floor'), null),
  ];
  const RW = Math.max(...ratios.map((r) => r.label.length));
  console.log('');
  for (const r of ratios) {
    const v = r.value === null ? '-' : `${r.value.toFixed(2)}x`;
    const verdict =
      r.value === null
        ? r.target === null
          ? ''
          : `  (target <= ${r.target.toFixed(1)}x: not measured)`
        : r.target === null
          ? '  (informational)'
          : `  target <= ${r.target.toFixed(1)}x  ${r.pass ? 'PASS' : 'MISS'}`;
    console.log(`${pad(r.label, RW)}  ${pad(v, 7, true)}${verdict}`);
  }

  const failed = targets.filter((t) => t.error);
  if (failed.length) {
    crashed = true;
    console.log('');
    for (const t of failed) console.log(`FAILED ${t.key}: ${t.error}`);
  }

  // One-line JSON summary, last line of output.
  const summary = {
    bench: 'vfio-user region_read',
    count: READ_COUNT,
    iterations: ITERATIONS,
    rounds: ROUNDS,
    warmup: WARMUP,
    node: process.version,
    cpus: os.cpus().length,
    targets: Object.fromEntries(
      targets.map((t) => {
        const s = sums.get(t.key);
        return [
          t.key,
          s
            ? { ops_per_sec: Math.round(s.opsPerSec), p50_us: round3(s.p50Us), p99_us: round3(s.p99Us) }
            : { error: t.error ?? 'no samples' },
        ];
      }),
    ),
    ratios: Object.fromEntries(
      ratios.map((r) => [r.key, { value: r.value === null ? null : round3(r.value), target: r.target, pass: r.pass }]),
    ),
  };
  console.log('');
  console.log(JSON.stringify(summary));
  return crashed ? 1 : 0;
}

runMain(main);
