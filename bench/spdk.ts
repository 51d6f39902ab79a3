/**
 * `npm run bench`, SPDK as the peer (runs when VFIO_USER_SPDK names an SPDK
 * build, scripts/peers/build-spdk.sh; otherwise one line says it is skipped).
 * Same run, same pinning: every server on CPU 0 (taskset), SPDK's hosts on
 * core 1 (their own `-c`/`-m 0x2`).
 *
 *   NVMe        spdk_nvme_identify, then spdk_nvme_perf (4 KiB randread QD1
 *               and QD32, 128 KiB randread QD32, 4 KiB randwrite QD32)
 *               against `vfio-user serve examples/nvme` in each doorbell
 *               mode, and against SPDK's nvmf_tgt (VFIOUSER transport).
 *   virtio-blk  bdevperf over SPDK's virtio driver (4 KiB randread QD1 and
 *               QD32) against `vfio-user serve examples/virtio-blk`, and
 *               against spdk_tgt's vfio-user virtio-blk endpoint.
 *
 * Every server serves a fresh sparse 256 MiB file in /dev/shm (SPDK's through
 * an aio bdev), so all read the page cache alike. A round starts each server
 * in turn (rotating which goes first), runs every workload against it and
 * stops it: one server at a time, since SPDK's targets poll and take their
 * core whole. Each cell prints the median IOPS over rounds with its range,
 * the ratio to SPDK's target in the same round (median and range over the
 * rounds: the two ran seconds apart, while the machine's load moves more
 * between rounds), and the server's CPU (utime + stime from /proc/PID/stat
 * while the host ran its I/O, as a share of one core).
 * A server SPDK's host cannot attach to gets the error line SPDK printed.
 *
 * Environment: BENCH_SPDK_ROUNDS (default 3), BENCH_SPDK_SECONDS (each run's
 * length, default 2; spdk_nvme_perf warms up 1 s more).
 *
 * Exit code: 0 whatever the figures; 1 if a server did not start or one of
 * SPDK's own targets failed a run.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  describeExit, envInt, median, processCpuSeconds, ROOT, runMain, scratchDir, startChild, stopChild, waitForAccept,
  type Child,
} from './children.js';
import {
  firstError, freeHugepagesMiB, nvmfTargetArgs, serveNvmfTarget, serveVirtioTarget, spdkProgram, totalIops, transportId,
  VIRTIO_QUEUES, virtioBdevConfig, virtioTargetArgs,
} from './spdk-peer.js';

const SPDK = process.env.VFIO_USER_SPDK;
const ROUNDS = envInt('BENCH_SPDK_ROUNDS', 3, 1);
const SECONDS = envInt('BENCH_SPDK_SECONDS', 2, 1);
const PERF_WARMUP_SECONDS = 1;
/** Hugepage memory (MiB): each target, and each host. */
const TARGET_MIB = 256;
const HOST_MIB = 128;
const IMAGE_SIZE = '256M';
const IMAGE_BYTES = 256 << 20;
/** How long a host may take to attach and finish its own setup, beyond its run. */
const HOST_SLACK_MS = 30_000;
const SPDK_STOP_GRACE_MS = 10_000;
const CLI = path.join(ROOT, 'dist', 'ts', 'cli', 'main.js');

interface Workload {
  key: string;
  label: string;
  size: number;
  depth: number;
  pattern: 'randread' | 'randwrite';
}

const NVME_WORKLOADS: Workload[] = [
  { key: '4k_randread_qd1', label: '4 KiB randread QD1', size: 4096, depth: 1, pattern: 'randread' },
  { key: '4k_randread_qd32', label: '4 KiB randread QD32', size: 4096, depth: 32, pattern: 'randread' },
  { key: '128k_randread_qd32', label: '128 KiB randread QD32', size: 131072, depth: 32, pattern: 'randread' },
  { key: '4k_randwrite_qd32', label: '4 KiB randwrite QD32', size: 4096, depth: 32, pattern: 'randwrite' },
];
const VIRTIO_WORKLOADS = NVME_WORKLOADS.slice(0, 2);

