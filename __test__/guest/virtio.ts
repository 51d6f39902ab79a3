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
 * VIRTIO_GUEST_RUNTIME sets each fio job's seconds (default 5), VIRTIO_GUEST_ROUNDS how many
 * rounds the disks take turns in, in an order rotated each round (default 3; the figures are medians over them). Not run by CI.
 */
import { spawnSync } from 'node:child_process';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { GuestRunner, printFio } from './runner.js';

const IMAGE_SIZE = '256M';
const runtime = Number(process.env.VIRTIO_GUEST_RUNTIME ?? 5);
const rounds = Number(process.env.VIRTIO_GUEST_ROUNDS ?? 3);
const runner = new GuestRunner('virtio guest');

async function main(): Promise<number> {
  for (const name of ['ours.img', 'trap.img', 'qemu.img']) spawnSync('truncate', ['-s', IMAGE_SIZE, join(runner.dir, name)]);
  const port = join(runner.dir, 'console-port.sock');
  const sockets = [
    runner.serve('examples/virtio-blk', 'virtio-blk', ['--image', join(runner.dir, 'ours.img'), '--serial', 'ts-blk']),
    // The same device notified by trapped writes (a REGION_WRITE per notification).
    runner.serve('examples/virtio-blk', 'virtio-blk-trap', ['--image', join(runner.dir, 'trap.img'), '--serial', 'ts-trap', '--notify', 'trap']),
    runner.serve('examples/virtio-rng', 'virtio-rng'),
    runner.serve('examples/virtio-console', 'virtio-console', ['--listen', port]),
  ];
  await runner.waitFor([...sockets, port]);
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
  const script = runner.script('virtio-guest.sh', { RUNTIME: runtime, ROUNDS: rounds });
  const run = await runner.boot([...sockets.flatMap((s) => ['--socket', s]),
    '--mem', '1G', '--smp', '2', '--timeout', String(600 + 10 * runtime * rounds), script, '--',
    '-drive', `file=${join(runner.dir, 'qemu.img')},if=none,id=ref,format=raw`, '-device', 'virtio-blk-pci,serial=qemu,drive=ref']);
  consolePort.destroy();
  const out = run.stdout;
  process.stdout.write(out);

  printFio(out, 'VIRTIO-FIO', 'virtio-blk');
  const missing = ['VIRTIO-EXT4 intact', 'VIRTIO-TRAP intact', 'VIRTIO-RNG read=512', 'VIRTIO-CONSOLE got=pong from the host'].filter((line) => !out.includes(line));
  if (run.status !== 0 || missing.length > 0) {
    console.error(`virtio guest: failed (run-guest.sh exit ${run.status}; missing: ${missing.join(', ') || 'nothing'})`);
    return 1;
  }
  console.log('virtio guest: virtio_blk, virtio-rng and virtio_console bound, ext4 round trip intact, 1 MiB through trapped notifications intact, /dev/hwrng read, a console line each way, fio done');
  return 0;
}

runner.run(main);
