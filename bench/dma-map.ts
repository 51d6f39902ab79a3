/**
 * `npm run bench`, part 3: the DMA_MAP + DMA_UNMAP rate, as a guest behind a vIOMMU makes a
 * server pay it on every I/O, beside libvfio-user's.
 *
 * One neutral native client (target/release/bench-dma-map) maps 4 KiB windows of a size-sealed
 * memfd (its fd passed with every DMA_MAP, as QEMU does) and unmaps each at once, in two modes:
 *   synchronous   one command at a time, each reply awaited (a vIOMMU around a single I/O); the
 *                 target (ours >= 1.0x libvfio-user) is checked here
 *   pipelined     32 commands in flight (QEMU inside a memory transaction)
 * against:
 *   ours          `vfio-user serve dist/examples/gpio.js`
 *   libvfio-user  its gpio-pci-idio-16 sample (the same card, with DMA set up), from the meson
 *                 build folder in VFIO_USER_LIBVFIO_USER; skipped, with the reason, without it.
 * Client and server are pinned to CPU 0 (taskset -c 0). Rounds are interleaved and each figure
 * is the median over rounds.
 *
 * Two rates per server: the wall-clock rate the client saw, and the rate on one core: pairs
 * divided by the CPU time client and server spent on them (the client's from its own schedstat,
 * the server's from every thread's). With both pinned to one core and that core to themselves,
 * the two agree; on a shared machine other processes take turns on CPU 0 and only the second
 * says what the server costs. The target (ours >= 1.0x libvfio-user) is checked on it.
 *
 * Environment: BENCH_ROUNDS (default 5), BENCH_MAP_PAIRS (20000 per round), BENCH_MAP_DEPTH (the
 * pipelined depth, 32).
 * Builds nothing: expects target/release/bench-dma-map and dist/.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  describeExit, envInt, median, ROOT, runMain, runToEnd, scratchDir, startChild, stopChild, waitForAccept, waitForSocketFile,
  type Child,
} from './children.js';

const ROUNDS = envInt('BENCH_ROUNDS', 5, 1);
const PAIRS = envInt('BENCH_MAP_PAIRS', 20000, 1);
const MODES = [
  { name: 'synchronous', depth: 1, target: true },
  { name: 'pipelined', depth: envInt('BENCH_MAP_DEPTH', 32, 2), target: false },
] as const;
type Mode = (typeof MODES)[number];
const WARMUP = 1000;
const TARGET = 1.0;
const CLIENT = path.join(ROOT, 'target', 'release', 'bench-dma-map');
const CLI = path.join(ROOT, 'dist', 'ts', 'cli', 'main.js');
const GPIO_EXAMPLE = path.join(ROOT, 'dist', 'examples', 'gpio.js');

interface Server {
  key: 'ours' | 'libvfio_user';
  label: string;
  child: Child;
  socket: string;
  rounds: Map<Mode, { wall: number; oneCore: number; serverUsPerPair: number }[]>;
}

/** CPU time (ns) every thread of `pid` has run so far. */
function processCpuNs(pid: number): number {
  let total = 0;
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      total += Number(fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // the thread ended between the listing and the read
    }
  }
  return total;
}

async function startOurs(dir: string): Promise<Server> {
  const socket = path.join(dir, 'ours.sock');
  const child = startChild('vfio-user serve (gpio example)', 'taskset', ['-c', '0', process.execPath, CLI, 'serve', GPIO_EXAMPLE, '--socket', socket]);
  await waitForAccept(child, socket);
  return { key: 'ours', label: 'ours: vfio-user serve gpio', child, socket, rounds: new Map(MODES.map((m) => [m, []])) };
}

async function startLibvfioUser(dir: string, build: string): Promise<Server> {
  const socket = path.join(dir, 'libvfio-user.sock');
  const sample = path.join(build, 'samples', 'gpio-pci-idio-16');
  if (!fs.existsSync(sample)) throw new Error(`${sample} not found: VFIO_USER_LIBVFIO_USER must be a libvfio-user meson build folder`);
  const child = startChild('libvfio-user gpio-pci-idio-16', 'taskset', ['-c', '0', sample, socket]);
  await waitForSocketFile(child, socket);
  return { key: 'libvfio_user', label: 'libvfio-user: gpio-pci-idio-16 sample', child, socket, rounds: new Map(MODES.map((m) => [m, []])) };
}

