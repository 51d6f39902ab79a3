/**
 * Interop rows with SPDK (docs/interop.md). Needs SPDK's build named by
 * VFIO_USER_SPDK (scripts/peers/build-spdk.sh) and 2 MiB hugepages on a
 * mounted hugetlbfs.
 *
 * s1: SPDK's userspace NVMe driver, over its VFIOUSER transport, drives our
 * NVMe example. SPDK's memory is hugetlbfs files (`-g`), whose fds it passes
 * in DMA_MAP. Its host maps BAR0's doorbell page, so the controller serves it
 * with mapped doorbells (with trapped ones SPDK stops: "Error to get device
 * BAR0").
 *
 * s2, s3: our client against SPDK's targets: `vfio-user lspci` and the test
 * NVMe host driver against nvmf_tgt's VFIOUSER controller, and the
 * VirtioDriver against spdk_tgt's vfio-user virtio-blk endpoint, both
 * serving an aio bdev on a file; guest memory is a memfd mapped by DMA_MAP.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import createNvme from '../examples/nvme/index.js';
import { Csts, Register } from '../examples/nvme/controller.js';
import { BlkRequest, BlkStatus, SECTOR } from '../examples/virtio-blk/index.js';
import { Cfg, createServer, Region } from '../ts/index.js';
import { lspci } from '../ts/cli/lspci.js';
import { VirtioDriver } from '../ts/virtio/driver.js';
import { nvmfTargetArgs, serveNvmfTarget, serveVirtioTarget, spdkProgram, virtioTargetArgs } from '../bench/spdk-peer.js';
import { testCleanups } from './cleanups.js';
import { tempSocketPath } from './helpers.js';
import { NvmeHost } from './nvme-host.js';

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
  // Whatever SPDK's host sends, the controller answers it: device code never throws.
  const deviceErrors: Error[] = [];
  server.on('deviceError', (error) => deviceErrors.push(error));
  const socket = tempSocketPath('cntrl');
  await server.listen(socket.path);
  cleanups.defer(async () => {
    await server.close();
    device.close();
    socket.cleanup();
    expect(deviceErrors).toEqual([]);
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

/** Fails the suite early, saying how to fix it, when SPDK's programs could not get their memory. */
function needHugepages(): void {
  if (hugepagesMiB() < SPDK_MEMORY_MIB + 64) {
    throw new Error(`SPDK needs ${SPDK_MEMORY_MIB + 64} MiB of 2 MiB hugepages on a mounted hugetlbfs, there are ${hugepagesMiB()} ` +
      '(as root: echo 256 > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs nodev /dev/hugepages)');
  }
}

