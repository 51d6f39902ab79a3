/**
 * Interop rows q5a-q5e: QEMU 10.1+ guests (vfio-user-pci, TCG, the guest kit) drive our virtio
 * examples through Linux's own drivers. Two boots serve every row, at the same time: guest A has
 * our virtio-blk, virtio-rng, virtio-console and a virtio-net NIC on the userspace switch; guest B
 * a second NIC on that switch and, where the host allows a TAP, a NIC on one. Every device is
 * served by this process. Runs when VFIO_USER_QEMU and VFIO_USER_GUEST name the peers.
 * `npm run test:guest` is the long run (fio beside QEMU's own virtio-blk-pci).
 */
import { mkdtempSync, rmSync, writeFileSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import createBlk from '../examples/virtio-blk/index.js';
import { VirtioConsole } from '../examples/virtio-console.js';
import createNet, { L2Switch } from '../examples/virtio-net/index.js';
import createRng from '../examples/virtio-rng.js';
import type { VirtioDevice } from '../ts/index.js';
import { bootGuest, GUEST, QEMU, section, type GuestRun } from './guest/boot.js';
import { serve } from './helpers.js';
import { makeHostTap, tapMissing, type HostTap } from './virtio-net-host.js';

// Boots under TCG on a loaded 2-core host took up to 170 s (about 20 s when it is quiet).
const GUEST_TIMEOUT = 480_000;
const FIO_SECONDS = 3;
const MAC = { a: '52:54:00:00:00:0a', b: '52:54:00:00:00:0b', tap: '52:54:00:00:00:0c' };
const tapSkip = tapMissing();

/** What both guests' scripts share: waiting (bounded), finding a NIC by MAC, and stages that report on their own. */
const COMMON = String.raw`
# Runs "$@" until it succeeds, for at most two minutes.
wait_for() { i=0; until "$@"; do i=$((i + 1)); [ $i -lt 600 ] || return 1; sleep 0.2; done; }
iface() { for n in /sys/class/net/*; do if [ "$(cat $n/address)" = "$1" ]; then echo "${'$'}{n##*/}"; fi; done; }
has_iface() { [ -n "$(iface $1)" ]; }
# Prints "=== NAME BEGIN", what the stage prints, then "=== NAME END", or "=== NAME FAILED" at the
# first command that fails (the subshell's set -e holds: it is not in a tested context). Later stages still run.
stage() {
  echo "=== $1 BEGIN"; echo "at $(cut -d' ' -f1 /proc/uptime) s"
  ( set -e; $2 )
  if [ $? = 0 ]; then echo "done at $(cut -d' ' -f1 /proc/uptime) s"; echo "=== $1 END"; else echo "=== $1 FAILED"; fi
}
# Brings the NIC with MAC $1 up as $2/24, and pings $3 until it answers (bounded), then three times.
ping_through() {
  wait_for has_iface $1
  IF=$(iface $1)
  ip link set $IF up
  ip addr add $2/24 dev $IF
  echo "mtu=$(cat /sys/class/net/$IF/mtu)"
  n=0; until ping -c 1 -W 2 $3 >/dev/null 2>&1; do n=$((n + 1)); [ $n -lt 90 ] || return 1; done
  ping -c 3 -W 5 $3
}
`;

const GUEST_A = String.raw`
modprobe virtio_pci
modprobe virtio_blk
modprobe virtio-rng
modprobe virtio_console
modprobe virtio_net
${COMMON}
blk() {
  wait_for grep -qsx ts-blk /sys/block/vda/serial
  echo "sectors=$(cat /sys/block/vda/size)"
  for qd in 1 32; do
    line=$(fio --name=j --filename=/dev/vda --rw=randread --bs=4k --iodepth=$qd --ioengine=libaio --direct=1 \
      --runtime=${FIO_SECONDS} --time_based --size=32M --output-format=terse --terse-version=3 | tail -n 1)
    echo "fio randread-4k-qd$qd iops=$(echo "$line" | cut -d';' -f8)"
  done
  /usr/sbin/mke2fs -q -t ext4 -F /dev/vda
  mkdir -p /mnt/ours
  mount -t ext4 /dev/vda /mnt/ours
  dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
  cp /tmp/data /mnt/ours/data
  sync
  written=$(md5sum < /tmp/data)
  umount /mnt/ours
  echo 3 > /proc/sys/vm/drop_caches
  mount -t ext4 /dev/vda /mnt/ours
  [ "$(md5sum < /mnt/ours/data)" = "$written" ]
  echo "ext4 read back intact"
  umount /mnt/ours
}
rng() {
  echo "current=$(cat /sys/class/misc/hw_random/rng_current)"
  echo "read=$(dd if=/dev/hwrng bs=512 count=1 2>/dev/null | wc -c)"
}
console() {
  wait_for test -c /dev/hvc0
  # hvc resets its termios on the last close: the line goes out as a tty writes it (\r\n).
  (timeout 60 head -n 1 /dev/hvc0 > /tmp/console-in) &
  reader=$!
  sleep 0.5
  echo "ping from the guest" > /dev/hvc0
  wait $reader
  echo "got=$(tr -d '\r' < /tmp/console-in)"
}
switch_ping() { ping_through ${MAC.a} 10.0.0.1 10.0.0.2; }
stage BLK blk
stage RNG rng
stage CONSOLE console
stage SWITCH switch_ping
`;

/** Guest B answers on the switch (and pings the host through the TAP) until the test ends it. */
const guestB = (tap: HostTap | undefined) => String.raw`
modprobe virtio_pci
modprobe virtio_net
${COMMON}
answer() { wait_for has_iface ${MAC.b}; IF=$(iface ${MAC.b}); ip link set $IF up; ip addr add 10.0.0.2/24 dev $IF; echo "up as 10.0.0.2"; }
stage ANSWER answer
${tap ? `tap_ping() { ping_through ${MAC.tap} ${tap.guestIp} ${tap.hostIp}; }\nstage TAP tap_ping` : ''}
echo "=== B READY"
while :; do sleep 1; done
`;

/** `=== NAME` section of a run, failing with the end of the console if the stage failed. */
function stageOf(run: GuestRun, name: string): string {
  return section(run.console, name);
}

describe.skipIf(!QEMU || !GUEST)('QEMU guests drive our virtio examples (skipped: VFIO_USER_QEMU and VFIO_USER_GUEST name the peers)', () => {
  const undos: (() => unknown)[] = [];
  let a: GuestRun;
  let b: GuestRun;
  let tap: HostTap | undefined;
  let tapReceivedBefore = 0;
  let consoleHeard = '';

  beforeAll(async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vfu-virtio-guest-'));
    undos.push(() => rmSync(dir, { recursive: true, force: true }));
    const served = async (device: VirtioDevice) => {
      const s = await serve(device);
      undos.push(() => s.close(), () => device.close());
      return s.path;
    };

    const image = join(dir, 'disk.img');
    writeFileSync(image, '');
    truncateSync(image, 64 << 20);
    const l2 = new L2Switch();
    await l2.listen(join(dir, 'switch.sock'));
    undos.push(() => l2.close());
    // The console's host end: answers the guest's line.
    const console_ = new VirtioConsole();
    const toGuest = new PassThrough();
    const fromGuest = new PassThrough();
    console_.attachStream(toGuest, fromGuest);
    fromGuest.on('data', (data: Buffer) => {
      consoleHeard += data.toString();
      if (consoleHeard.includes('ping from the guest')) toGuest.write('pong from the host\n');
    });
    const socketsA = [
      await served(createBlk(['--image', image, '--serial', 'ts-blk'])),
      await served(createRng()),
      await served(console_),
      await served(await createNet(['--switch', join(dir, 'switch.sock'), '--mac', MAC.a])),
    ];
    const socketsB = [await served(await createNet(['--switch', join(dir, 'switch.sock'), '--mac', MAC.b]))];
    if (!tapSkip) {
      const made = makeHostTap();
      tap = made;
      undos.push(() => made.remove());
      tapReceivedBefore = made.received();
      socketsB.push(await served(await createNet(['--tap', made.name, '--mac', MAC.tap])));
    }

    // B stays up, answering, until A is done and B has done its own part; A has nobody to ping once B is gone.
    const stopA = new AbortController();
    const stopB = new AbortController();
    let bReady!: () => void;
    const bIsReady = new Promise<void>((resolve) => (bReady = resolve));
    const runB = bootGuest({ script: guestB(tap), sockets: socketsB, mem: '512M', timeoutMs: GUEST_TIMEOUT, signal: stopB.signal, onLine: (line) => line.includes('=== B READY') && bReady() });
    void runB.then(() => stopA.abort());
    a = await bootGuest({ script: GUEST_A, sockets: socketsA, mem: '512M', timeoutMs: GUEST_TIMEOUT, signal: stopA.signal });
    await Promise.race([bIsReady, runB]);
    stopB.abort();
    b = await runB;
    // What each stage took, in guest uptime (TCG on a shared host: figures for the docs, not assertions).
    for (const [name, run] of [['A', a], ['B', b]] as const) {
      console.log(`guest ${name} (TCG): ${run.console.split('\n').filter((l) => /^(=== \w+ BEGIN|at |done at |fio |round-trip |=== GUEST READY)/.test(l)).join(' | ')}`);
    }
  }, 2 * GUEST_TIMEOUT);

  afterAll(async () => {
    for (const undo of undos.reverse()) await undo();
  });

  test('virtio-blk: Linux’s virtio_blk binds; fio 4K randread at QD1 and QD32; ext4 made, written, read back intact after dropping caches', () => {
    expect(a.rc, `${a.exit}\n${a.console.slice(-3000)}`).toBe(0);
    const blk = stageOf(a, 'BLK');
    expect(blk).toContain(`sectors=${(64 << 20) / 512}`);
    for (const qd of [1, 32]) expect(Number(/fio randread-4k-qd(\d+) iops=(\d+)/.exec(blk.split('\n').find((l) => l.includes(`qd${qd} `)) ?? '')?.[2])).toBeGreaterThan(0);
    expect(blk).toContain('ext4 read back intact');
  });

  test('virtio-rng: /dev/hwrng is ours and reads', () => {
    const rng = stageOf(a, 'RNG');
    expect(rng).toMatch(/current=virtio_rng/);
    expect(rng).toContain('read=512');
  });

  test('virtio-console: a line each way through /dev/hvc0', () => {
    expect(stageOf(a, 'CONSOLE')).toContain('got=pong from the host');
    expect(consoleHeard).toContain('ping from the guest');
  });

  test('virtio-net: two guests ping each other through the userspace switch', () => {
    expect(stageOf(b, 'ANSWER')).toContain('up as 10.0.0.2');
    expect(stageOf(a, 'SWITCH')).toMatch(/3 packets transmitted, 3 packets received, 0% packet loss/);
  });

  test.skipIf(tapSkip)(`virtio-net on a host TAP: a guest pings the host’s address; the MTU is the interface’s${tapSkip ? ` (skipped: ${tapSkip})` : ''}`, () => {
    const ping = stageOf(b, 'TAP');
    expect(ping).toMatch(/3 packets transmitted, 3 packets received, 0% packet loss/);
    expect(ping).toContain('mtu=1500');
    expect(tap!.received()).toBeGreaterThan(tapReceivedBefore);
  });
});