/** A server as the host sees it: its process and where the host finds it. */
interface Running {
  child: Child;
  /** spdk_nvme_perf's traddr (the folder holding `cntrl`), or the virtio-blk socket. */
  address: string;
  stopGraceMs: number;
}

interface Server {
  key: string;
  label: string;
  /** SPDK's own target: the baseline of the ratios. */
  baseline: boolean;
  start(dir: string, image: string): Promise<Running>;
}

/** Starts `argv` pinned to CPU 0, in `cwd` (where an SPDK target that crashes leaves its core). */
function pinned(name: string, argv: string[], cwd?: string): Child {
  return startChild(name, 'taskset', ['-c', '0', ...argv], cwd);
}

async function serveOurs(name: string, example: string, socket: string, args: string[]): Promise<Child> {
  const child = pinned(name, [process.execPath, CLI, 'serve', example, '--socket', socket, '--', ...args]);
  await waitForAccept(child, socket);
  return child;
}

/** Runs `setUp` against a started SPDK target; on failure the error says how the target ended, if it did. */
async function setUpTarget(child: Child, setUp: () => Promise<string>): Promise<Running> {
  try {
    return { child, address: await setUp(), stopGraceMs: SPDK_STOP_GRACE_MS };
  } catch (e) {
    await stopChild(child, SPDK_STOP_GRACE_MS);
    throw new Error(`${(e as Error).message}\n  (${describeExit(child)})`);
  }
}

function nvmeServers(spdk: string): Server[] {
  const ours = (mode: 'mmap' | 'trap' | 'ioeventfd'): Server => ({
    key: `ours_${mode}`,
    label: `ours, --doorbells ${mode}${mode === 'mmap' ? ' (default)' : ''}`,
    baseline: false,
    async start(dir, image) {
      const args = ['--image', image, '--size', IMAGE_SIZE, '--doorbells', mode];
      const child = await serveOurs(`vfio-user serve examples/nvme --doorbells ${mode}`, 'examples/nvme', path.join(dir, 'cntrl'), args);
      return { child, address: dir, stopGraceMs: 2000 };
    },
  });
  return [
    {
      key: 'spdk_nvmf_tgt',
      label: 'SPDK nvmf_tgt (VFIOUSER, aio bdev)',
      baseline: true,
      async start(dir, image) {
        const rpcSocket = path.join(dir, 'rpc.sock');
        const child = pinned('nvmf_tgt', [spdkProgram(spdk, 'nvmf_tgt'), ...nvmfTargetArgs(rpcSocket, TARGET_MIB)], dir);
        return setUpTarget(child, async () => {
          await serveNvmfTarget(spdk, rpcSocket, image, dir);
          return dir;
        });
      },
    },
    ours('mmap'),
    ours('trap'),
    ours('ioeventfd'),
  ];
}

function virtioServers(spdk: string): Server[] {
  return [
    {
      key: 'spdk_vfu_virtio_blk',
      label: 'SPDK spdk_tgt vfu virtio-blk (aio bdev)',
      baseline: true,
      async start(dir, image) {
        const rpcSocket = path.join(dir, 'rpc.sock');
        const child = pinned('spdk_tgt', [spdkProgram(spdk, 'spdk_tgt'), ...virtioTargetArgs(rpcSocket, HOST_MIB)], dir);
        return setUpTarget(child, () => serveVirtioTarget(spdk, rpcSocket, image, dir));
      },
    },
    {
      key: 'ours_virtio_blk',
      label: `ours, examples/virtio-blk --queues ${VIRTIO_QUEUES} --notify avail`,
      baseline: false,
      async start(dir, image) {
        const socket = path.join(dir, 'blk.sock');
        // SPDK's virtio driver never notifies: the device watches the available rings.
        const child = await serveOurs('vfio-user serve examples/virtio-blk', 'examples/virtio-blk', socket, ['--image', image, '--queues', String(VIRTIO_QUEUES), '--notify', 'avail']);
        return { child, address: socket, stopGraceMs: 2000 };
      },
    },
  ];
}

// ---------------------------------------------------------------------------------------------
// Hosts

