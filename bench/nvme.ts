/**
 * `npm run bench`, NVMe: IOPS of examples/nvme driven by the test host
 * (__test__/nvme-host.ts) over a real socket, in one process, beside the raw
 * cost of the same data movement measured in the same run.
 *
 *   randread 4 KiB   random 4 KiB reads at queue depth 1 and 32
 *   seqread 128 KiB  sequential 128 KiB reads (PRP lists) at queue depth 1 and 32
 *   doorbells        'trap' (posted REGION_WRITEs), 'trap+shadow' (the same
 *                    after Doorbell Buffer Config: the host writes the
 *                    register only when EventIdx asks, as Linux does), 'mmap'
 *                    (the host stores to the mapped page, the controller's
 *                    DoorbellSource watches it) and 'ioeventfd' (shadow
 *                    doorbells; the host's client signals the device's
 *                    ioeventfds as KVM would)
 *   raw              fs.readSync from the same image into a view of the same
 *                    guest memory, in a loop: what each command must cost at
 *                    least. The ratio is IOPS / raw operations per second.
 *
 * The image is a 64 MiB file in the page cache. Host and controller share one
 * event loop, so the host's own work counts against the controller's.
 *   stages           for 4 KiB random reads at queue depth 1, traced: the
 *                    median and 99th percentile of the microseconds from a
 *                    command's doorbell seen (found natively in watched
 *                    memory, or delivered to JS) to its batch delivered to
 *                    JS, its entry fetched, its read submitted to the store
 *                    and done, its completion posted, its interrupt signalled
 *   idle             the process's CPU (utime + stime) over BENCH_IDLE_MS
 *                    (default 10 000) with every controller enabled, its I/O
 *                    queue created and nothing rung, as a share of one core,
 *                    and each controller's doorbell watcher's own share
 *
 * Figures are medians over BENCH_ROUNDS (default 3) interleaved rounds of
 * BENCH_NVME_MS (default 1000) each. Prints tables, then one JSON line, and
 * draws them into docs/img/ (bench/chart.ts): nvme-iops.svg (IOPS by
 * workload and mode), nvme-stages.svg (each mode's median time per stage,
 * end to end) and nvme-stages-<mode>.svg (each stage's latency histogram).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createServer, connect, type VfioUserServer } from '../ts/index.js';
import createDevice from '../examples/nvme/index.js';
import type { NvmeController } from '../examples/nvme/controller.js';
import { CommandTrace, STAGES, type Stage } from '../examples/nvme/trace.js';
import { NvmeHost, PAGE } from '../__test__/nvme-host.js';
import { envInt, median, processCpuSeconds, runMain, scratchDir, sleep } from './children.js';
import { barChart, format, histogram, machineNote, percentile, stackedBars, writeChart } from './chart.js';

const ROUNDS = envInt('BENCH_ROUNDS', 3, 1);
const RUN_MS = envInt('BENCH_NVME_MS', 1000, 50);
const IDLE_MS = envInt('BENCH_IDLE_MS', 10_000, 100);
const IMAGE_BYTES = 64 << 20;
const READ = 0x02;

interface Workload { name: string; bytes: number; qd: number; random: boolean }
const WORKLOADS: Workload[] = [
  { name: 'randread 4 KiB', bytes: 4096, qd: 1, random: true },
  { name: 'randread 4 KiB', bytes: 4096, qd: 32, random: true },
  { name: 'seqread 128 KiB', bytes: 128 << 10, qd: 1, random: false },
  { name: 'seqread 128 KiB', bytes: 128 << 10, qd: 32, random: false },
];
const MODES = ['trap', 'trap+shadow', 'mmap', 'ioeventfd'] as const;

interface Target { mode: string; server: VfioUserServer; device: NvmeController; host: NvmeHost }

async function start(mode: string, image: string, socket: string): Promise<Target> {
  const [doorbells, shadow] = mode.split('+');
  const device = createDevice(['--image', image, '--doorbells', doorbells]);
  const server = createServer(device);
  await server.listen(socket);
  const host = await NvmeHost.attach(await connect(socket, { timeoutMs: 0 }));
  await host.enable();
  if (shadow || doorbells === 'ioeventfd') await host.shadowDoorbells();
  await host.createIoQueuePair(1, 64);
  return { mode, server, device, host };
}

/** Keeps `w.qd` commands in flight for RUN_MS; returns commands per second. */
async function iops(host: NvmeHost, w: Workload): Promise<number> {
  const blocks = w.bytes / 512;
  const slots = IMAGE_BYTES / w.bytes;
  const buffers = Array.from({ length: w.qd }, () => {
    const pages = host.scatteredPages(w.bytes / PAGE);
    return host.prps(pages);
  });
  let next = 0;
  let done = 0;
  const end = performance.now() + RUN_MS;
  const worker = async (i: number) => {
    while (performance.now() < end) {
      const slot = w.random ? Math.floor(Math.random() * slots) : next++ % slots;
      const c = await host.submit(1, { opcode: READ, nsid: 1, ...buffers[i], cdw10: slot * blocks, cdw12: blocks - 1 });
      if (c.status !== 0) throw new Error(`read failed with status 0x${c.status.toString(16)}`);
      done++;
    }
  };
  const started = performance.now();
  await Promise.all(Array.from({ length: w.qd }, (_, i) => worker(i)));
  return done / ((performance.now() - started) / 1000);
}

