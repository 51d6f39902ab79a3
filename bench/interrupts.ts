/**
 * `npm run bench`, interrupts: what signalling a client's eventfd costs the
 * event loop's thread, per interrupt, measured natively in one process:
 *
 *   check then write   poll(0) for POLLOUT, then write: how interrupts were
 *                      signalled before writes had a deadline (a client that
 *                      fills the counter between the two blocked the loop)
 *   signal             eventfd::signal: the same, with the write bounded by
 *                      this thread's POSIX timer (armed and disarmed around it)
 *
 * The eventfd is blocking, as clients hand them over. Figures are medians over
 * BENCH_ROUNDS (default 5) interleaved rounds of BENCH_SIGNALS (default 200 000)
 * signals. Prints a table, then one JSON line.
 */
import { native } from '../ts/native.js';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const SIGNALS = Number(process.env.BENCH_SIGNALS ?? 200_000);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const before: number[] = [];
const now: number[] = [];
for (let r = 0; r < ROUNDS; r++) {
  const [checkThenWrite, signal] = native.eventfdSignalCosts(SIGNALS);
  before.push(checkThenWrite);
  now.push(signal);
}
const result = { checkThenWriteNs: median(before), signalNs: median(now), ratio: median(now) / median(before) };
console.log('interrupt signal cost per interrupt (ns, median of ' + ROUNDS + ' rounds of ' + SIGNALS + ')');
console.log(`  check then write  ${result.checkThenWriteNs.toFixed(0).padStart(7)}`);
console.log(`  signal            ${result.signalNs.toFixed(0).padStart(7)}   ${result.ratio.toFixed(2)}x`);
console.log(JSON.stringify({ bench: 'interrupts', ...result }));