interface HostRun {
  ok: boolean;
  output: string;
  /** The run never ended: killed at its deadline. */
  timedOut: boolean;
  /** The host said it started its I/O. */
  started: boolean;
  /** The server's CPU from the host's start of I/O to its exit, as a share of one core. */
  serverCpu?: number;
}

/**
 * Runs one of SPDK's hosts to its end (SIGKILL at `timeoutMs`), sampling the
 * server's CPU time when the host prints `ioStarts` and when it exits.
 */
async function runHost(name: string, argv: string[], timeoutMs: number, server: Running, ioStarts?: RegExp): Promise<HostRun> {
  // Line-buffered: into a pipe SPDK's printf output would arrive only at exit, too late to time I/O's start.
  const child = startChild(name, 'stdbuf', ['-oL', '-eL', ...argv]);
  let output = '';
  let start: { cpu: number; at: number } | undefined;
  const take = (d: Buffer | string) => {
    output += d;
    if (ioStarts && !start && ioStarts.test(output) && !server.child.exited) {
      start = { cpu: processCpuSeconds(server.child.proc.pid!), at: performance.now() };
    }
  };
  child.proc.stdout!.on('data', take);
  child.proc.stderr!.on('data', take);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.proc.kill('SIGKILL');
  }, timeoutMs);
  await child.exitPromise;
  clearTimeout(timer);
  let serverCpu: number | undefined;
  if (start && !timedOut && !server.child.exited) {
    serverCpu = (processCpuSeconds(server.child.proc.pid!) - start.cpu) / ((performance.now() - start.at) / 1000);
  }
  return { ok: !timedOut && child.exitCode === 0, output, timedOut, started: start !== undefined, serverCpu };
}

/** Why a host run gave no figure. */
function failure(run: HostRun, timeoutMs: number): string {
  if (run.timedOut) {
    const what = run.started ? 'its I/O started, then no result' : 'no result';
    return `${what} within ${Math.round(timeoutMs / 1000)} s (killed)${firstError(run.output) ? `; ${firstError(run.output)}` : ''}`;
  }
  return firstError(run.output) ?? (run.output.trim().split('\n').pop() || 'exited without output');
}

// ---------------------------------------------------------------------------------------------
// Rounds

interface Cell {
  /** IOPS by round. */
  iops: Map<number, number>;
  cpu: number[];
  error?: string;
}

interface Row {
  server: Server;
  /** Set when the server cannot be measured at all (did not start, cannot attach, hangs): later rounds skip it. */
  error?: string;
  identity?: string;
  cells: Map<string, Cell>;
}

function makeRows(servers: Server[], workloads: Workload[]): Row[] {
  return servers.map((server) => ({ server, cells: new Map(workloads.map((w) => [w.key, { iops: new Map(), cpu: [] }])) }));
}

/** One line from spdk_nvme_identify's report: who answered. */
function identity(output: string): string {
  const field = (re: RegExp) => re.exec(output)?.[1]?.trim() ?? '?';
  return `model "${field(/Model Number:\s+(.*)/)}", serial "${field(/Serial Number:\s+(.*)/)}", ` +
    `${field(/Number of Namespaces:\s+(\d+)/)} namespace(s), namespace 1 ${field(/Size \(in LBAs\):\s+(\d+)/)} LBAs`;
}

type Measure = (row: Row, server: Running, workload: Workload) => Promise<HostRun & { timeoutMs: number }>;

/**
 * Runs every round: each server in turn on a fresh image, `check` first in its
 * first round (a failure there rules the server out), then each workload.
 */
