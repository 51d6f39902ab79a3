/** `vfio-user trace`: our client and our server talk through it, over real sockets and fds. */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { connect, EventfdIrq, IrqIndex, Region } from '../ts/index.js';
import { testCleanups } from './cleanups.js';
import { serve, SPAWNING_TEST_MS, STARTED_MS, tempSocketPath, until, type Served } from './helpers.js';
import { DmaTestDevice, PAGE } from './dma-device.js';

const root = join(__dirname, '..');

interface Trace {
  path: string;
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
}

const cleanups = testCleanups();
const { client, memory } = cleanups;

async function startTrace(served: Served<any>, ...extra: string[]): Promise<Trace> {
  const socket = tempSocketPath('trace.sock');
  const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'ts/cli/main.ts'), 'trace', '--listen', socket.path, '--connect', served.path, ...extra], {
    cwd: root,
    env: { ...process.env, NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d) => (stdout += d));
  child.stderr!.on('data', (d) => (stderr += d));
  cleanups.defer(() => {
    child.kill('SIGKILL');
    socket.cleanup();
  });
  await until(() => stderr.includes('listening on') || child.exitCode !== null, STARTED_MS);
  expect(existsSync(socket.path)).toBe(true);
  return { path: socket.path, child, stdout: () => stdout, stderr: () => stderr };
}

