/**
 * Interop row s1: SPDK's userspace NVMe driver, over its VFIOUSER transport,
 * drives our NVMe example (docs/interop.md). Needs SPDK's build named by
 * VFIO_USER_SPDK (scripts/peers/build-spdk.sh) and free 2 MiB hugepages on a
 * mounted hugetlbfs: SPDK's memory is hugetlbfs files (`-g`), whose fds it
 * passes in DMA_MAP. Its host maps BAR0's doorbell page, so the controller
 * serves it with mapped doorbells (with trapped ones SPDK stops: "Error to
 * get device BAR0").
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { beforeAll, describe, expect, test } from 'vitest';
import createNvme from '../examples/nvme/index.js';
import { createServer } from '../ts/index.js';
import { testCleanups } from './cleanups.js';
import { tempSocketPath } from './helpers.js';

const SPDK = process.env.VFIO_USER_SPDK;
const SUBNQN = 'nqn.2019-07.io.spdk:cnode0';
/** DPDK memory of each SPDK process (MiB), in hugepages. */
const SPDK_MEMORY_MIB = 256;
const SPDK_TIMEOUT_MS = 120_000;

const cleanups = testCleanups();

/**
 * Hugepage memory (MiB) the kernel holds when a hugetlbfs is mounted, else 0. Not
 * only the free part: an SPDK program that exits early leaves its hugetlbfs file
 * behind, and the next one's start deletes it.
 */
function hugepagesMiB(): number {
  if (!readFileSync('/proc/mounts', 'utf8').includes(' hugetlbfs ')) return 0;
  const meminfo = readFileSync('/proc/meminfo', 'utf8');
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(meminfo)?.[1] ?? 0);
  return (field('HugePages_Total') * field('Hugepagesize')) / 1024;
}

/** Serves examples/nvme (its defaults, so mapped doorbells, which SPDK needs; a file image) where SPDK looks for it: DIR/cntrl. */
async function serveNvme(image: string): Promise<{ traddr: string }> {
  const device = createNvme(['--image', image, '--size', '64M', '--serial', 'spdk-row']);
  const server = createServer(device);
  const socket = tempSocketPath('cntrl');
  await server.listen(socket.path);
  cleanups.defer(async () => {
    await server.close();
    device.close();
    socket.cleanup();
  });
  return { traddr: dirname(socket.path) };
}

/** Runs an SPDK program to its end (asynchronously: the server answers it from this thread). */
function runSpdk(program: string, args: string[]): Promise<{ code: number | null; output: string }> {
  const child = spawn(join(SPDK!, 'build', 'bin', program), args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (d) => (output += d));
  child.stderr.on('data', (d) => (output += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), SPDK_TIMEOUT_MS);
  return new Promise((resolve) =>
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, output });
    }),
  );
}

describe.skipIf(!SPDK)('SPDK’s NVMe host drives our NVMe example (needs VFIO_USER_SPDK)', () => {
  beforeAll(() => {
    if (hugepagesMiB() < SPDK_MEMORY_MIB + 64) {
      throw new Error(`SPDK needs ${SPDK_MEMORY_MIB + 64} MiB of 2 MiB hugepages on a mounted hugetlbfs, there are ${hugepagesMiB()} ` +
        '(as root: echo 256 > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs nodev /dev/hugepages)');
    }
  });

  test('spdk_nvme_identify: the controller attaches and its identity and namespace are ours', async () => {
    const dir = tempSocketPath('nvme.img');
    cleanups.defer(() => dir.cleanup());
    const { traddr } = await serveNvme(dir.path);
    const run = await runSpdk('spdk_nvme_identify', ['-r', `trtype:VFIOUSER traddr:${traddr} subnqn:${SUBNQN}`, '-g', '-s', String(SPDK_MEMORY_MIB)]);
    expect(run.code, run.output).toBe(0);
    expect(run.output).toMatch(/Serial Number:\s+spdk-row\n/);
    expect(run.output).toMatch(/Model Number:\s+vfio-user TypeScript NVMe\n/);
    expect(run.output).toMatch(/Namespace ID:1\n/);
    expect(run.output).toMatch(/Size \(in LBAs\):\s+131072 \(/); // 64 MiB of 512-byte blocks
  }, SPDK_TIMEOUT_MS + 10_000);

  test('spdk_dd through SPDK’s NVMe bdev: data written lands in the image and reads back', async () => {
    const dir = tempSocketPath('nvme.img');
    cleanups.defer(() => dir.cleanup());
    const image = dir.path;
    const { traddr } = await serveNvme(image);
    const data = randomBytes(8 << 20);
    const input = join(dirname(image), 'in');
    const output = join(dirname(image), 'out');
    writeFileSync(input, data);
    const config = join(dirname(image), 'bdev.json');
    writeFileSync(config, JSON.stringify({
      subsystems: [{
        subsystem: 'bdev',
        config: [{ method: 'bdev_nvme_attach_controller', params: { name: 'Nvme0', trtype: 'vfiouser', traddr, subnqn: SUBNQN } }],
      }],
    }));
    const common = ['-m', '0x2', '-g', '-s', String(SPDK_MEMORY_MIB), '--json', config, '--bs', '65536'];
    const write = await runSpdk('spdk_dd', [...common, '--if', input, '--ob', 'Nvme0n1']);
    expect(write.code, write.output).toBe(0);
    expect(readFileSync(image).subarray(0, data.length).equals(data)).toBe(true);
    const read = await runSpdk('spdk_dd', [...common, '--ib', 'Nvme0n1', '--of', output, '--count', String(data.length / 65536)]);
    expect(read.code, read.output).toBe(0);
    expect(readFileSync(output).equals(data)).toBe(true);
  }, 2 * SPDK_TIMEOUT_MS + 10_000);
});