async function runRounds(title: string, rows: Row[], workloads: Workload[], measure: Measure, check?: (row: Row, server: Running) => Promise<void>): Promise<void> {
  const scratch = scratchDir();
  for (let round = 0; round < ROUNDS; round++) {
    process.stdout.write(`${title} round ${round + 1}/${ROUNDS}:`);
    for (let i = 0; i < rows.length; i++) {
      const row = rows[(i + round) % rows.length];
      if (row.error) continue;
      const dir = fs.mkdtempSync(path.join(scratch, `${row.server.key}-`));
      const image = path.join('/dev/shm', `vfio-user-bench-spdk-${process.pid}-${row.server.key}.img`);
      images.add(image);
      fs.writeFileSync(image, '');
      fs.truncateSync(image, IMAGE_BYTES);
      let running: Running;
      try {
        running = await row.server.start(dir, image);
      } catch (e) {
        row.error = `did not start: ${(e as Error).message}`;
        process.stdout.write(` ${row.server.key}=FAILED`);
        continue;
      }
      try {
        if (check && !row.identity) {
          await check(row, running);
          if (row.error) process.stdout.write(` ${row.server.key}=CANNOT-ATTACH`);
        }
        for (const w of row.error ? [] : workloads) {
          const run = await measure(row, running, w);
          const iops = totalIops(run.output);
          const cell = row.cells.get(w.key)!;
          if (run.ok && iops !== undefined) {
            cell.iops.set(round, iops);
            if (run.serverCpu !== undefined) cell.cpu.push(run.serverCpu);
            process.stdout.write(` ${row.server.key}/${w.key}=${Math.round(iops)}`);
          } else if (run.timedOut) {
            row.error = failure(run, run.timeoutMs);
            process.stdout.write(` ${row.server.key}/${w.key}=HUNG`);
            break;
          } else {
            cell.error = failure(run, run.timeoutMs);
            process.stdout.write(` ${row.server.key}/${w.key}=FAILED`);
          }
        }
      } finally {
        await stopChild(running.child, running.stopGraceMs);
        fs.rmSync(image, { force: true });
      }
    }
    process.stdout.write('\n');
  }
}

async function benchNvme(spdk: string): Promise<Row[]> {
  const rows = makeRows(nvmeServers(spdk), NVME_WORKLOADS);
  const identify = async (row: Row, server: Running) => {
    const argv = [spdkProgram(spdk, 'spdk_nvme_identify'), '-r', transportId(server.address), '-g', '-s', String(HOST_MIB)];
    const run = await runHost('spdk_nvme_identify', argv, HOST_SLACK_MS, server);
    // It exits 0 even when it attached nothing; a report has the controller's model.
    if (run.ok && /Model Number:/.test(run.output)) row.identity = identity(run.output);
    else row.error = `cannot attach: ${failure(run, HOST_SLACK_MS)}`;
  };
  const perf: Measure = async (_row, server, w) => {
    const argv = [
      spdkProgram(spdk, 'spdk_nvme_perf'), '-r', transportId(server.address), '-g', '-s', String(HOST_MIB), '-c', '0x2',
      '-q', String(w.depth), '-o', String(w.size), '-w', w.pattern, '-t', String(SECONDS), '-a', String(PERF_WARMUP_SECONDS),
    ];
    const timeoutMs = (SECONDS + PERF_WARMUP_SECONDS) * 1000 + HOST_SLACK_MS;
    return { ...(await runHost('spdk_nvme_perf', argv, timeoutMs, server, /Initialization complete/)), timeoutMs };
  };
  await runRounds('nvme', rows, NVME_WORKLOADS, perf, identify);
  return rows;
}

async function benchVirtio(spdk: string): Promise<Row[]> {
  const rows = makeRows(virtioServers(spdk), VIRTIO_WORKLOADS);
  const scratch = scratchDir();
  const bdevperf: Measure = async (row, server, w) => {
    const config = path.join(scratch, `bdevperf-${row.server.key}.json`);
    fs.writeFileSync(config, JSON.stringify(virtioBdevConfig(server.address)));
    const argv = [
      // No trace buffer: a bdevperf killed at its deadline would leave it in /dev/shm.
      spdkProgram(spdk, 'bdevperf'), '-m', '0x2', '-g', '-s', String(HOST_MIB), '--num-trace-entries', '0', '--json', config,
      '-q', String(w.depth), '-o', String(w.size), '-w', w.pattern, '-t', String(SECONDS),
    ];
    const timeoutMs = SECONDS * 1000 + HOST_SLACK_MS;
    return { ...(await runHost('bdevperf', argv, timeoutMs, server, /Running I\/O for/)), timeoutMs };
  };
  await runRounds('virtio-blk', rows, VIRTIO_WORKLOADS, bdevperf);
  return rows;
}

// ---------------------------------------------------------------------------------------------
// Report