describe('vfio-user trace', { timeout: SPAWNING_TEST_MS }, () => {
  test('passes a whole session through, fds included, and prints every message decoded', async () => {
    const served = await serve();
    cleanups.defer(() => served.close());
    const trace = await startTrace(served);
    /** memfds, and eventfds by their kernel id (Node holds eventfds of its own), held by `pid`. */
    const heldFds = (pid: number | string) =>
      readdirSync(`/proc/${pid}/fd`).flatMap((fd) => {
        try {
          const target = readlinkSync(`/proc/${pid}/fd/${fd}`);
          const eventfd = /eventfd-id:\s*(\d+)/.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
          return target.startsWith('/memfd:') ? [target] : eventfd ? [`eventfd ${eventfd[1]}`] : [];
        } catch {
          return []; // closed meanwhile
        }
      });
    const c = await client(trace.path);

    expect((await c.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0x0dc8494f);
    await c.regionWrite(Region.BAR2, 0n, Buffer.from([0x5a]));
    expect((await c.regionRead(Region.BAR2, 0n, 1))[0]).toBe(0x5a);
    await expect(c.regionRead(Region.BAR2, 6n, 4)).rejects.toMatchObject({ errno: 22 });

    // DMA_MAP's memfd crosses the trace: the server maps a working copy of it.
    const ram = memory(4 * PAGE);
    await c.dmaMap({ iova: 0x100000n, memory: ram });
    ram.write(PAGE, Buffer.from('through the trace'));
    expect(served.device.dma.read(0x100000n + BigInt(PAGE), 17).toString()).toBe('through the trace');
    served.device.dma.write(0x100000n, Buffer.from('back'));
    expect(ram.read(0, 4).toString()).toBe('back');

    // SET_IRQS's eventfd crosses too: an interrupt raised by the device reaches the client's eventfd.
    const ev = new EventfdIrq();
    cleanups.defer(() => ev.close());
    await c.setIrqs({ index: IrqIndex.INTX, eventfds: [ev] });
    served.device.irq.raise();
    expect(ev.take()).toBe(1);

    const expected = [
      'client→server VERSION #1 version=0.2 maxMsgFds=16 maxDataXferSize=1048576',
      'server→client VERSION reply #1 version=0.2 maxMsgFds=16 maxDataXferSize=1048576 maxDmaMaps=65535 pgsizes=4096 writeMultiple=true',
      'client→server REGION_READ #2 region=CONFIG offset=0x0 count=4',
      'server→client REGION_READ reply #2 region=CONFIG offset=0x0 count=4 data=4f49c80d',
      'client→server REGION_WRITE #3 region=BAR2 offset=0x0 count=1 data=5a',
      'server→client REGION_WRITE reply #3 region=BAR2 offset=0x0 count=1',
      'client→server REGION_READ #4 region=BAR2 offset=0x0 count=1',
      'server→client REGION_READ reply #4 region=BAR2 offset=0x0 count=1 data=5a',
      'client→server REGION_READ #5 region=BAR2 offset=0x6 count=4',
      'server→client REGION_READ error #5 EINVAL (22)',
      'client→server DMA_MAP #6 flags=READ|WRITE address=0x100000 size=0x4000 offset=0x0 fds=1',
      'server→client DMA_MAP reply #6',
      'client→server DEVICE_SET_IRQS #7 index=INTX flags=DATA_EVENTFD|ACTION_TRIGGER start=0 count=1 fds=1',
      'server→client DEVICE_SET_IRQS reply #7',
    ];
    await until(() => trace.stdout().split('\n').length > expected.length);
    expect(trace.stdout().trimEnd().split('\n')).toEqual(expected);

    c.close();
    await until(() => /session 1 ended: the client closed the connection/.test(trace.stderr()));
    // The fds that crossed (the memfd, the eventfd) were closed on the way: the trace keeps no copy.
    const ours = heldFds('self').filter((fd) => fd === `eventfd ${/eventfd-id:\s*(\d+)/.exec(readFileSync(`/proc/self/fdinfo/${ev.fd}`, 'utf8'))![1]}` || fd.startsWith('/memfd:'));
    expect(ours.length).toBeGreaterThanOrEqual(2);
    const kept = heldFds(trace.child.pid!);
    expect(kept.filter((fd) => ours.includes(fd))).toEqual([]);
    // The server saw the client leave through the trace, and takes the next one.
    await until(() => served.server.session === undefined);
    const next = await client(trace.path);
    expect((await next.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).toBe(0x494f);

    trace.child.kill('SIGTERM');
    expect(await new Promise((r) => trace.child.on('exit', r))).toBe(0);
    expect(existsSync(trace.path)).toBe(false);
  });

  test('relays the twin socket, so DMA_READ and DMA_WRITE show; --json prints one parsable object per message', async () => {
    const device = new DmaTestDevice();
    const served = await serve(device);
    cleanups.defer(() => served.close());
    const trace = await startTrace(served, '--json');
    const c = await client(trace.path, { twinSocket: true });
    expect(c.twinSocket).toBe(true);
    const ram = memory(PAGE);
    ram.write(0, Buffer.from('twin'));
    // No fd shared: the server reaches guest memory by messages, on the twin socket.
    await c.dmaMap({ iova: 0x200000n, memory: ram, shareFd: false });
    expect((await device.dma.readAsync(0x200000n, 4)).toString()).toBe('twin');
    await device.dma.writeAsync(0x200000n + 8n, Buffer.from('back'));
    expect(ram.read(8, 4).toString()).toBe('back');

    await until(() => trace.stdout().split('\n').length > 8);
    const lines = trace.stdout().trimEnd().split('\n').map((line) => JSON.parse(line));
    expect(lines).toHaveLength(8);
    expect(lines[0]).toEqual({
      session: 1, from: 'client', to: 'server', type: 'command', id: 1, command: 'VERSION', flags: 0, size: lines[0].size, fds: 0,
      fields: { version: '0.2', maxMsgFds: 16, maxDataXferSize: 1048576, twinSocket: { supported: true } },
    });
    expect(lines[1]).toMatchObject({ type: 'reply', command: 'VERSION', fds: 1, fields: { twinSocket: { supported: true, fdIndex: 0 } } });
    expect(lines[2]).toMatchObject({ command: 'DMA_MAP', fds: 0, fields: { address: '0x200000', size: '0x1000', offset: '0x0' } });
    expect(lines[3]).toMatchObject({ type: 'reply', command: 'DMA_MAP' });
    expect(lines[4]).toMatchObject({ socket: 'twin', from: 'server', type: 'command', command: 'DMA_READ', id: 1, fields: { address: '0x200000', count: 4 } });
    expect(lines[5]).toMatchObject({ socket: 'twin', from: 'client', type: 'reply', command: 'DMA_READ', id: 1, fields: { data: { bytes: 4, hex: '7477696e' } } });
    expect(lines[6]).toMatchObject({ socket: 'twin', from: 'server', command: 'DMA_WRITE', fields: { address: '0x200008', count: 4, data: { bytes: 4, hex: '6261636b' } } });
    expect(lines[7]).toMatchObject({ socket: 'twin', from: 'client', type: 'reply', command: 'DMA_WRITE' });
    expect(trace.stderr()).toMatch(/session 1: relaying the twin socket/);
  });

  test('a server that is not there turns the client away and the trace keeps listening', async () => {
    const served = await serve();
    cleanups.defer(() => served.close());
    const trace = await startTrace(served);
    await served.close();
    await expect(connect(trace.path)).rejects.toThrow();
    await until(() => trace.stderr().includes('turned away'));
    expect(trace.stderr()).toMatch(/session 1: .*cannot connect.*turned away/);
    expect(trace.child.exitCode).toBe(null);
  });
});
