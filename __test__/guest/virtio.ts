/**
 * The virtio examples under a real Linux driver: QEMU boots the guest kit
 * with our examples/virtio-blk, virtio-rng and virtio-console (vfio-user-pci) and
 * QEMU's built-in `-device virtio-blk-pci` on a raw image of the same size.
 * The guest script (virtio-guest.sh) checks that virtio_pci binds them,
 * runs fio 4K randread at QD1 and QD32 on both disks, checks ext4 on ours,
 * reads /dev/hwrng and moves a line each way through /dev/hvc0 (this
 * runner answers the guest's line on the console's socket). Prints the fio figures with ratios to QEMU's.
 *
 *   source ~/peers/ENV && npx tsx __test__/guest/virtio.ts
 *
 * Needs VFIO_USER_QEMU and VFIO_USER_GUEST (docs/interop.md).
 * VIRTIO_GUEST_RUNTIME sets each fio job's seconds (default 10). Not run by CI.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createConnection } from 'node:net';
import { join } from 'node:path';

const root = join(__dirname, '..', '..');
const IMAGE_SIZE = '256M';
const runtime = Number(process.env.VIRTIO_GUEST_RUNTIME ?? 10);

function fail(message: string): never {
  console.error(`virtio guest: ${message}`);
  process.exit(1);
}

const qemu = process.env.VFIO_USER_QEMU;
const guest = process.env.VFIO_USER_GUEST;
if (!qemu || !existsSync(qemu)) fail('VFIO_USER_QEMU must name a qemu-system-x86_64 10.1+ built with vfio-user-pci (see docs/interop.md)');
if (!guest || !existsSync(join(guest, 'vmlinuz'))) fail('VFIO_USER_GUEST must name the guest kit\'s output folder (see docs/interop.md)');

const dir = mkdtempSync(join(tmpdir(), 'vfu-virtio-guest-'));
const servers: ChildProcess[] = [];

function serve(example: string, args: string[] = []): string {
  const socket = join(dir, `${example}.sock`);
  servers.push(spawn(process.execPath, ['--import', 'tsx', join(root, 'ts/cli/main.ts'), 'serve', join(root, 'examples', example), '--socket', socket, '--', ...args],
    { stdio: ['ignore', 'inherit', 'inherit'] }));
  return socket;
}

async function main(): Promise<number> {
  for (const name of ['ours.img', 'qemu.img']) spawnSync('truncate', ['-s', IMAGE_SIZE, join(dir, name)]);
  const port = join(dir, 'console-port.sock');
  const sockets = [serve('virtio-blk', ['--image', join(dir, 'ours.img'), '--serial', 'ts-blk']), serve('virtio-rng'), serve('virtio-console', ['--listen', port])];
  const deadline = Date.now() + 60_000;
  while (![...sockets, port].every((s) => existsSync(s))) {
    if (Date.now() > deadline) fail('the servers did not start');
    await new Promise((r) => setTimeout(r, 100));
  }
  // The host end of the console: answers the guest's line.
  const consolePort = createConnection(port);
  let heard = '';
  consolePort.on('data', (data: Buffer) => {
    heard += data.toString();
    if (heard.includes('ping from the guest')) {
      heard = '';
      consolePort.write('pong from the host\n');
    }
  });
  const script = join(dir, 'virtio-guest.sh');
  writeFileSync(script, readFileSync(join(__dirname, 'virtio-guest.sh'), 'utf8').replaceAll('__RUNTIME__', String(runtime)));
  const run = await runGuest(join(root, 'scripts', 'peers', 'run-guest.sh'), ['--qemu', qemu!, '--guest', guest!, ...sockets.flatMap((s) => ['--socket', s]),
    '--mem', '1G', '--smp', '2', '--timeout', String(600 + 10 * runtime), script, '--',
    '-drive', `file=${join(dir, 'qemu.img')},if=none,id=ref,format=raw`, '-device', 'virtio-blk-pci,serial=qemu,drive=ref'],
);
  consolePort.destroy();
  const out = run.stdout;
  process.stdout.write(out);

  const fio = [...out.matchAll(/VIRTIO-FIO device=(\S+) job=(\S+) kibps=(\d+) iops=(\d+)/g)].map((m) => ({ device: m[1], job: m[2], iops: Number(m[4]) }));
  if (fio.length > 0) {
    console.log('\nfio in the guest (TCG), same guest and run; ratio = IOPS / QEMU built-in virtio-blk IOPS');
    for (const r of fio) {
      const ref = fio.find((x) => x.job === r.job && x.device === 'qemu');
      console.log(`${r.job.padEnd(18)} ${r.device.padEnd(8)} ${String(r.iops).padStart(8)} ${ref ? (r.iops / ref.iops).toFixed(2).padStart(6) : ''}`);
    }
  }
  const missing = ['VIRTIO-EXT4 intact', 'VIRTIO-RNG read=512', 'VIRTIO-CONSOLE got=pong from the host'].filter((line) => !out.includes(line));
  if (run.status !== 0 || missing.length > 0) {
    console.error(`virtio guest: failed (run-guest.sh exit ${run.status}; missing: ${missing.join(', ') || 'nothing'})`);
    return 1;
  }
  console.log('virtio guest: virtio_blk, virtio-rng and virtio_console bound, ext4 round trip intact, /dev/hwrng read, a console line each way, fio done');
  return 0;
}

/** Runs the guest without blocking this process's loop (the console's host end answers meanwhile). */
function runGuest(command: string, args: string[]): Promise<{ status: number | null; stdout: string }> {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  let stdout = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  return new Promise((resolve) => child.on('exit', (status) => resolve({ status, stdout })));
}

main()
  .then((code) => (process.exitCode = code))
  .catch((error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  })
  .finally(() => {
    for (const s of servers) s.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  });