/** 385219 -> "385 219", as docs/ write figures. */
function grouped(n: number): string {
  return Math.round(n).toLocaleString('en-US').replace(/,/g, ' ');
}

interface Spread {
  median: number;
  min: number;
  max: number;
}

function spread(values: number[]): Spread | undefined {
  return values.length ? { median: median(values), min: Math.min(...values), max: Math.max(...values) } : undefined;
}

interface Summary extends Spread {
  runs: number;
  cpu?: number;
}

function summarize(cell: Cell): Summary | undefined {
  const s = spread([...cell.iops.values()]);
  return s && { ...s, runs: cell.iops.size, cpu: cell.cpu.length ? median(cell.cpu) : undefined };
}

/**
 * The ratio to the baseline round by round (the two ran a few seconds apart, under about the
 * same load; the load moves more between rounds), over the rounds both have.
 */
function ratios(cell: Cell, baseline: Cell): Spread | undefined {
  return spread([...cell.iops].filter(([round]) => baseline.iops.has(round)).map(([round, iops]) => iops / baseline.iops.get(round)!));
}

function times(r: number): string {
  return `${r.toFixed(r < 0.1 ? 3 : 2)}x`;
}

/**
 * SPDK's targets poll, so one that got less than 90% of its core shared it with other processes:
 * a line saying so, to print under its table (the figures then measure the machine's load too).
 */
function starvedBaseline(rows: Row[]): string | undefined {
  const baseline = rows.find((r) => r.server.baseline)!;
  const shares = [...baseline.cells.values()].map((c) => summarize(c)?.cpu).filter((c): c is number => c !== undefined);
  const least = Math.min(...shares);
  if (shares.length === 0 || least >= 0.9) return undefined;
  return `(${baseline.server.label} polls, yet got as little as ${Math.round(least * 100)}% of CPU 0: other processes shared the core, and these figures measure their load too)`;
}

/** A Markdown table (servers down, workloads across), ready to paste into docs/. */
function table(rows: Row[], workloads: Workload[]): string[] {
  const baseline = rows.find((r) => r.server.baseline)!;
  const lines = [`| server | ${workloads.map((w) => w.label).join(' | ')} |`, `|---|${workloads.map(() => '---|').join('')}`];
  for (const row of rows) {
    if (row.error) {
      lines.push(`| ${row.server.label} | ${row.error.split('\n')[0]} |${workloads.slice(1).map(() => ' |').join('')}`);
      continue;
    }
    const cells = workloads.map((w) => {
      const cell = row.cells.get(w.key)!;
      const s = summarize(cell);
      if (!s) return cell.error ?? 'no runs';
      const r = ratios(cell, baseline.cells.get(w.key)!);
      const ratio = row === baseline ? '' : r ? ` **${times(r.median)}**${s.runs > 1 ? ` (${times(r.min)}-${times(r.max)})` : ''}` : ' (no baseline)';
      const range = s.runs > 1 ? ` (${grouped(s.min)}-${grouped(s.max)})` : '';
      const cpu = s.cpu === undefined ? '' : `, CPU ${Math.round(s.cpu * 100)}%`;
      return `${grouped(s.median)}${range}${ratio}${cpu}`;
    });
    lines.push(`| ${row.server.label} | ${cells.join(' | ')} |`);
  }
  return lines;
}

function json(rows: Row[]): object {
  const baseline = rows.find((r) => r.server.baseline)!;
  const round3 = (n: number) => Math.round(n * 1000) / 1000;
  return Object.fromEntries(
    rows.map((row) => [
      row.server.key,
      row.error
        ? { error: row.error.split('\n')[0] }
        : Object.fromEntries([...row.cells].map(([k, cell]) => {
          const s = summarize(cell);
          const r = row === baseline ? undefined : ratios(cell, baseline.cells.get(k)!);
          return [k, s
            ? {
              iops: Math.round(s.median), min: Math.round(s.min), max: Math.round(s.max), cpu: s.cpu === undefined ? null : round3(s.cpu),
              ...(r ? { ratio: round3(r.median), ratio_min: round3(r.min), ratio_max: round3(r.max) } : {}),
            }
            : { error: cell.error ?? 'no runs' }];
        })),
    ]),
  );
}

