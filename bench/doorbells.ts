/**
 * `npm run bench`, doorbells: what DoorbellSource costs, in one process.
 *
 *   store -> ring     a store to a watched word of a mapped page until its
 *                     'ring' event, one at a time (the device pokes after each
 *                     ring, as a controller does after posting completions),
 *                     against the same round trip through an ioeventfd
 *                     (signal -> 'ring'), the cheapest doorbell a VMM offers
 *   after a quiet     the same store after BENCH_QUIET_MS (default 30) without
 *   spell             doorbells: the watcher has backed off to sleeping
 *   idle              the process's CPU (utime + stime from /proc/self/stat)
 *                     over BENCH_IDLE_MS (default 10 000) with 64 words watched
 *                     and nothing rung, as a share of one core; and the
 *                     time the watching itself took over the same spell
 *
 * Latencies are medians over BENCH_ROUNDS (default 5) rounds of
 * BENCH_DOORBELLS (default 2000) round trips. Prints a table, then one JSON line.
 */
import { once } from 'node:events';
import { DoorbellSource, IoEventfd, SharedMemory } from '../ts/index.js';
import { native } from '../ts/native.js';
import { envInt, median, processCpuSeconds, runMain, sleep } from './children.js';

const ROUNDS = envInt('BENCH_ROUNDS', 5, 1);
const TRIPS = envInt('BENCH_DOORBELLS', 2000, 10);
const QUIET_MS = envInt('BENCH_QUIET_MS', 30, 1);
const IDLE_MS = envInt('BENCH_IDLE_MS', 10_000, 100);
const WORDS = 64;

/** Microseconds per round trip: `ring()` starts one, the source's next 'ring' ends it. */
async function roundTrips(source: DoorbellSource, trips: number, ring: (i: number) => void): Promise<number> {
  const started = performance.now();
  for (let i = 1; i <= trips; i++) {
    const rang = once(source, 'ring');
    ring(i);
    await rang;
  }
  return ((performance.now() - started) * 1000) / trips;
}

async function main(): Promise<number> {
  const memory = new SharedMemory(4096);
  // The VMM's mapping of the page, which its guest stores to.
  const guest = new native.NativeMapping(memory.fd, 0n, 4096n, true, true);
  const source = new DoorbellSource({ count: WORDS + 1 });
  const kick = new IoEventfd({ offset: 0, size: 4 });
  const value = Buffer.alloc(4);
  const store = (at: number, v: number) => {
    value.writeUInt32LE(v >>> 0);
    guest.write(4 * at, value);
  };
  // The source does not keep the process alive (a device's server does): this timer never fires.
  const keepAlive = setInterval(() => {}, 2 ** 30);
  try {
    for (let d = 0; d < WORDS; d++) source.watchShared(d, memory, 4 * d, 0);
    source.ringOnSignal(WORDS, kick);
    // As a device does once it has acted on a batch: it expects the next doorbell.
    source.on('ring', () => source.poke());
    const mapped: number[] = [];
    const ioeventfd: number[] = [];
    const quiet: number[] = [];
    let counter = 0;
    for (let r = 0; r < ROUNDS; r++) {
      mapped.push(await roundTrips(source, TRIPS, () => store(7, ++counter)));
      ioeventfd.push(await roundTrips(source, TRIPS, () => kick.signal()));
      const trips: number[] = [];
      for (let i = 0; i < 5; i++) {
        await sleep(QUIET_MS);
        trips.push(await roundTrips(source, 1, () => store(9, ++counter)));
      }
      quiet.push(median(trips));
    }
    // Idle: back off first, then measure.
    await sleep(100);
    const cpuBefore = processCpuSeconds();
    const watcherBefore = source.stats();
    const idleStarted = performance.now();
    await sleep(IDLE_MS);
    const idleSeconds = (performance.now() - idleStarted) / 1000;
    const processShare = (processCpuSeconds() - cpuBefore) / idleSeconds;
    const watcherAfter = source.stats();
    const watcherShare = (watcherAfter.cpuMicros - watcherBefore.cpuMicros) / 1e6 / idleSeconds;
    const wakesPerSecond = (watcherAfter.sleeps - watcherBefore.sleeps) / idleSeconds;

    const result = {
      storeToRingMicros: median(mapped),
      ioeventfdToRingMicros: median(ioeventfd),
      vsIoeventfd: median(mapped) / median(ioeventfd),
      afterQuietMicros: median(quiet),
      idleProcessCoreShare: processShare,
      idleWatcherCoreShare: watcherShare,
      idleWatcherWakesPerSecond: wakesPerSecond,
      stats: source.stats(),
    };
    console.log(`\nDoorbellSource (median of ${ROUNDS} rounds of ${TRIPS} round trips; ${WORDS} words watched)`);
    console.log(`  store -> ring (mapped page, spinning)   ${result.storeToRingMicros.toFixed(1).padStart(8)} µs  ${result.vsIoeventfd.toFixed(2)}x ioeventfd`);
    console.log(`  ioeventfd signal -> ring                ${result.ioeventfdToRingMicros.toFixed(1).padStart(8)} µs`);
    console.log(`  store -> ring after ${QUIET_MS} ms quiet         ${result.afterQuietMicros.toFixed(1).padStart(8)} µs`);
    console.log(`  idle ${(IDLE_MS / 1000).toFixed(0)} s: process ${(100 * processShare).toFixed(2)}% of a core, watching ${(100 * watcherShare).toFixed(3)}%, ${wakesPerSecond.toFixed(0)} wake-ups/s`);
    console.log(JSON.stringify({ bench: 'doorbells', ...result }));
  } finally {
    clearInterval(keepAlive);
    source.close();
    kick.close();
    guest.unmap();
    memory.close();
  }
  return 0;
}

runMain(main);