/** fs.readSync of the same sizes from the same image into a view of guest memory, as fast as it goes. */
function rawCopies(target: Target, image: string, w: Workload): number {
  const fd = fs.openSync(image, 'r');
  const iova = target.host.alloc(w.bytes);
  const view = target.device.dma.view(iova, w.bytes);
  const slots = IMAGE_BYTES / w.bytes;
  let n = 0;
  const started = performance.now();
  const end = started + RUN_MS / 4;
  while (performance.now() < end) {
    for (let i = 0; i < 64; i++, n++) fs.readSync(fd, view, 0, w.bytes, (w.random ? Math.floor(Math.random() * slots) : n % slots) * w.bytes);
  }
  fs.closeSync(fd);
  return n / ((performance.now() - started) / 1000);
}

async function main(): Promise<number> {
  const dir = scratchDir();
  const image = path.join(dir, 'nvme.img');
  const fill = Buffer.alloc(1 << 20);
  for (let i = 0; i < fill.length; i += 4) fill.writeUInt32LE((i * 2654435761) >>> 0, i);
  const fd = fs.openSync(image, 'w');
  for (let at = 0; at < IMAGE_BYTES; at += fill.length) fs.writeSync(fd, fill, 0, fill.length, at);
  fs.closeSync(fd);

  const targets = [];
  for (const mode of MODES) targets.push(await start(mode, image, path.join(dir, `nvme-${mode}.sock`)));
  const results: { workload: Workload; mode: string; iops: number; range: [number, number]; raw: number }[] = [];
  const stages: { mode: string; stage: string; median: number; p99: number }[] = [];
  const traces = new Map<string, { trace: CommandTrace; iops: number }>();
  const idle: { mode: string; watcherShare: number }[] = [];
  let idleProcessShare = 0;
  try {
    for (const w of WORKLOADS) {
      const rounds = new Map<string, number[]>(targets.map((t) => [t.mode, []]));
      const raw: number[] = [];
      for (let r = 0; r < ROUNDS; r++) {
        for (const t of r % 2 === 0 ? targets : [...targets].reverse()) rounds.get(t.mode)!.push(await iops(t.host, w));
        raw.push(rawCopies(targets[0], image, w));
      }
      for (const t of targets) {
        const measured = rounds.get(t.mode)!;
        results.push({ workload: w, mode: t.mode, iops: median(measured), range: [Math.min(...measured), Math.max(...measured)], raw: median(raw) });
      }
    }
    for (const t of targets) {
      const trace = (t.device.trace = new CommandTrace());
      const traced = await iops(t.host, WORKLOADS[0]);
      t.device.trace = undefined;
      traces.set(t.mode, { trace, iops: traced });
      for (const stage of STAGES) {
        const samples = trace.samples[stage].filter(Number.isFinite);
        stages.push({ mode: t.mode, stage, median: percentile(samples, 0.5), p99: percentile(samples, 0.99) });
      }
    }
    // Idle: let the watchers back off, then measure.
    await sleep(200);
    const cpuBefore = processCpuSeconds();
    const watchersBefore = targets.map((t) => t.device.doorbellStats.cpuMicros);
    const idleStarted = performance.now();
    await sleep(IDLE_MS);
    const idleSeconds = (performance.now() - idleStarted) / 1000;
    idleProcessShare = (processCpuSeconds() - cpuBefore) / idleSeconds;
    targets.forEach((t, i) => idle.push({ mode: t.mode, watcherShare: (t.device.doorbellStats.cpuMicros - watchersBefore[i]) / 1e6 / idleSeconds }));
  } finally {
    for (const t of targets) {
      t.host.close();
      t.host.client.close();
      await t.server.close();
      t.device.close();
    }
  }

  console.log('\nNVMe through the test host (IOPS; ratio = IOPS / raw fs.readSync-into-view operations per second; x trap = IOPS / trap IOPS)');
  console.log('workload           QD  doorbells          IOPS   MiB/s      raw ops/s   ratio  x trap');
  const trapIops = (r: (typeof results)[number]) => results.find((t) => t.workload === r.workload && t.mode === 'trap')!.iops;
  for (const r of results) {
    const mib = (r.iops * r.workload.bytes) / 2 ** 20;
    console.log(`${r.workload.name.padEnd(18)} ${String(r.workload.qd).padStart(2)}  ${r.mode.padEnd(12)} ${r.iops.toFixed(0).padStart(11)} ${mib.toFixed(0).padStart(7)} ${r.raw.toFixed(0).padStart(14)} ${(r.iops / r.raw).toFixed(3).padStart(7)} ${(r.iops / trapIops(r)).toFixed(2).padStart(7)}`);
  }
  console.log(`\nWhere a 4 KiB QD1 read's time goes (µs since ${ORIGIN}; median / p99; cycle = 1 / IOPS of the traced run)`);
  console.log(`doorbells     ${STAGES.map((s) => s.padStart(16)).join('')}     cycle`);
  for (const t of targets) {
    const row = STAGES.map((stage) => {
      const s = stages.find((x) => x.mode === t.mode && x.stage === stage)!;
      return (Number.isFinite(s.median) ? `${s.median.toFixed(1)} / ${s.p99.toFixed(1)}` : 'on delivery').padStart(16);
    });
    console.log(`${t.mode.padEnd(12)}  ${row.join('')} ${(1e6 / traces.get(t.mode)!.iops).toFixed(1).padStart(9)}`);
  }
  console.log(`\nIdle ${(IDLE_MS / 1000).toFixed(0)} s, ${targets.length} controllers enabled: process ${(100 * idleProcessShare).toFixed(2)}% of a core; doorbell watchers ${idle.map((i) => `${i.mode} ${(100 * i.watcherShare).toFixed(3)}%`).join(', ')}`);
  drawCharts(results, traces);
  console.log(JSON.stringify({
    bench: 'nvme',
    stages,
    idle: { processCoreShare: idleProcessShare, watchers: idle },
    results: results.map((r) => ({ workload: r.workload.name, qd: r.workload.qd, doorbells: r.mode, iops: r.iops, rawOpsPerSec: r.raw, ratio: r.iops / r.raw, vsTrap: r.iops / trapIops(r), iopsRange: r.range })),
  }));
  return 0;
}

