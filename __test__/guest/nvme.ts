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
 * NVME_GUEST_RUNTIME sets each fio job's seconds (default 5), NVME_GUEST_ROUNDS how many rounds
 * the devices take turns in, in an order rotated each round (default 3; the figures are medians over them). Not run by CI.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { GuestRunner, printFio } from './runner.js';

const IMAGE_SIZE = '512M';
const runtime = Number(process.env.NVME_GUEST_RUNTIME ?? 5);
const rounds = Number(process.env.NVME_GUEST_ROUNDS ?? 3);
const runner = new GuestRunner('test:guest');

/** Serves examples/nvme with `args` as Identify serial `serial`; returns its socket. */
function serveOurs(serial: string, args: string[]): string {
  return runner.serve('examples/nvme', serial, ['--image', join(runner.dir, `${serial}.img`), '--size', IMAGE_SIZE, '--serial', serial, ...args]);
}

async function main(): Promise<number> {
  const sockets = [
    serveOurs('ts-trap-shadow', ['--doorbells', 'trap']),
    serveOurs('ts-trap', ['--doorbells', 'trap', '--shadow-doorbells', 'off']),
    serveOurs('ts-mmap', []),
    serveOurs('ts-ioeventfd', ['--doorbells', 'ioeventfd']),
  ];
  await runner.waitFor(sockets, 30_000);
  spawnSync('truncate', ['-s', IMAGE_SIZE, join(runner.dir, 'qemu.img')]);
  const script = runner.script('nvme-guest.sh', { RUNTIME: runtime, ROUNDS: rounds, DEVICES: sockets.length + 1 });
  const run = await runner.boot([...sockets.flatMap((s) => ['--socket', s]),
    '--mem', '1G', '--smp', '2', '--timeout', String(900 + 20 * runtime * rounds), script, '--',
    '-drive', `file=${join(runner.dir, 'qemu.img')},if=none,id=ref,format=raw`, '-device', 'nvme,serial=qemu,drive=ref']);
  process.stdout.write(run.stdout);
  printFio(run.stdout, 'NVME-FIO', 'nvme');
  if (run.status !== 0) {
    console.error(`test:guest: the guest run failed (run-guest.sh exit ${run.status}: 124 timeout, 125 never ready, 126 died)`);
    return 1;
  }
  console.log('test:guest: nvme bound, ext4 round trip intact, fio done');
  return 0;
}

runner.run(main);