describe.skipIf(!SPDK)('SPDK’s NVMe host drives our NVMe example (needs VFIO_USER_SPDK)', () => {
  beforeAll(needHugepages);

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

/** An SPDK target serving an aio bdev on a 64 MiB file whose first 4 KiB are random. */
interface Target {
  dir: string;
  /** The file behind the bdev. */
  image: string;
  /** Its first 4 KiB, as written before the target started. */
  head: Buffer;
  rpcSocket: string;
  proc: ChildProcess;
  output(): string;
  /** Stops it (SIGTERM, then SIGKILL); says whether it was still running, or how it had ended. */
  stop(): Promise<string>;
}

const TARGET_IMAGE_BYTES = 64 << 20;

function startTarget(program: 'nvmf_tgt' | 'spdk_tgt', args: (rpcSocket: string) => string[]): Target {
  const dir = mkdtempSync(join(tmpdir(), 'vfu-spdk-'));
  const image = join(dir, 'bdev.img');
  const head = randomBytes(4096);
  writeFileSync(image, head);
  truncateSync(image, TARGET_IMAGE_BYTES); // sparse past its first 4 KiB
  const rpcSocket = join(dir, 'rpc.sock');
  // In its folder: a target that crashes leaves its core there, removed with it.
  const proc = spawn(spdkProgram(SPDK!, program), args(rpcSocket), { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  proc.stdout!.on('data', (d) => (output += d));
  proc.stderr!.on('data', (d) => (output += d));
  const exited = new Promise<void>((resolve) => proc.on('exit', () => resolve()));
  return {
    dir, image, head, rpcSocket, proc, output: () => output,
    async stop() {
      const state = proc.exitCode === null && proc.signalCode === null ? 'running' : `ended (${proc.signalCode ?? `status ${proc.exitCode}`})`;
      if (state === 'running') {
        proc.kill('SIGTERM');
        const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(timer);
      }
      rmSync(dir, { recursive: true, force: true });
      return state;
    },
  };
}

/** Runs `setUp` against a target; a failure says what the target printed. */
async function setUp<T>(target: Target, run: () => Promise<T>): Promise<T> {
  try {
    return await run();
  } catch (error) {
    throw new Error(`${(error as Error).message}\n${program(target)} printed:\n${target.output()}`);
  }
}

function program(target: Target): string {
  return target.proc.spawnfile.split('/').pop()!;
}

describe.skipIf(!SPDK)('our client, lspci and test drivers against SPDK’s targets (needs VFIO_USER_SPDK)', () => {
  beforeAll(needHugepages);

  describe('nvmf_tgt with a VFIOUSER listener', () => {
    let target: Target;
    let socket: string;
    beforeAll(async () => {
      target = startTarget('nvmf_tgt', (rpcSocket) => nvmfTargetArgs(rpcSocket, SPDK_MEMORY_MIB));
      await setUp(target, () => serveNvmfTarget(SPDK!, target.rpcSocket, target.image, target.dir));
      socket = join(target.dir, 'cntrl');
    }, SPDK_TIMEOUT_MS);
    // Our clients left it as they found it: still serving.
    afterAll(async () => expect(await target.stop(), target.output()).toBe('running'));

    test('our client reads an NVMe controller from its config space, and lspci decodes it', async () => {
      const client = await cleanups.client(socket);
      const config = await client.regionRead(Region.CONFIG, 0n, 64);
      expect(config.readUIntLE(Cfg.CLASS_PROG_IF, 3)).toBe(0x010802);
      await client.close();

      const text = await lspci(socket);
      const lines = text.split('\n').map((l) => l.trim());
      expect(lines[0]).toMatch(/^Non-Volatile memory controller \[0108\]: Device \[4e58:0001\] \(rev 00\) \(prog-if 02 \[NVM Express\]\)$/);
      expect(lines).toContain('Region 0: Memory at <unassigned> (32-bit, non-prefetchable) [disabled] [size=16K]');
      expect(lines).toContain('Capabilities: [84] MSI-X: Enable- Count=512 Masked-');
      // The doorbell page SPDK's own host needs mapped, offered as a sparse-mmap area.
      expect(lines).toContain('Region 0 (BAR0): size=16K offset=0x0 R+ W+ MMAP+');
      expect(lines).toContain('Sparse mmap: 0x1000+0x1000');
      expect(lines).toContain('IRQ 2 (MSI-X): count=512 EVENTFD+ MASKABLE- AUTOMASKED- NORESIZE-');
    });

    test('our NVMe host driver: Identify, an I/O queue pair, a write that lands in the bdev’s file and reads', async () => {
      const client = await cleanups.client(socket);
      const host = await NvmeHost.attach(client, cleanups.memory(4 << 20));
      cleanups.defer(() => host.close());
      expect(host.mappedDoorbells).toBe(true);
      // SPDK's controller becomes ready from its poller, after the write that enables it.
      let csts = await host.enable();
      for (let reads = 0; !(csts & (Csts.RDY | Csts.CFS)) && reads < 10_000; reads++) csts = await host.reg32(Register.CSTS);
      expect(csts & (Csts.RDY | Csts.CFS)).toBe(Csts.RDY);

      const identify = host.alloc(4096);
      expect((await host.admin({ opcode: 0x06, prp1: identify, cdw10: 1 })).status).toBe(0);
      const controller = host.read(identify, 4096);
      expect(controller.subarray(4, 24).toString().trimEnd()).toBe('SPDK00000000000001');
      expect(controller.subarray(24, 64).toString().trimEnd()).toBe('SPDK bdev Controller');
      expect((await host.admin({ opcode: 0x06, nsid: 1, prp1: identify, cdw10: 0 })).status).toBe(0);
      expect(host.read(identify, 8).readBigUInt64LE(0)).toBe(BigInt(TARGET_IMAGE_BYTES / 512));

      expect((await host.createIoQueuePair(1, 16)).map((c) => c.status)).toEqual([0, 0]);
      const data = randomBytes(4096);
      const page = host.alloc(4096);
      host.write(page, data);
      const lba = 16;
      expect((await host.submit(1, { opcode: 0x01, nsid: 1, prp1: page, cdw10: lba, cdw12: 4096 / 512 - 1 })).status).toBe(0);
      const inFile = Buffer.alloc(4096);
      const fd = openSync(target.image, 'r');
      readSync(fd, inFile, 0, 4096, lba * 512);
      closeSync(fd);
      expect(inFile.equals(data)).toBe(true);
      const back = host.alloc(4096);
      expect((await host.submit(1, { opcode: 0x02, nsid: 1, prp1: back, cdw10: lba, cdw12: 4096 / 512 - 1 })).status).toBe(0);
      expect(host.read(back, 4096).equals(data)).toBe(true);
      expect((await host.submit(1, { opcode: 0x02, nsid: 1, prp1: back, cdw10: 0, cdw12: 4096 / 512 - 1 })).status).toBe(0);
      expect(host.read(back, 4096).equals(target.head)).toBe(true);
    });
  });

  describe('spdk_tgt’s vfio-user virtio-blk endpoint', () => {
    let target: Target;
    let socket: string;
    beforeAll(async () => {
      target = startTarget('spdk_tgt', (rpcSocket) => virtioTargetArgs(rpcSocket, SPDK_MEMORY_MIB));
      socket = await setUp(target, () => serveVirtioTarget(SPDK!, target.rpcSocket, target.image, target.dir));
    }, SPDK_TIMEOUT_MS);
    // Our clients left it as they found it: still serving.
    afterAll(async () => expect(await target.stop(), target.output()).toBe('running'));

    test('our VirtioDriver negotiates, sets up a queue and reads a block, completed by MSI-X', async () => {
      const client = await cleanups.client(socket);
      const config = await client.regionRead(Region.CONFIG, 0n, 4);
      expect([config.readUInt16LE(0), config.readUInt16LE(2)]).toEqual([0x1af4, 0x1042]); // virtio, modern virtio-blk
      const driver = await VirtioDriver.connect(client, { memory: cleanups.memory(1 << 20) });
      cleanups.defer(() => driver.close());
      await driver.initialize({ queues: 1 });
      expect((await driver.readConfig(0, 8)).readBigUInt64LE(0)).toBe(BigInt(TARGET_IMAGE_BYTES / SECTOR));
      const header = Buffer.alloc(16);
      header.writeUInt32LE(BlkRequest.IN, 0);
      header.writeBigUInt64LE(0n, 8);
      const done = await driver.queues[0].submit([{ data: header }, { writable: 4096 }, { writable: 1 }]);
      expect(done.writable[1][0]).toBe(BlkStatus.OK);
      expect(done.writable[0].equals(target.head)).toBe(true);
      // Reset before leaving, as a guest's driver does: SPDK's endpoint keeps polling an enabled
      // queue after its client leaves and faults on the unmapped ring.
      await driver.reset();
    });
  });
});
