/**
 * `npm run test:guest`: QEMU boots the guest kit with four of our
 * examples/nvme and QEMU's built-in `-device nvme`, each on a sparse raw
 * image of the same size. Ours: 'ts-trap-shadow' (trapped doorbells, and
 * Linux uses shadow doorbells since they are offered), 'ts-trap' (trapped,
 * shadow doorbells not offered: every doorbell is a REGION_WRITE), 'ts-mmap'
 * (the defaults: mapped doorbells, watched natively, with shadow doorbells) and 'ts-ioeventfd' (QEMU 10.2 never asks GET_REGION_IO_FDS, so
 * its doorbell writes arrive as messages the library turns into the
 * ioeventfds' signals: this checks the mode against Linux's driver more
 * than it measures it). The guest script (nvme-guest.sh) checks that
 * Linux's nvme driver binds, runs the same fio jobs on all five, and checks
 * that ext4 on ours keeps a file intact. Prints the fio figures side by
 * side with ratios to the built-in controller.
 *
 * Needs VFIO_USER_QEMU (qemu-system-x86_64 10.1+ with vfio-user-pci) and
 * VFIO_USER_GUEST (scripts/peers/mkguest.sh's output); boots the guest with
 * scripts/peers/run-guest.sh (docs/interop.md says how to build both).
 * NVME_GUEST_RUNTIME sets each fio job's seconds (default 10). Not run by CI.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const root = join(__dirname, '..', '..');
const IMAGE_SIZE = '512M';
const runtime = Number(process.env.NVME_GUEST_RUNTIME ?? 10);

function fail(message: string): never {
  console.error(`test:guest: ${message}`);
  process.exit(1);
}

const qemu = process.env.VFIO_USER_QEMU;
const guest = process.env.VFIO_USER_GUEST;
if (!qemu || !existsSync(qemu)) fail('VFIO_USER_QEMU must name a qemu-system-x86_64 10.1+ built with vfio-user-pci (see docs/interop.md)');
if (!guest || !existsSync(join(guest, 'vmlinuz'))) fail('VFIO_USER_GUEST must name the guest kit\'s output folder (vmlinuz, initramfs.cpio.gz; see docs/interop.md)');

const dir = mkdtempSync(join(tmpdir(), 'vfu-guest-'));
const servers: ChildProcess[] = [];

/** Serves examples/nvme with `args` as Identify serial `serial`; returns its socket. */
function serveOurs(serial: string, args: string[]): string {
  const socket = join(dir, `${serial}.sock`);
  const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'ts/cli/main.ts'), 'serve', join(root, 'examples/nvme'), '--socket', socket,
    '--', '--image', join(dir, `${serial}.img`), '--size', IMAGE_SIZE, '--serial', serial, ...args], { stdio: ['ignore', 'inherit', 'inherit'] });
  servers.push(child);
  return socket;
}

async function main(): Promise<number> {
  const sockets = [
    serveOurs('ts-trap-shadow', ['--doorbells', 'trap']),
    serveOurs('ts-trap', ['--doorbells', 'trap', '--shadow-doorbells', 'off']),
    serveOurs('ts-mmap', []),
    serveOurs('ts-ioeventfd', ['--doorbells', 'ioeventfd']),
  ];
  const deadline = Date.now() + 30_000;
  while (!sockets.every((s) => existsSync(s))) {
    if (Date.now() > deadline) fail('the NVMe servers did not start');
    await new Promise((r) => setTimeout(r, 100));
  }
  spawnSync('truncate', ['-s', IMAGE_SIZE, join(dir, 'qemu.img')]);
  const script = join(dir, 'nvme-guest.sh');
  writeFileSync(script, readFileSync(join(__dirname, 'nvme-guest.sh'), 'utf8').replaceAll('__RUNTIME__', String(runtime)).replaceAll('__DEVICES__', String(sockets.length + 1)));
  const run = spawnSync(join(root, 'scripts', 'peers', 'run-guest.sh'), [ '--qemu', qemu!, '--guest', guest!, ...sockets.flatMap((s) => ['--socket', s]),
    '--mem', '1G', '--smp', '2', '--timeout', String(900 + 20 * runtime), script, '--',
    '-drive', `file=${join(dir, 'qemu.img')},if=none,id=ref,format=raw`, '-device', 'nvme,serial=qemu,drive=ref'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 64 << 20 });
  const console_ = run.stdout ?? '';
  process.stdout.write(console_);

  const fio = [...console_.matchAll(/NVME-FIO device=(\S+) job=(\S+) kibps=(\d+) iops=(\d+)/g)].map((m) => ({ device: m[1], job: m[2], kibps: Number(m[3]), iops: Number(m[4]) }));
  if (fio.length > 0) {
    console.log('\nfio in the guest (TCG), same guest and run; ratio = IOPS / QEMU built-in nvme IOPS');
    console.log('job                 device                IOPS      MiB/s   ratio');
    for (const r of fio) {
      const ref = fio.find((x) => x.job === r.job && x.device === 'qemu');
      console.log(`${r.job.padEnd(19)} ${r.device.padEnd(16)} ${String(r.iops).padStart(9)} ${(r.kibps / 1024).toFixed(1).padStart(10)} ${ref ? (r.iops / ref.iops).toFixed(2).padStart(7) : ''}`);
    }
  }
  if (run.status !== 0) {
    console.error(`test:guest: the guest run failed (run-guest.sh exit ${run.status}: 124 timeout, 125 never ready, 126 died)`);
    return 1;
  }
  console.log('test:guest: nvme bound, ext4 round trip intact, fio done');
  return 0;
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
