/**
 * Two guests on the switch: QEMU boots the guest kit twice, each with one
 * examples/virtio-net NIC (vfio-user-pci) plugged into one
 * examples/virtio-net/switch.ts; Linux's virtio_net binds both, and the
 * first guest pings the second through the switch.
 *
 *   source ~/peers/ENV && npx tsx __test__/guest/virtio-net.ts
 *
 * Needs VFIO_USER_QEMU and VFIO_USER_GUEST (docs/interop.md). Not run by CI.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GuestRunner, root } from './runner.js';

const runner = new GuestRunner('virtio-net guests');

/** The guest script: bring eth0 up as `address`, then `then`. */
const script = (address: string, then: string) => `modprobe virtio_pci
modprobe virtio_net
i=0; until ip link show eth0 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 100 ] || { echo "NET-FAIL no eth0"; exit 1; }; sleep 0.2; done
ip link set eth0 up
ip addr add ${address}/24 dev eth0
${then}
`;

const PINGER = `n=0
until ping -c 1 -W 2 10.0.0.2 >/dev/null 2>&1; do n=$((n+1)); [ $n -lt 60 ] || { echo "NET-FAIL no reply"; exit 1; }; done
ping -c 3 -W 5 10.0.0.2 && echo "NET-PING ok"`;
// Answers until the pinger has had its replies (its pings show in the counters).
const ANSWERER = `n=0
until [ "$(cat /sys/class/net/eth0/statistics/rx_packets)" -ge 6 ] || [ $n -ge 200 ]; do n=$((n+1)); sleep 1; done
sleep 5
echo "NET-ANSWERED rx=$(cat /sys/class/net/eth0/statistics/rx_packets)"`;

/** Boots guest `name` on its NIC's socket with `body` as its script. */
async function boot(name: string, body: string): Promise<{ status: number | null; out: string }> {
  const file = join(runner.dir, `${name}.sh`);
  writeFileSync(file, body);
  const run = await runner.boot(['--socket', join(runner.dir, `${name}.sock`), '--mem', '512M', '--smp', '1', '--timeout', '600', file]);
  return { status: run.status, out: run.stdout };
}

async function main(): Promise<number> {
  const l2 = join(runner.dir, 'switch.sock');
  runner.node([join(root, 'examples/virtio-net/switch.ts'), l2]);
  await runner.waitFor([l2]);
  const nics = [['a', '52:54:00:00:00:0a'], ['b', '52:54:00:00:00:0b']].map(([name, mac]) => runner.serve('examples/virtio-net', name!, ['--switch', l2, '--mac', mac!]));
  await runner.waitFor(nics);
  const [a, b] = await Promise.all([boot('a', script('10.0.0.1', PINGER)), boot('b', script('10.0.0.2', ANSWERER))]);
  process.stdout.write(`--- guest a ---\n${a.out}\n--- guest b ---\n${b.out}\n`);
  if (!a.out.includes('NET-PING ok')) {
    console.error(`virtio-net guests: no ping through the switch (run-guest.sh exits ${a.status}, ${b.status})`);
    return 1;
  }
  console.log('virtio-net guests: virtio_net bound in both, 10.0.0.1 pinged 10.0.0.2 through the switch');
  return 0;
}

runner.run(main);