async function round(server: Server, mode: Mode): Promise<void> {
  const pid = server.child.proc.pid!;
  const before = processCpuNs(pid);
  const line = await runToEnd('bench-dma-map', 'taskset', [
    '-c', '0', CLIENT, '--socket', server.socket, '--pairs', String(PAIRS), '--warmup', String(WARMUP), '--depth', String(mode.depth),
  ], 120_000);
  const serverNs = processCpuNs(pid) - before;
  const j = JSON.parse(line) as { pairs_per_sec: number; cpu_ns: number };
  // The server's count includes the client's warm-up pairs; charge it only its share of the timed ones.
  const serverTimedNs = serverNs * (PAIRS / (PAIRS + WARMUP));
  server.rounds.get(mode)!.push({
    wall: j.pairs_per_sec,
    oneCore: PAIRS / ((j.cpu_ns + serverTimedNs) / 1e9),
    serverUsPerPair: serverTimedNs / PAIRS / 1000,
  });
}

async function main(): Promise<number> {
  if (!fs.existsSync(CLIENT)) throw new Error(`${CLIENT} not found; build it with: cargo build --release -p vfio-user-bench`);
  const dir = scratchDir();
  const lvuBuild = process.env.VFIO_USER_LIBVFIO_USER;
  const servers = [await startOurs(dir)];
  if (lvuBuild) servers.push(await startLibvfioUser(dir, lvuBuild));

  console.log(
    `\nDMA_MAP + DMA_UNMAP pairs: 4 KiB windows of a sealed memfd, its fd passed with every map; ` +
      `client and server on CPU 0; ${ROUNDS} rounds x ${PAIRS} pairs (+${WARMUP} warm-up) per mode`,
  );
  try {
    for (let r = 0; r < ROUNDS; r++) {
      for (const mode of MODES) {
        for (let i = 0; i < servers.length; i++) {
          const server = servers[(i + r) % servers.length];
          if (server.child.exited) throw new Error(describeExit(server.child));
          await round(server, mode);
        }
      }
    }
  } finally {
    await Promise.all(servers.map((s) => stopChild(s.child)));
  }

  const W = 40;
  const results = MODES.map((mode) => {
    const summary = servers.map((s) => {
      const rounds = s.rounds.get(mode)!;
      return {
        server: s.key,
        wallPairsPerSec: median(rounds.map((x) => x.wall)),
        oneCorePairsPerSec: median(rounds.map((x) => x.oneCore)),
        serverUsPerPair: median(rounds.map((x) => x.serverUsPerPair)),
      };
    });
    console.log(`\n${mode.name} (${mode.depth === 1 ? 'each reply awaited' : `${mode.depth} in flight`})`);
    console.log(`${'server'.padEnd(W)}  ${'pairs/s wall'.padStart(12)}  ${'pairs/s one core'.padStart(16)}  ${'server us/pair'.padStart(14)}`);
    servers.forEach((s, i) => {
      const m = summary[i];
      console.log(`${s.label.padEnd(W)}  ${m.wallPairsPerSec.toFixed(0).padStart(12)}  ${m.oneCorePairsPerSec.toFixed(0).padStart(16)}  ${m.serverUsPerPair.toFixed(1).padStart(14)}`);
    });
    let ratio: { wall: number; oneCore: number; pass?: boolean } | null = null;
    if (summary.length === 2) {
      const [ours, lvu] = summary;
      ratio = { wall: ours.wallPairsPerSec / lvu.wallPairsPerSec, oneCore: ours.oneCorePairsPerSec / lvu.oneCorePairsPerSec };
      const verdict = mode.target ? ` (target >= ${TARGET.toFixed(1)}x: ${ratio.oneCore >= TARGET ? 'PASS' : 'MISS'})` : '';
      if (mode.target) ratio.pass = ratio.oneCore >= TARGET;
      console.log(`ours / libvfio-user: ${ratio.oneCore.toFixed(2)}x on one core${verdict}, ${ratio.wall.toFixed(2)}x by the wall clock`);
    } else {
      console.log('libvfio-user: skipped (VFIO_USER_LIBVFIO_USER is not set; point it at a libvfio-user meson build folder holding samples/)');
    }
    return { mode: mode.name, depth: mode.depth, servers: summary, ratio };
  });
  console.log(JSON.stringify({ bench: 'dma-map', pairs: PAIRS, rounds: ROUNDS, results }));
  return 0;
}

runMain(main);
