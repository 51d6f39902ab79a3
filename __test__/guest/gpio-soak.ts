/**
 * The guest soak (issue 9; run by hand, not in CI): a QEMU guest toggles GPIO lines through
 * Linux's gpio-pci-idio-16 driver for a while against `vfio-user serve` of the GPIO example,
 * in a process of its own, whose RSS and open fds are sampled every 30 s, with V8's heap after
 * its latest full GC (live and committed MB, from the server's --trace-gc lines): RSS steps up
 * while V8 grows its young generation to its ceiling, so the heap tells a leak from growth.
 *
 *   VFIO_USER_QEMU=... VFIO_USER_GUEST=... npx tsx __test__/guest/gpio-soak.ts [SECONDS]
 *
 * SECONDS is the guest's toggling time (default 600). Needs `npm run build` (it serves
 * dist/examples/gpio.js). Prints one line per sample, then a JSON summary.
 */
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { bootGuest } from './boot.js';
import { tempSocketPath, until } from '../helpers.js';

const SECONDS = Number(process.argv[2] ?? 600);
const SAMPLE_MS = 30_000;
const ROOT = resolve(__dirname, '..', '..');

interface Sample { t: number; rssKiB: number; fds: number; heapLiveMB?: number; heapCommittedMB?: number }

/** The heap after the server's latest full GC, as --trace-gc prints it: "Mark-Compact 17.2 (49.5) -> 9.2 (43.5) MB". */
const heap: { liveMB?: number; committedMB?: number } = {};
const FULL_GC = /Mark-Compact.*?-> ([\d.]+) \(([\d.]+)\) MB/;

function sample(pid: number, start: number): Sample {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const rssKiB = Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]);
  const fds = readdirSync(`/proc/${pid}/fd`).length;
  return { t: Math.round((Date.now() - start) / 1000), rssKiB, fds, heapLiveMB: heap.liveMB, heapCommittedMB: heap.committedMB };
}

async function main(): Promise<void> {
  const socket = tempSocketPath('gpio.sock');
  const server = spawn(process.execPath, ['--trace-gc', join(ROOT, 'dist/ts/cli/main.js'), 'serve', join(ROOT, 'dist/examples/gpio.js'), '--socket', socket.path], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  createInterface({ input: server.stdout! }).on('line', (line) => {
    const full = FULL_GC.exec(line);
    if (full) [heap.liveMB, heap.committedMB] = [Number(full[1]), Number(full[2])];
    else if (!line.includes('Scavenge')) console.log(line);
  });
  try {
    await until(() => existsSync(socket.path), 30_000);
    const start = Date.now();
    const samples: Sample[] = [];
    const take = () => {
      const s = sample(server.pid!, start);
      samples.push(s);
      console.log(`t=${s.t}s rss=${(s.rssKiB / 1024).toFixed(1)} MiB fds=${s.fds} heap=${s.heapLiveMB ?? '-'} MB live, ${s.heapCommittedMB ?? '-'} MB committed`);
    };
    take();
    const timer = setInterval(take, SAMPLE_MS);
    // Outputs alternate between two patterns; every round also reads all 16 inputs back.
    const script = `
set -e
modprobe gpio-pci-idio-16
gpiodetect
end=$(( $(cut -d. -f1 /proc/uptime) + ${SECONDS} ))
n=0
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
  gpioset gpiochip0 0=1 1=0 2=1 3=0 4=1 5=0 6=1 7=0 8=1 9=0 10=1 11=0 12=1 13=0 14=1 15=0
  gpioset gpiochip0 0=0 1=1 2=0 3=1 4=0 5=1 6=0 7=1 8=0 9=1 10=0 11=1 12=0 13=1 14=0 15=1
  gpioget gpiochip0 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 > /dev/null
  n=$((n + 1))
done
echo "=== TOGGLE ROUNDS $n"
`;
    const run = await bootGuest({ script, sockets: [socket.path], timeoutMs: (SECONDS + 300) * 1000 });
    clearInterval(timer);
    const end = samples[samples.length - 1];
    // Once QEMU is gone: what the server keeps after its client left.
    await new Promise((r) => setTimeout(r, 1000));
    const afterGuest = sample(server.pid!, start);
    const rounds = /=== TOGGLE ROUNDS (\d+)/.exec(run.console)?.[1];
    console.log(JSON.stringify({
      soak: 'gpio guest', seconds: SECONDS, guestRc: run.rc, toggleRounds: rounds === undefined ? null : Number(rounds),
      start: samples[0], end, afterGuest,
      rssMiB: { min: Math.min(...samples.map((s) => s.rssKiB)) / 1024, max: Math.max(...samples.map((s) => s.rssKiB)) / 1024 },
      fds: { min: Math.min(...samples.map((s) => s.fds)), max: Math.max(...samples.map((s) => s.fds)) },
      samples,
    }));
    if (run.rc !== 0) {
      console.error(`the guest failed (${run.exit}):\n${run.console.slice(-3000)}`);
      process.exitCode = 1;
    }
  } finally {
    server.kill('SIGTERM');
    socket.cleanup();
  }
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
