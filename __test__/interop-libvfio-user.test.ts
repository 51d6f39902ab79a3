/**
 * libvfio-user's own samples against us, both directions (issue 11, rows 1
 * and 2; docs/interop.md). Needs a libvfio-user meson build folder named by
 * VFIO_USER_LIBVFIO_USER, and for its `server` sample a second build whose
 * BAR1 is 16 KiB (VFIO_USER_LIBVFIO_USER_16K): at the commit tried, the
 * unpatched sample refuses its own 12 KiB BAR1.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { createServer, Errno, IrqIndex, Region } from '../ts/index.js';
import { native } from '../ts/native.js';
import { DeviceInfoFlags, RegionCapId } from '../ts/protocol/index.js';
import { SampleServerMirror } from './fixtures/sample-server.js';
import { testCleanups } from './cleanups.js';
import { tempSocketPath, until } from './helpers.js';

const LIBVFIO_USER = process.env.VFIO_USER_LIBVFIO_USER;
const LIBVFIO_USER_16K = process.env.VFIO_USER_LIBVFIO_USER_16K;
const root = join(__dirname, '..');
const PAGE = 4096;

const cleanups = testCleanups();
const { client, memory } = cleanups;

/** A process whose output is kept for assertions and failure messages. */
function run(file: string, args: string[], options: { stdin?: boolean } = {}): { child: ChildProcess; output: () => string } {
  const child = spawn(file, args, { cwd: root, stdio: [options.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (d) => (output += d));
  child.stderr!.on('data', (d) => (output += d));
  cleanups.defer(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return { child, output: () => output };
}

/**
 * Whether a socket listens at `path` (/proc/net/unix, flag __SO_ACCEPTCON).
 * libvfio-user binds its final path before it listens, so the file alone
 * does not say a connect will be accepted.
 */
function listening(path: string): boolean {
  return readFileSync('/proc/net/unix', 'utf8').split('\n').some((line) => line.endsWith(` ${path}`) && line.split(/\s+/)[3] === '00010000');
}

/** Starts one of libvfio-user's sample servers and waits for it to listen. */
async function sample(build: string, name: string, args: string[] = [], options: { stdin?: boolean } = {}) {
  const socket = tempSocketPath(`${name}.sock`);
  cleanups.defer(() => socket.cleanup());
  const server = run(join(build, 'samples', name), [...args, socket.path], options);
  await until(() => listening(socket.path) || server.child.exitCode !== null, 10000).catch(() => undefined);
  if (!listening(socket.path)) throw new Error(`${name} did not start:\n${server.output()}`);
  return { ...server, path: socket.path };
}

async function lspci(path: string): Promise<string> {
  const cli = run(process.execPath, ['--import', 'tsx', join(root, 'ts/cli/main.ts'), 'lspci', path]);
  const code = await new Promise<number | null>((r) => cli.child.on('exit', r));
  expect(code, cli.output()).toBe(0);
  return cli.output();
}

/** The children of `pid`, from /proc. */
function childrenOf(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** State letter and, for a zombie, the wait status (fields 3 and 52 of /proc/PID/stat). */
function procState(pid: number): { state: string; waitStatus: number } | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).trim().split(' ');
    return { state: fields[0], waitStatus: Number(fields[49]) };
  } catch {
    return undefined;
  }
}

describe.skipIf(!LIBVFIO_USER)('libvfio-user\'s client sample drives us (needs VFIO_USER_LIBVFIO_USER)', () => {
  test('it completes its whole run against a mirror of its server sample, migration to a second server included', async () => {
    // The client starts the destination as "<its own folder>/server -v SOCKET": a
    // folder with a link to it and a `server` that runs `vfio-user serve` on the mirror.
    const folder = mkdtempSync(join(tmpdir(), 'libvfio-user-client-'));
    cleanups.defer(() => rmSync(folder, { recursive: true, force: true }));
    symlinkSync(join(LIBVFIO_USER!, 'samples', 'client'), join(folder, 'client'));
    const cli = `'${process.execPath}' --import tsx '${join(root, 'ts/cli/main.ts')}' serve '${join(root, '__test__/fixtures/sample-server.ts')}'`;
    writeFileSync(join(folder, 'server'), `#!/bin/sh\nfor socket; do :; done\nexec ${cli} --socket "$socket"\n`);
    chmodSync(join(folder, 'server'), 0o755);

    const socket = tempSocketPath('source.sock');
    cleanups.defer(() => socket.cleanup());
    const sourceLog: string[] = [];
    const device = new SampleServerMirror((line) => sourceLog.push(line));
    const server = createServer(device);
    const deviceErrors: Error[] = [];
    server.on('deviceError', (error) => deviceErrors.push(error));
    await server.listen(socket.path);
    cleanups.defer(async () => {
      await server.close();
      device.close();
      expect(deviceErrors).toEqual([]);
    });
    cleanups.defer(() => rmSync(`${socket.path}_migrated`, { force: true }));

    // client.c's migrate_to() forks and execs the server in the *parent*: the
    // process started here becomes the destination, and the client carries on
    // as its child. Its exit status is read from /proc while it is a zombie
    // (the destination, being Node, never reaps a child it did not spawn).
    const { child, output } = run(join(folder, 'client'), [socket.path]);
    const pid = child.pid!;
    let clientPid: number | undefined;
    await until(() => {
      clientPid ??= childrenOf(pid)[0];
      return child.exitCode !== null || (clientPid !== undefined && procState(clientPid)?.state === 'Z');
    }, 90000).catch((error) => {
      throw new Error(`${(error as Error).message}; the source did:\n${sourceLog.join('\n')}\nthe client and destination printed:\n${output()}`);
    });
    expect(child.exitCode, `the client failed before migrating:\n${output()}`).toBeNull();
    expect(procState(clientPid!)!.waitStatus, output()).toBe(0);
    child.kill('SIGTERM');
    await new Promise((r) => child.on('exit', r));

    const log = output();
    expect(log.match(/client: INTx triggered!/g), log).toHaveLength(2);
    expect(sourceLog.slice(0, 5)).toEqual([
      'timer armed for 1 s', 'INTx triggered', 'DMA by fd at 0x1000: ok', 'DMA by message at 0x0: ok', 'timer armed for 10 s',
    ]);
    // The client left the source in STOP, and a client leaving mid-migration sets the device
    // running again (docs/migration.md): the timer is re-armed, and finds nobody to interrupt.
    expect(sourceLog.slice(5).filter((line) => line.startsWith('FAILED'))).toEqual([]);
    // The destination's stderr is the client's: 16 windows (server_max_fds) were unmapped before migrating.
    expect(log).toContain(`sample-server: loaded stopcopy unit 0: ${0x3000 + 8} bytes`);
    expect(log).toContain('sample-server: DMA by fd at 0x11000: ok');
    expect(log).toContain('sample-server: DMA by message at 0x10000: ok');
    expect(log).not.toContain('FAILED');
  }, 120000);
});

describe.skipIf(!LIBVFIO_USER)('our client and lspci drive libvfio-user\'s samples (needs VFIO_USER_LIBVFIO_USER)', () => {
  test('gpio-pci-idio-16: config space, BAR2 registers, INTx wiring, DMA maps, reset, lspci', async () => {
    const gpio = await sample(LIBVFIO_USER!, 'gpio-pci-idio-16');
    const c = await client(gpio.path);
    const info = await c.getDeviceInfo();
    expect(info).toMatchObject({ flags: DeviceInfoFlags.PCI | DeviceInfoFlags.RESET, numRegions: 9, numIrqs: 5 });
    expect((await c.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0x0dc8494f);
    expect(await c.getRegionInfo(Region.BAR2)).toMatchObject({ size: 256n, caps: [] });
    // Output pins 0-2 count one edge each; an input bit reads 1 while its pin's count is a multiple of 3.
    await c.regionWrite(Region.BAR2, 0n, Buffer.from([0x07]));
    expect((await c.regionRead(Region.BAR2, 1n, 1))[0]).toBe(0xf8);
    expect((await c.getIrqInfo(IrqIndex.INTX)).count).toBe(1);
    const [intx] = await c.wireIrqs(IrqIndex.INTX);
    cleanups.defer(() => intx.close());
    const ram = memory(4 * PAGE);
    await c.dmaMap({ iova: 0x100000n, memory: ram });
    await c.dmaMap({ iova: 0x200000n, memory: memory(PAGE), shareFd: false });
    await c.reset();
    await c.dmaUnmap(0x100000n, BigInt(4 * PAGE));
    await c.dmaUnmapAll();
    c.close();
  });

  test('null: the bare PCI device answers info, config space and reset; lspci describes it', async () => {
    const nul = await sample(LIBVFIO_USER!, 'null', [], { stdin: true });
    const c = await client(nul.path);
    expect(await c.getDeviceInfo()).toMatchObject({ flags: DeviceInfoFlags.PCI | DeviceInfoFlags.RESET, numRegions: 9 });
    expect((await c.regionRead(Region.CONFIG, 0n, 64)).length).toBe(64);
    for (const index of [Region.BAR0, Region.BAR5, Region.ROM, Region.VGA]) expect((await c.getRegionInfo(index)).size).toBe(0n);
    await expect(c.regionRead(Region.BAR0, 0n, 4)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await c.reset();
    c.close();
    nul.child.stdin!.end('\n'); // the sample stops on a line from stdin
    await new Promise((r) => nul.child.on('exit', r));
  });

  test.skipIf(!LIBVFIO_USER_16K)('server (16 KiB BAR1, VFIO_USER_LIBVFIO_USER_16K): regions, DMA by fd and by message, INTx, dirty logging, reset', async () => {
    const server = await sample(LIBVFIO_USER_16K!, 'server', ['-v']);
    // Without the twin socket, a command of ours arriving while the sample waits for a DMA
    // reply is taken for that reply: EPROTO, and the sample exits (libvfio-user #279).
    const c = await client(server.path, { twinSocket: true });
    expect(c.twinSocket).toBe(true);
    await expect(c.regionRead(0x7fffffff, 0n, 4)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(await c.getDeviceInfo()).toMatchObject({ flags: DeviceInfoFlags.PCI | DeviceInfoFlags.RESET, numRegions: 9, numIrqs: 5 });
    const config = await c.regionRead(Region.CONFIG, 0n, 64);
    expect([config.readUInt16LE(0), config.readUInt16LE(2), config.readUInt16LE(0x2c), config.readUInt16LE(0x2e)]).toEqual([0xdead, 0xbeef, 0xcafe, 0xbabe]);

    // BAR1: sparse-mmappable first and last pages, backed by the fd it sends.
    const bar1 = await c.getRegionInfo(Region.BAR1);
    cleanups.defer(() => native.closeFd(bar1.fd!));
    expect(bar1.size).toBe(0x4000n);
    expect(bar1.caps).toEqual([{ id: RegionCapId.SPARSE_MMAP, areas: [{ offset: 0n, size: 0x1000n }, { offset: 0x2000n, size: 0x1000n }] }]);
    await c.regionWrite(Region.BAR1, 0n, Buffer.from('through the socket'));
    const mapped = new native.NativeMapping(bar1.fd!, bar1.offset, 0x1000n, true, true);
    cleanups.defer(() => mapped.unmap());
    expect(mapped.read(0, 18).toString()).toBe('through the socket');
    // (The sample's BAR1 read handler ignores the offset: only offset 0 reads back what was written.)
    expect((await c.regionRead(Region.BAR1, 0n, 18)).toString()).toBe('through the socket');
    await c.reset();

    // Its DMA goes to the first window it was given by message and to the second through its fd.
    const byMessage = memory(PAGE);
    const byFd = memory(PAGE);
    await c.dmaMap({ iova: 0n, memory: byMessage, shareFd: false });
    await c.dmaMap({ iova: BigInt(PAGE), memory: byFd });
    const [intx] = await c.wireIrqs(IrqIndex.INTX);
    cleanups.defer(() => intx.close());
    await c.migration.startDirtyLogging(BigInt(PAGE));

    // BAR0 takes a time_t: the sample raises INTx at that second, then does its DMA.
    const at = Buffer.alloc(8);
    at.writeBigInt64LE(BigInt(Math.floor(Date.now() / 1000) + 1));
    await c.regionWrite(Region.BAR0, 0n, at);
    await intx.next();
    const pattern = Buffer.concat([0x41, 0x42, 0x43, 0x44].map((b) => Buffer.alloc(1024, b)));
    await until(() => byMessage.read(0, PAGE).equals(pattern) && byFd.read(0, PAGE).equals(pattern), 10000);
    expect((await c.regionRead(Region.BAR0, 0n, 8)).readBigInt64LE(0)).toBeGreaterThanOrEqual(0n); // seconds since that time

    // The server reports what it wrote through the fd; the client tracks its own DMA_WRITEs.
    expect((await c.migration.dirtyReport(BigInt(PAGE), BigInt(PAGE), BigInt(PAGE)))[0]).toBe(1n);
    await c.migration.stopDirtyLogging();
    await c.dmaUnmapAll();
    c.close();
    expect(server.output()).toContain('do_dma_io: MESSAGE success');
    expect(server.output()).toContain('do_dma_io: DIRECT success');
    expect(server.output()).not.toContain('without the twin_socket feature');
  });

  test('vfio-user lspci describes each sample', async () => {
    const gpio = await lspci((await sample(LIBVFIO_USER!, 'gpio-pci-idio-16')).path);
    expect(gpio).toContain('Device [494f:0dc8]');
    expect(gpio).toMatch(/Region 2 \(BAR2\): size=256 R\+ W\+ MMAP-/);
    expect(gpio).toMatch(/IRQ 0 \(INTx\): count=1/);
    const nul = await sample(LIBVFIO_USER!, 'null', [], { stdin: true });
    expect(await lspci(nul.path)).toContain('vfio-user: PCI+ RESET+, 9 regions');
    nul.child.stdin!.end('\n');
    if (LIBVFIO_USER_16K) {
      const server = await lspci((await sample(LIBVFIO_USER_16K, 'server')).path);
      expect(server).toContain('Device [dead:beef]');
      expect(server).toMatch(/Region 1 \(BAR1\): size=16K offset=0x0 R\+ W\+ MMAP\+\n\t+Sparse mmap: 0x0\+0x1000 0x2000\+0x1000/);
    }
  });
});
