/**
 * Interop row 4: a QEMU 10.1+ guest (vfio-user-pci, TCG, the guest kit) drives our examples
 * through its own drivers. Runs when VFIO_USER_QEMU and VFIO_USER_GUEST name the peers.
 */
import { afterEach, describe, expect, test } from 'vitest';
import { PciIdio16 } from '../examples/gpio.js';
import { DoorbellDevice, DOORBELL } from '../examples/msix-device.js';
import createNvme, { type NvmeController } from '../examples/nvme/index.js';
import { lspci } from '../ts/cli/lspci.js';
import { bootGuest, GUEST, QEMU, section } from './guest/boot.js';
import { lspciFields } from './guest/lspci-fields.js';
import { serve, type Served } from './helpers.js';

const GUEST_TIMEOUT = 300_000;

/** Prints `=== NAME BEGIN`, the output of `command`, `=== NAME END`. */
const printed = (name: string, command: string) => `echo "=== ${name} BEGIN"; ${command}; echo "=== ${name} END"`;

/** Shell that sets D to the sysfs folder and S to the slot of the device with these IDs. */
const findDevice = (vendor: number, device: number) => `
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = ${hex4(vendor)} ] && [ "$(cat $d/device)" = ${hex4(device)} ]; then D=$d; fi
done
[ -n "$D" ] || { echo "no device ${hex4(vendor)}:${hex4(device)}"; exit 1; }
S=\${D##*/}; S=\${S#0000:}
`;
const hex4 = (n: number) => `0x${n.toString(16).padStart(4, '0')}`;

let served: Served<PciIdio16> | Served<DoorbellDevice> | Served<NvmeController> | undefined;
afterEach(async () => {
  await served?.close();
  served?.device.close();
  served = undefined;
});