function conditions(): string {
  const load = os.loadavg().map((l) => l.toFixed(2)).join(' ');
  return `${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC, load average ${load}, ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'})`;
}

/** Images in /dev/shm, removed on every way out (the scratch folder is removed by children.ts). */
const images = new Set<string>();
process.on('exit', () => images.forEach((image) => fs.rmSync(image, { force: true })));

async function main(): Promise<number> {
  if (!SPDK) {
    console.log('bench/spdk: skipped: VFIO_USER_SPDK is not set (an SPDK build, scripts/peers/build-spdk.sh; docs/interop.md)');
    return 0;
  }
  for (const program of ['nvmf_tgt', 'spdk_tgt', 'spdk_nvme_identify', 'spdk_nvme_perf', 'bdevperf'] as const) {
    if (!fs.existsSync(spdkProgram(SPDK, program))) throw new Error(`${spdkProgram(SPDK, program)} not found: rebuild SPDK with scripts/peers/build-spdk.sh`);
  }
  const needMiB = TARGET_MIB + HOST_MIB;
  if (freeHugepagesMiB() < needMiB) {
    throw new Error(`SPDK needs ${needMiB} MiB of free 2 MiB hugepages on a mounted hugetlbfs, there are ${freeHugepagesMiB()} ` +
      '(as root: echo 256 > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs nodev /dev/hugepages)');
  }
  const started = conditions();
  console.log(`bench/spdk: ${ROUNDS} rounds of ${SECONDS} s runs; servers on CPU 0 (taskset), SPDK's hosts on core 1; started ${started}`);
  const nvme = await benchNvme(SPDK);
  const virtio = await benchVirtio(SPDK);
  const ended = conditions();

  console.log('');
  console.log(`SPDK's NVMe host, spdk_nvme_perf -c 0x2 -t ${SECONDS} -a ${PERF_WARMUP_SECONDS}, against each server on a ${IMAGE_SIZE} tmpfs file; ` +
    `IOPS median over ${ROUNDS} rounds (range), ratio to nvmf_tgt's IOPS of the same round (median, range), server CPU (share of one core); ${started} to ${ended.slice(11)}:`);
  console.log('');
  for (const row of nvme) if (row.identity) console.log(`identify ${row.server.key}: ${row.identity}`);
  console.log('');
  table(nvme, NVME_WORKLOADS).forEach((l) => console.log(l));
  const nvmeStarved = starvedBaseline(nvme);
  if (nvmeStarved) console.log(nvmeStarved);
  console.log('');
  console.log(`SPDK's virtio-blk driver, bdevperf -m 0x2 -t ${SECONDS}, against each virtio-blk server (${VIRTIO_QUEUES} queues) on a ${IMAGE_SIZE} tmpfs file; ` +
    `IOPS median over ${ROUNDS} rounds (range), ratio to spdk_tgt's endpoint in the same round (median, range), server CPU:`);
  console.log('');
  table(virtio, VIRTIO_WORKLOADS).forEach((l) => console.log(l));
  const virtioStarved = starvedBaseline(virtio);
  if (virtioStarved) console.log(virtioStarved);
  if (virtio.some((r) => !r.server.baseline && r.error?.includes('no result'))) {
    console.log('(SPDK\'s vfio-user virtio driver never notifies a queue, lib/virtio/virtio_vfio_user.c: a device serves it only by polling its available rings, as SPDK\'s endpoint does; docs/interop.md)');
  }

  const failed = [...nvme, ...virtio].filter((r) => (r.error?.startsWith('did not start') ?? false) ||
    (r.server.baseline && (r.error !== undefined || [...r.cells.values()].some((c) => c.error !== undefined))));
  for (const row of failed) console.log(`\nFAILED ${row.server.key}: ${row.error ?? [...row.cells.values()].find((c) => c.error)?.error}`);
  console.log('');
  console.log(JSON.stringify({ bench: 'vfio-user spdk', rounds: ROUNDS, seconds: SECONDS, started, ended, nvme: json(nvme), virtio_blk: json(virtio) }));
  return failed.length ? 1 : 0;
}

runMain(main);
