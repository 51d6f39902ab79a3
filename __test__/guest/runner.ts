/**
 * What the guest runs (nvme.ts, virtio.ts, virtio-net.ts) share: the peers
 * they need, a scratch folder, the processes they spawn and their exit.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const root = join(__dirname, '..', '..');

export class GuestRunner {
  readonly qemu: string;
  readonly guest: string;
  /** Scratch folder for sockets, images and scripts; removed when the run ends. */
  readonly dir: string;
  private readonly children: ChildProcess[] = [];

  /** `name` prefixes the runner's messages; exits 1 when VFIO_USER_QEMU or VFIO_USER_GUEST is missing. */
  constructor(private readonly name: string) {
    const qemu = process.env.VFIO_USER_QEMU;
    const guest = process.env.VFIO_USER_GUEST;
    if (!qemu || !existsSync(qemu)) this.fail('VFIO_USER_QEMU must name a qemu-system-x86_64 10.1+ built with vfio-user-pci (see docs/interop.md)');
    if (!guest || !existsSync(join(guest, 'vmlinuz'))) this.fail('VFIO_USER_GUEST must name the guest kit\'s output folder (vmlinuz, initramfs.cpio.gz; see docs/interop.md)');
    this.qemu = qemu;
    this.guest = guest;
    this.dir = mkdtempSync(join(tmpdir(), 'vfu-guest-'));
  }

  fail(message: string): never {
    console.error(`${this.name}: ${message}`);
    process.exit(1);
  }

  /** Node with tsx's loader running `args`; ended with SIGTERM when the run ends. */
  node(args: string[]): void {
    this.children.push(spawn(process.execPath, ['--import', 'tsx', ...args], { stdio: ['ignore', 'inherit', 'inherit'] }));
  }

  /** `vfio-user serve MODULE` (a path under the repository) on DIR/NAME.sock with `args` after `--`; returns the socket. */
  serve(module: string, name: string, args: string[] = []): string {
    const socket = join(this.dir, `${name}.sock`);
    this.node([join(root, 'ts/cli/main.ts'), 'serve', join(root, module), '--socket', socket, '--', ...args]);
    return socket;
  }

  /** Resolves once every path exists; fails the run after `ms`. */
  async waitFor(paths: string[], ms = 60_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!paths.every((p) => existsSync(p))) {
      if (Date.now() > deadline) this.fail(`the servers did not start (${paths.filter((p) => !existsSync(p)).join(', ')} missing)`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /**
   * Writes the guest script `name` (a file beside this one) to the scratch
   * folder, after the shared functions of rounds.sh and with each
   * `__KEY__` replaced by `values[KEY]`; returns its path.
   */
  script(name: string, values: Record<string, string | number>): string {
    let text = readFileSync(join(__dirname, 'rounds.sh'), 'utf8') + readFileSync(join(__dirname, name), 'utf8');
    for (const [key, value] of Object.entries(values)) text = text.replaceAll(`__${key}__`, String(value));
    const path = join(this.dir, name);
    writeFileSync(path, text);
    return path;
  }

  /** scripts/peers/run-guest.sh with this runner's QEMU and guest, then `args`; the loop stays free meanwhile. */
  boot(args: string[]): Promise<{ status: number | null; stdout: string }> {
    const child = spawn(join(root, 'scripts', 'peers', 'run-guest.sh'), ['--qemu', this.qemu, '--guest', this.guest, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
    let stdout = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    return new Promise((resolve) => child.on('exit', (status) => resolve({ status, stdout })));
  }

  /** Runs `main` for the process's exit code, then ends what was spawned and removes the scratch folder. */
  run(main: () => Promise<number>): void {
    main()
      .then((code) => (process.exitCode = code))
      .catch((error: unknown) => {
        console.error(error);
        process.exitCode = 1;
      })
      .finally(() => {
        for (const c of this.children) c.kill('SIGTERM');
        rmSync(this.dir, { recursive: true, force: true });
      });
  }
}

/** The median of `values` (the mean of the middle two for an even count). */
function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/**
 * Prints fio's figures beside the reference device's (`qemu`): per job and
 * device the median IOPS over the rounds (the devices take turns within a
 * round) and the median of the per-round ratios to the reference's IOPS of
 * the same round, with their range. TCG's runs differ by a third from one
 * round to the next: a single round says little.
 */
export function printFio(console_: string, tag: string, reference: string): void {
  const fio = [...console_.matchAll(new RegExp(`${tag} round=(\\d+) device=(\\S+) job=(\\S+) kibps=(\\d+) iops=(\\d+)`, 'g'))]
    .map((m) => ({ round: m[1]!, device: m[2]!, job: m[3]!, kibps: Number(m[4]), iops: Number(m[5]) }));
  if (fio.length === 0) return;
  const rounds = new Set(fio.map((r) => r.round)).size;
  console.log(`\nfio in the guest (TCG), same guest and run, ${rounds} round(s); IOPS and MiB/s: medians over the rounds; ratio = IOPS / QEMU built-in ${reference} IOPS of the same round, median (range)`);
  console.log('job                 device                IOPS      MiB/s   ratio');
  const keys = [...new Set(fio.map((r) => `${r.job} ${r.device}`))];
  for (const key of keys) {
    const runs = fio.filter((r) => `${r.job} ${r.device}` === key);
    const { job, device } = runs[0]!;
    const ratios = runs.flatMap((r) => {
      const ref = fio.find((x) => x.job === job && x.device === 'qemu' && x.round === r.round);
      return ref && ref.iops > 0 ? [r.iops / ref.iops] : [];
    });
    const ratio = ratios.length === 0 ? '' : `${median(ratios).toFixed(2)}${ratios.length > 1 ? ` (${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)})` : ''}`;
    console.log(`${job.padEnd(19)} ${device.padEnd(16)} ${String(Math.round(median(runs.map((r) => r.iops)))).padStart(9)} ${(median(runs.map((r) => r.kibps)) / 1024).toFixed(1).padStart(10)}   ${ratio}`);
  }
}
