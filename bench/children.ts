/**
 * What the benchmark scripts share: child processes (servers and native clients) tracked so that
 * every way out kills them and removes the scratch folder, waiting for a server's socket, and
 * the small statistics and environment helpers.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';

/** The package root (the scripts run from dist/bench). */
export const ROOT = path.resolve(__dirname, '..', '..');

export function envInt(name: string, def: number, min: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return def;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < min) throw new Error(`${name}=${raw}: expected an integer >= ${min}`);
  return v;
}

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const n = s.length;
  if (n === 0) return NaN;
  return n % 2 === 1 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

export const START_TIMEOUT_MS = envInt('BENCH_START_TIMEOUT_MS', 15000, 100);

export interface Child {
  name: string;
  proc: ChildProcess;
  stdout: string;
  stderr: string;
  exited: boolean;
  exitCode: number | null;
  exitSignal: NodeJS.Signals | null;
  exitPromise: Promise<void>;
}

const children = new Set<Child>();
let scratch: string | null = null;

/** A scratch folder for sockets, removed with the children on every way out. */
export function scratchDir(): string {
  scratch ??= fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-bench-'));
  return scratch;
}

const TAIL = 8192;
function keepTail(s: string): string {
  return s.length > TAIL ? s.slice(s.length - TAIL) : s;
}

/** Starts `cmd` in `cwd` (default the package root). */
export function startChild(name: string, cmd: string, args: string[], cwd = ROOT): Child {
  const proc = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let resolveExit!: () => void;
  const child: Child = {
    name,
    proc,
    stdout: '',
    stderr: '',
    exited: false,
    exitCode: null,
    exitSignal: null,
    exitPromise: new Promise<void>((r) => (resolveExit = r)),
  };
  proc.stdout!.setEncoding('utf8').on('data', (d: string) => (child.stdout = keepTail(child.stdout + d)));
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (child.stderr = keepTail(child.stderr + d)));
  const onGone = (code: number | null, signal: NodeJS.Signals | null) => {
    if (child.exited) return;
    child.exited = true;
    child.exitCode = code;
    child.exitSignal = signal;
    children.delete(child);
    resolveExit();
  };
  proc.on('exit', onGone);
  proc.on('error', (err) => {
    child.stderr = keepTail(`${child.stderr}\nspawn failed: ${err.message}`);
    onGone(null, null);
  });
  children.add(child);
  return child;
}

export function describeExit(c: Child): string {
  const how = c.exitSignal ? `signal ${c.exitSignal}` : `code ${c.exitCode}`;
  const err = c.stderr.trim();
  return `${c.name} exited (${how})${err ? `:\n${indent(err)}` : ''}`;
}

function indent(s: string): string {
  return s
    .split('\n')
    .map((l) => `    ${l}`)
    .join('\n');
}

export async function stopChild(c: Child, graceMs = 2000): Promise<void> {
  if (c.exited) return;
  c.proc.kill('SIGTERM');
  const timer = setTimeout(() => {
    if (!c.exited) c.proc.kill('SIGKILL');
  }, graceMs);
  await c.exitPromise;
  clearTimeout(timer);
}

/** Runs a native client to completion (killed after `timeoutMs`) and returns the last line it printed. */
export async function runToEnd(name: string, cmd: string, args: string[], timeoutMs: number): Promise<string> {
  const c = startChild(name, cmd, args);
  const timer = setTimeout(() => c.proc.kill('SIGKILL'), timeoutMs);
  await c.exitPromise;
  clearTimeout(timer);
  if (c.exitCode !== 0) throw new Error(describeExit(c));
  return c.stdout.trim().split('\n').pop() ?? '';
}

export function killAllNow(): void {
  for (const c of children) {
    try {
      c.proc.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
  if (scratch) {
    try {
      fs.rmSync(scratch, { recursive: true, force: true });
    } catch {
      // best effort
    }
    scratch = null;
  }
}

process.on('exit', killAllNow);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(sig, () => {
    process.stderr.write(`\nbench: ${sig}, stopping\n`);
    killAllNow();
    process.exit(130);
  });
}

/** Runs a script's `main`, then kills what is left and exits with its code (1 if it threw). */
export function runMain(main: () => Promise<number>): void {
  main()
    .then((code) => {
      killAllNow();
      process.exit(code);
    })
    .catch((e: unknown) => {
      process.stderr.write(`bench: ${(e as Error)?.stack ?? String(e)}\n`);
      killAllNow();
      process.exit(1);
    });
}

/** utime + stime of this process or of process `pid`, in seconds (/proc/PID/stat counts clock ticks of 1/100 s). */
export function processCpuSeconds(pid: number | 'self' = 'self'): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces) start at state, field 3.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Resolves once `c` has printed a line `ready` and `socketPath` exists. */
export async function waitForReadyLine(c: Child, socketPath: string): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (c.exited) throw new Error(describeExit(c));
    if (/^ready$/m.test(c.stdout) && fs.existsSync(socketPath)) return;
    await sleep(20);
  }
  throw new Error(`${c.name} did not become ready within ${START_TIMEOUT_MS} ms`);
}

function probeConnect(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => {
      s.destroy();
      resolve(false);
    });
  });
}

/**
 * Resolves once `socketPath` exists, without connecting: for servers (libvfio-user's samples)
 * that listen before they accept and exit when a first connection closes before VERSION.
 */
export async function waitForSocketFile(c: Child, socketPath: string): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (c.exited) throw new Error(describeExit(c));
    if (fs.existsSync(socketPath)) return;
    await sleep(20);
  }
  throw new Error(`${c.name} did not create ${socketPath} within ${START_TIMEOUT_MS} ms`);
}

/** Resolves once `socketPath` exists and accepts a connection (the connection is closed at once). */
export async function waitForAccept(c: Child, socketPath: string): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (c.exited) throw new Error(describeExit(c));
    if (fs.existsSync(socketPath) && (await probeConnect(socketPath))) {
      await sleep(50); // let the server notice the probe went away before the real client arrives
      if (c.exited) throw new Error(describeExit(c));
      return;
    }
    await sleep(50);
  }
  throw new Error(`${c.name} did not accept a connection on ${socketPath} within ${START_TIMEOUT_MS} ms`);
}
