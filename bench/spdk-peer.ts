/**
 * How SPDK's programs run here (../shared/peers.md, docs/interop.md): where a
 * build keeps them, the transport ID its NVMe host takes, the rpc.py calls
 * that make its targets serve a tmpfs-file aio bdev over vfio-user, and the
 * JSON config that points its virtio driver at a socket. Shared by
 * bench/spdk.ts and __test__/interop-spdk.test.ts; free of vitest. Starting
 * and stopping the processes is the caller's (each tracks its children its
 * own way).
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

/** The subsystem SPDK's NVMe host names; without it, it takes a controller for a discovery controller. */
export const SUBNQN = 'nqn.2019-07.io.spdk:cnode0';
/** The bdev every target here serves. */
const BDEV = 'Bdev0';
const BLOCK_SIZE = 512;
/** rpc.py retries connecting every 0.2 s: 15 s for a target still starting. */
const RPC_CONNECT_RETRIES = 75;

export type SpdkProgram = 'nvmf_tgt' | 'spdk_tgt' | 'spdk_nvme_identify' | 'spdk_nvme_perf' | 'bdevperf';

/** A program of the SPDK build at `spdk` (VFIO_USER_SPDK); bdevperf is an example (build-spdk.sh builds it). */
export function spdkProgram(spdk: string, name: SpdkProgram): string {
  return join(spdk, 'build', name === 'bdevperf' ? 'examples' : 'bin', name);
}

/** `-r` of SPDK's NVMe host for a vfio-user controller whose socket is `dir`/cntrl. */
export function transportId(dir: string): string {
  return `trtype:VFIOUSER traddr:${dir} subnqn:${SUBNQN}`;
}

/** 2 MiB hugepage memory free on a mounted hugetlbfs, in MiB (0 without one). */
export function freeHugepagesMiB(): number {
  if (!readFileSync('/proc/mounts', 'utf8').includes(' hugetlbfs ')) return 0;
  const meminfo = readFileSync('/proc/meminfo', 'utf8');
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(meminfo)?.[1] ?? 0);
  return (field('HugePages_Free') * field('Hugepagesize')) / 1024;
}

/** The first `*ERROR*` line SPDK printed, without its timestamp (what stopped it). */
export function firstError(output: string): string | undefined {
  return /^(?:\[[^\]]*\]\s*)?(.*\*ERROR\*.*)$/m.exec(output)?.[1]?.trim();
}

/** Runs `rpc.py METHOD ARGS` against the target listening on `socket`; rejects with rpc.py's own message. */
export function rpc(spdk: string, socket: string, args: readonly string[]): Promise<string> {
  // Debian's python3 has the modules rpc.py imports; a virtual environment earlier on PATH may not.
  const python = '/usr/bin/python3';
  const script = join(spdk, 'scripts', 'rpc.py');
  return new Promise((resolve, reject) =>
    execFile(python, [script, '-s', socket, '-r', String(RPC_CONNECT_RETRIES), ...args], { timeout: 60_000 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`rpc.py ${args.join(' ')}: ${(stderr || stdout || error.message).trim()}`));
      else resolve(stdout);
    }),
  );
}

/** Arguments of `nvmf_tgt` on core 0 with `memoryMiB` of hugepages, answering RPCs on `rpcSocket`. */
export function nvmfTargetArgs(rpcSocket: string, memoryMiB: number): string[] {
  return ['-m', '0x1', '-s', String(memoryMiB), '-r', rpcSocket, '--num-trace-entries', '0'];
}

/**
 * Makes a started nvmf_tgt serve `image` (an aio bdev of 512-byte blocks) as
 * namespace 1 of SUBNQN on a VFIOUSER listener: the socket is `dir`/cntrl.
 */
export async function serveNvmfTarget(spdk: string, rpcSocket: string, image: string, dir: string): Promise<void> {
  const call = (...args: string[]) => rpc(spdk, rpcSocket, args);
  await call('nvmf_create_transport', '-t', 'VFIOUSER');
  await call('bdev_aio_create', image, BDEV, String(BLOCK_SIZE));
  await call('nvmf_create_subsystem', SUBNQN, '-a', '-s', 'SPDK00000000000001');
  await call('nvmf_subsystem_add_ns', SUBNQN, BDEV);
  await call('nvmf_subsystem_add_listener', SUBNQN, '-t', 'VFIOUSER', '-a', dir, '-s', '0');
}

/**
 * Arguments of `spdk_tgt` on core 0 with `memoryMiB` of hugepages, waiting for
 * RPCs before it starts its subsystems (serveVirtioTarget shrinks their pools
 * first: with the defaults, iSCSI's alone does not fit in 256 MiB).
 */
export function virtioTargetArgs(rpcSocket: string, memoryMiB: number): string[] {
  return ['-m', '0x1', '-s', String(memoryMiB), '-r', rpcSocket, '--num-trace-entries', '0', '--wait-for-rpc'];
}

/** Virtio-blk queues of both virtio-blk servers the bench compares (SPDK's driver fails with one: "no more unused virtio queues"). */
export const VIRTIO_QUEUES = 2;
const VIRTIO_QUEUE_SIZE = 256;

/**
 * Makes a started `spdk_tgt --wait-for-rpc` serve `image` (an aio bdev) as a
 * virtio-blk endpoint over vfio-user; returns its socket (`dir`/vfu.0).
 */
export async function serveVirtioTarget(spdk: string, rpcSocket: string, image: string, dir: string): Promise<string> {
  const call = (...args: string[]) => rpc(spdk, rpcSocket, args);
  await call('iscsi_set_options', '--max-sessions', '1', '--max-connections-per-session', '1',
    '--pdu-pool-size', '64', '--immediate-data-pool-size', '16', '--data-out-pool-size', '16');
  await call('iobuf_set_options', '--small-pool-count', '1024', '--large-pool-count', '64');
  await call('bdev_set_options', '--bdev-io-pool-size', '2048', '--bdev-io-cache-size', '128');
  await call('framework_start_init');
  await call('vfu_tgt_set_base_path', dir);
  await call('bdev_aio_create', image, BDEV, String(BLOCK_SIZE));
  await call('vfu_virtio_create_blk_endpoint', 'vfu.0', '--bdev-name', BDEV, '--cpumask', '0x1',
    '--num-queues', String(VIRTIO_QUEUES), '--qsize', String(VIRTIO_QUEUE_SIZE));
  return join(dir, 'vfu.0');
}

/**
 * bdevperf's `--json` config: SPDK's virtio driver attaches the vfio-user
 * virtio-blk device at `socket` as bdev VirtioBlk0n (its pools shrunk to fit
 * a few hundred MiB of hugepages).
 */
export function virtioBdevConfig(socket: string): object {
  return {
    subsystems: [
      { subsystem: 'iobuf', config: [{ method: 'iobuf_set_options', params: { small_pool_count: 1024, large_pool_count: 64 } }] },
      {
        subsystem: 'bdev',
        config: [
          { method: 'bdev_set_options', params: { bdev_io_pool_size: 2048, bdev_io_cache_size: 128 } },
          { method: 'bdev_virtio_attach_controller', params: { name: 'VirtioBlk0', trtype: 'vfio-user', traddr: socket, dev_type: 'blk' } },
        ],
      },
    ],
  };
}

/** IOPS on the `Total` line of spdk_nvme_perf's or bdevperf's summary. */
export function totalIops(output: string): number | undefined {
  const m = /^\s*Total\s*:\s*([\d.]+)\s/m.exec(output);
  return m ? Number(m[1]) : undefined;
}
