/**
 * What the fuzzer attacks: a device served in this process (its
 * `deviceError` events seen directly), a device module served by a child
 * `vfio-user serve` (a device that loops forever cannot freeze the fuzzer,
 * and a crash is a finding, not the end of the run), or any server's socket.
 * The first two start afresh for every replay, which shrinking needs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { closeFds, native } from '../native.js';
import { createServer } from '../server/server.js';
import { parseDeviceErrorLine } from '../cli/serve.js';
import { UsageError } from '../errors.js';
import type { DeviceFactory, VfioUserDevice } from '../device.js';

/** One served device, from start to stop. */
export interface TargetInstance {
  readonly path: string;
  /** The serving process, when it runs on this machine: its /proc entry is watched. */
  readonly pid: number | undefined;
  /**
   * Device errors since the last call: an in-process server's as they
   * happen, a child's as its log reaches this process (later than the EIO
   * reply they cause, but also those a reconnect resets before any reply
   * shows them). Undefined when they cannot be seen.
   */
  takeDeviceErrors?(): { error: Error; command: number | undefined }[];
  /** Whether takeDeviceErrors has each device error before its EIO reply arrives; if not, an EIO stands for one. */
  readonly errorsBeforeReplies?: boolean;
  /** What the serving process printed, for a report (child processes). */
  output?(): string;
  stop(): Promise<void>;
}

export interface FuzzTarget {
  /** What it is, for reports. */
  readonly description: string;
  /** Whether every start() is a fresh device: only then can a failing sequence be shrunk by replays. */
  readonly fresh: boolean;
  start(): Promise<TargetInstance>;
}

/** A device module to serve in a child process, as `vfio-user serve MODULE -- ARGS` would. */
export interface DeviceModule {
  module: string;
  args?: readonly string[];
}

function tempSocket(): { path: string; cleanup(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-fuzz-'));
  return { path: join(dir, 'device.sock'), cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Serves `device` (a factory gives a fresh device for every replay) in this process. */
export function inProcessTarget(device: VfioUserDevice | DeviceFactory): FuzzTarget {
  const fresh = typeof device === 'function';
  let used = false;
  return {
    description: fresh ? 'a device factory, served in this process' : 'a device, served in this process',
    fresh,
    async start() {
      if (!fresh && used) throw new UsageError('a device instance serves one fuzz run; pass a factory to replay');
      used = true;
      const dev = fresh ? await device([]) : device;
      const server = createServer(dev);
      const errors: { error: Error; command: number | undefined }[] = [];
      server.on('deviceError', (error, command) => errors.push({ error, command }));
      const socket = tempSocket();
      await server.listen(socket.path);
      return {
        path: socket.path,
        pid: process.pid,
        takeDeviceErrors: () => errors.splice(0),
        errorsBeforeReplies: true,
        async stop() {
          await server.close();
          socket.cleanup();
          // A fresh device per run: the old one's timers, files and pollers go with it.
          if (fresh) (dev as { close?(): void }).close?.();
        },
      };
    },
  };
}

/** The CLI, compiled or (in a clone, under tsx) from source. */
function cliCommand(): string[] {
  const js = join(__dirname, '..', 'cli', 'main.js');
  if (existsSync(js)) return [js];
  return ['--import', 'tsx', join(__dirname, '..', 'cli', 'main.ts')];
}

/** How long a child `vfio-user serve` may take to listen (tsx compiles the module first). */
const CHILD_START_MS = 60_000;

/** Serves a device module in a child `vfio-user serve`, a new process for every start. */
export function childTarget(device: DeviceModule): FuzzTarget {
  return {
    description: `${device.module} served by a child process`,
    fresh: true,
    async start() {
      const socket = tempSocket();
      const args = [...cliCommand(), 'serve', device.module, '--socket', socket.path, '--', ...(device.args ?? [])];
      const child = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'] });
      let output = '';
      const errors: { error: Error; command: number | undefined }[] = [];
      child.stderr!.setEncoding('utf8').on('data', (text: string) => (output = (output + text).slice(-16_384)));
      let last: Error | undefined;
      createInterface({ input: child.stderr!, crlfDelay: Infinity }).on('line', (line) => {
        const deviceError = parseDeviceErrorLine(line);
        if (deviceError) errors.push(deviceError);
        // A stack's frames, indented, follow its error's line.
        if (!deviceError && last && /^\s+at /.test(line)) last.stack += `\n${line}`;
        else last = deviceError?.error;
      });
      try {
        await listening(child, socket.path, () => output);
      } catch (error) {
        child.kill('SIGKILL');
        socket.cleanup();
        throw error;
      }
      return {
        path: socket.path,
        pid: child.pid,
        takeDeviceErrors: () => errors.splice(0),
        output: () => output,
        async stop() {
          // SIGKILL: a device that loops ignores SIGTERM (its loop never yields to the handler).
          if (child.exitCode === null && child.signalCode === null) {
            const exited = new Promise((done) => child.once('exit', done));
            child.kill('SIGKILL');
            await exited;
          }
          socket.cleanup();
        },
      };
    },
  };
}

async function listening(child: ChildProcess, path: string, output: () => string): Promise<void> {
  const deadline = Date.now() + CHILD_START_MS;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new UsageError(`vfio-user serve exited before listening:\n${output()}`);
    if (existsSync(path)) return;
    if (Date.now() > deadline) throw new UsageError(`vfio-user serve did not listen within ${CHILD_START_MS} ms:\n${output()}`);
    await sleep(10);
  }
}

/** A server somebody else runs at `path`; the same device for every start, so nothing is shrunk. */
export function socketTarget(path: string): FuzzTarget {
  return {
    description: `the server at ${path}`,
    fresh: false,
    async start() {
      return { path, pid: serverPid(path), async stop() {} };
    },
  };
}

/**
 * The pid of the process listening at `path` (SO_PEERCRED of a connection
 * still in its backlog: the listener's credentials), when it runs in this
 * machine's pid namespace.
 */
function serverPid(path: string): number | undefined {
  const fd = native.connectUnix(path);
  try {
    const { pid } = native.peerCredentials(fd);
    return pid > 0 && existsSync(`/proc/${pid}`) ? pid : undefined;
  } finally {
    closeFds([fd]);
  }
}

/** What /proc says about a server process. */
export interface ProcessHealth {
  alive: boolean;
  /** The scheduler state letter (R running, S sleeping, Z zombie...). */
  state?: string;
  fds?: number;
  rssBytes?: number;
}

export function processHealth(pid: number): ProcessHealth {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const state = /^State:\s+(\S)/m.exec(status)?.[1];
    if (state === 'Z' || state === 'X') return { alive: false, state };
    const rss = /^VmRSS:\s+(\d+) kB/m.exec(status);
    return { alive: true, state, fds: readdirSync(`/proc/${pid}/fd`).length, rssBytes: rss ? Number(rss[1]) * 1024 : undefined };
  } catch {
    return { alive: false };
  }
}