/** Where the trace's times start (examples/nvme/trace.ts). */
const ORIGIN = 'the doorbell was seen';

/** What each stage adds to a command's time: the step that ends at it. */
const STEP: Record<Stage, string> = {
  seen: 'reach JS',
  fetched: 'fetch the entry',
  submitted: 'hand to the store',
  done: 'the read',
  posted: 'stage the completion',
  interrupted: 'write completions, interrupt',
};

/** docs/img/nvme-*.svg from this run's figures. */
function drawCharts(results: { workload: Workload; mode: string; iops: number; range: [number, number] }[], traces: ReadonlyMap<string, { trace: CommandTrace; iops: number }>): void {
  const machine = machineNote();
  const panels = WORKLOADS.map((w) => {
    const trap = results.find((r) => r.workload === w && r.mode === 'trap')!.iops;
    return {
      title: `${w.name}, QD ${w.qd}`,
      bars: results.filter((r) => r.workload === w).map((r) => ({ label: r.mode, value: r.iops, range: r.range, note: `${(r.iops / trap).toFixed(2)}x trap` })),
    };
  });
  const written = [writeChart('nvme-iops', barChart({
    title: 'NVMe example through the test host: IOPS by doorbell mode',
    unit: 'IOPS (median of rounds)',
    panels,
    caption: `Host and controller in one process, a 64 MiB image in the page cache; medians of ${ROUNDS} rounds of ${RUN_MS} ms, the whisker from the lowest round to the highest. ${machine}`,
  }))];

  const traced = `4 KiB random reads at QD 1 for ${RUN_MS} ms in each mode, traced (examples/nvme/trace.ts). A doorbell in watched memory (mmap) is seen when native code finds it, "seen" its way from there to JS; a trapped write or a kick is seen as it reaches JS.`;
  // At QD 1 a command's whole cycle is 1 / IOPS: what the stages leave of it is the host's
  // own work (in this process) and the doorbell's way to JS.
  const rows = [...traces].map(([mode, { trace, iops: rate }]) => {
    // Each segment is the step from the stage before it that was measured ("seen" is not, for trapped writes and kicks).
    let before = 0;
    const values = STAGES.map((stage) => {
      const median = percentile(trace.samples[stage].filter(Number.isFinite), 0.5);
      if (!Number.isFinite(median)) return 0;
      const step = median - before;
      before = median;
      return step;
    });
    return { label: mode, values, note: `of ${format(1e6 / rate)} µs a command` };
  });
  written.push(writeChart('nvme-stages', stackedBars({
    title: 'Where a 4 KiB QD1 read\'s time goes: median time to each stage, by doorbell mode',
    unit: `µs since ${ORIGIN} (medians)`,
    segments: STAGES.map((stage) => STEP[stage]),
    rows,
    caption: `${traced} Each segment is the step from the stage before. "of N µs a command": 1 / IOPS of the traced run, a command's whole cycle at QD 1; the rest is the host's work (in the same process) and the doorbell's way until it is seen: a message or an eventfd to JS, or for mmap the wait until a scan finds the store. ${machine}`,
  })));
  for (const [mode, { trace }] of traces) {
    written.push(writeChart(`nvme-stages-${mode.replace(/\W+/g, '-')}`, histogram({
      title: `4 KiB QD1 read, doorbells ${mode}: when each stage is reached`,
      unit: `µs since ${ORIGIN}`,
      // Every stage has its row, measured or not ("seen" for trapped writes and kicks), in the
      // colour of the step that ends at it in nvme-stages.svg.
      rows: STAGES.map((stage) => ({ label: stage, samples: trace.samples[stage] })),
      caption: `${traced} ${machine}`,
    })));
  }
  console.log(`\nCharts: ${written.map((f) => path.relative(process.cwd(), f)).join(', ')}`);
}

runMain(main);