describe.skipIf(!QEMU || !GUEST)('QEMU guests drive our examples (skipped: VFIO_USER_QEMU and VFIO_USER_GUEST name the peers)', () => {
  test('GPIO card: Linux’s gpio-pci-idio-16 binds, sets outputs, reads inputs and gets an edge by INTx', async () => {
    const gpio = await serve(new PciIdio16());
    served = gpio;
    gpio.device.setInputs(0xa5c3);
    const script = `
set -e
modprobe gpio-pci-idio-16
${printed('DETECT', 'gpiodetect')}
gpioset gpiochip0 0=1 3=1 9=1 15=1
${printed('INPUTS', 'gpioget gpiochip0 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31')}
gpiomon --num-events=1 gpiochip0 20 > /tmp/edge &
MON=$!
sleep 2
echo "=== MON READY"
wait $MON
${printed('EDGE', 'cat /tmp/edge')}
`;
    const run = await bootGuest({
      script,
      sockets: [gpio.path],
      timeoutMs: GUEST_TIMEOUT,
      // Input 4 (line 20) rises once the guest listens for it (the driver takes both edges only).
      onLine: (line) => {
        if (line.includes('=== MON READY')) gpio.device.setInputs(0xa5c3 | 0x0010);
      },
    });
    expect(run.rc, `${run.exit}\n${run.console.slice(-3000)}`).toBe(0);
    expect(section(run.console, 'DETECT')).toMatch(/gpiochip0 \[.*\] \(32 lines\)/);
    expect(gpio.device.outputs).toBe((1 << 0) | (1 << 3) | (1 << 9) | (1 << 15));
    const inputs = section(run.console, 'INPUTS').trim().split(/\s+/).map(Number);
    expect(inputs).toEqual(Array.from({ length: 16 }, (_, i) => (0xa5c3 >> i) & 1));
    expect(section(run.console, 'EDGE')).toMatch(/RISING EDGE.*offset: 20/);
  }, GUEST_TIMEOUT + 30_000);

  test('MSI-X example: the guest’s lspci -vv agrees with ours, and a doorbell’s MSI-X vector reaches the guest', async () => {
    const doorbell = await serve(new DoorbellDevice());
    served = doorbell;
    const ours = lspciFields(await lspci(doorbell.path));
    // No driver binds to class ff: the script enables MSI-X itself, as a driver would: memory
    // decoding and bus mastering on, table entry 0 aimed at CPU 0's LAPIC with a vector nothing
    // uses (so the kernel reports it by number), entry unmasked, MSI-X on; then it rings doorbell 0.
    const VECTOR = 0xd0;
    const script = `
set -e
${findDevice(0x1b36, 0x10f0)}
${printed('LSPCI', 'lspci -vv -nn -s $S')}
cfg() { printf "$(printf '\\\\%03o' $2)" | dd of=$D/config bs=1 seek=$1 conv=notrunc 2>/dev/null; }
cfg 4 6
BAR0=$(sed -n 1p $D/resource | cut -d' ' -f1)
BAR4=$(sed -n 5p $D/resource | cut -d' ' -f1)
CAP=$(lspci -vv -s $S | sed -n 's/.*Capabilities: \\[\\([0-9a-f]*\\)\\] MSI-X.*/\\1/p')
devmem $((BAR4)) 32 0xfee00000
devmem $((BAR4 + 4)) 32 0
devmem $((BAR4 + 8)) 32 ${VECTOR}
devmem $((BAR4 + 12)) 32 0
cfg $((0x$CAP + 3)) 128
${printed('MSIX', 'lspci -vv -s $S | grep "MSI-X:"')}
devmem $((BAR0 + ${DOORBELL.RING})) 32 0
for i in $(seq 1 30); do dmesg | grep -q "No irq handler for vector" && break; sleep 1; done
${printed('DELIVERED', 'dmesg | grep "No irq handler for vector"')}
echo "COUNTER=$(devmem $((BAR0 + ${DOORBELL.COUNTER})) 32)"
`;
    // Behind a root port, as a PCIe endpoint is (on the root bus QEMU would show it as an RCiEP).
    const run = await bootGuest({ script, sockets: [doorbell.path], rootPorts: true, timeoutMs: GUEST_TIMEOUT });
    expect(run.rc, `${run.exit}\n${run.console.slice(-3000)}`).toBe(0);
    const guest = lspciFields(section(run.console, 'LSPCI'));
    expect(guest).toEqual(ours);
    expect(section(run.console, 'MSIX')).toMatch(/MSI-X: Enable\+ Count=8 Masked-/);
    expect(section(run.console, 'DELIVERED')).toMatch(new RegExp(`\\d+\\.${VECTOR} No irq handler for vector`));
    expect(run.console).toMatch(/COUNTER=0x00000001/);
  }, GUEST_TIMEOUT + 30_000);

  // A smoke row: the NVMe example's own guest test (fio, ext4, QEMU's NVMe beside it) is the full one.
  test('NVMe controller: Linux’s nvme driver binds, lists the namespace, and data written reads back', async () => {
    const nvme = await serve(createNvme(['--size', '64M']));
    served = nvme;
    const script = `
set -e
modprobe nvme
for i in $(seq 1 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.2; done
[ -b /dev/nvme0n1 ] || { dmesg | grep -i nvme; exit 1; }
${printed('LIST', 'nvme list')}
dd if=/dev/urandom of=/tmp/data bs=4k count=64 2>/dev/null
dd if=/tmp/data of=/dev/nvme0n1 bs=4k oflag=direct 2>/dev/null
dd if=/dev/nvme0n1 of=/tmp/back bs=4k count=64 iflag=direct 2>/dev/null
cmp /tmp/data /tmp/back && echo "=== READ BACK OK"
`;
    const run = await bootGuest({ script, sockets: [nvme.path], timeoutMs: GUEST_TIMEOUT });
    expect(run.rc, `${run.exit}\n${run.console.slice(-3000)}`).toBe(0);
    expect(section(run.console, 'LIST')).toMatch(/\/dev\/nvme0n1 .* 67\.11\s+MB/);
    expect(run.console).toContain('=== READ BACK OK');
  }, GUEST_TIMEOUT + 30_000);
});
