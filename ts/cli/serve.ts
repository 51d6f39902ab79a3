/** `vfio-user serve`: load a device module and serve it until a signal. */
import { existsSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { createServer, type ServerOptions } from '../server/server.js';
import { UsageError } from '../errors.js';
import { Command, commandName } from '../protocol/index.js';
import { contractOf, type DeviceFactory, type VfioUserDevice } from '../device.js';
import type { PciDevice } from '../pci/device.js';
import { importWithOwnCopy, requireWithOwnCopy } from './own-copy.js';
import { contextOf } from '../boundary.js';

function isDevice(value: unknown): value is VfioUserDevice | PciDevice {
  return typeof value === 'object' && value !== null && contractOf(value) !== undefined;
}

/** A folder stands for its index module (`examples/nvme` → `examples/nvme/index.ts`). */
function modulePath(file: string): string {
  const path = resolve(file);
  if (!existsSync(path) || !statSync(path).isDirectory()) return path;
  const index = ['index.ts', 'index.mts', 'index.js', 'index.mjs'].map((name) => join(path, name)).find((candidate) => existsSync(candidate));
  if (index === undefined) throw new UsageError(`${file} is a folder without an index module (index.ts or index.js)`);
  return index;
}

/**
 * Imports `file` (TS through tsx, or JS; a folder means its index module),
 * with `vfio-user` resolving to the running copy of the library (own-copy.ts), and
 * returns the device it exports: the default export itself, or what that
 * export returns when it is a `DeviceFactory`, called with `args`.
 */
export async function loadDevice(file: string, args: string[] = []): Promise<VfioUserDevice | PciDevice> {
  const path = modulePath(file);
  const typescript = /\.[cm]?ts$/.test(path);
  let exported: unknown;
  if (/\.m[jt]s$/.test(path)) {
    // Without tsconfig `paths`, which would send `vfio-user` to the sources, whatever the running copy.
    const unregister = typescript ? (await tsx(file, () => import('tsx/esm/api'))).register({ tsconfig: false }) : undefined;
    importWithOwnCopy();
    try {
      exported = await import(pathToFileURL(path).href);
    } finally {
      await unregister?.();
    }
  } else {
    // tsx lets plain Node require .ts device modules; .js ones load as usual.
    const unregister = typescript ? (await tsx(file, () => import('tsx/cjs/api'))).register() : undefined;
    try {
      exported = requireWithOwnCopy(() => require(path));
    } finally {
      unregister?.();
    }
  }
  // ESM default, or a CommonJS module's exports seen through import().
  for (let i = 0; i < 2 && typeof exported === 'object' && exported !== null && 'default' in exported; i++) {
    exported = (exported as { default: unknown }).default;
  }
  const device = typeof exported === 'function' ? await (exported as DeviceFactory)(args) : exported;
  if (!isDevice(device)) throw new UsageError(`${file} must export a device (or a function (args: string[]) returning one) as its default export`);
  return device;
}

/**
 * tsx's API: an optional peer dependency, needed only to serve a TypeScript
 * module (the shipped examples are served compiled).
 */
async function tsx<Api>(file: string, load: () => Promise<Api>): Promise<Api> {
  try {
    return await load();
  } catch (error) {
    if (!['ERR_MODULE_NOT_FOUND', 'MODULE_NOT_FOUND'].includes((error as { code?: string }).code ?? '')) throw error;
    throw new UsageError(`${file} is TypeScript: serving it needs tsx (npm install --save-dev tsx), or compile it to JavaScript first`);
  }
}

export interface ServeOptions {
  /** Permission bits of a new socket file (owner-only by default). */
  mode?: number;
  /** Passed to the module's factory: the command line after `--`. */
  args?: string[];
  /** Who may connect, deadlines and bounds (docs/security.md). */
  server?: ServerOptions;
}

export async function serve(file: string, socket: string | { fd: number }, options: ServeOptions = {}): Promise<void> {
  const device = await loadDevice(file, options.args);
  const server = createServer(device, options.server);
  server.on('connection', () => console.error('vfio-user: client connected'));
  server.on('connectionRefused', (peer, reason) => console.error(`vfio-user: refused a client (pid ${peer.pid}): ${reason}`));
  server.on('requestTimeout', (command) => console.error(`vfio-user: ${commandName(command)} timed out; the client was answered ETIMEDOUT`));
  server.on('disconnect', (_s, error) => console.error(`vfio-user: client disconnected${error ? ` (${error.message})` : ''}`));
  server.on('deviceError', (error, command) => console.error(deviceErrorLine(error, command)));
  await server.listen(socket, { mode: options.mode });
  // One device per process: what escapes its own plain timers and promises is the device failing too.
  const boundary = contextOf(contractOf(device)!);
  const failed = (error: unknown) => boundary.fail(error);
  process.on('uncaughtException', failed);
  process.on('unhandledRejection', failed);
  console.error(`vfio-user: serving ${file} on ${typeof socket === 'string' ? socket : `fd ${socket.fd}`}`);
  await untilSignal();
  await server.close();
  // The device's cleanup hook (PciDevice's runs the description's onClose): timers, watches, files.
  await device.close?.();
  process.off('uncaughtException', failed);
  process.off('unhandledRejection', failed);
}

const ON_ITS_OWN = 'device code running on its own';
const DEVICE_ERROR = /^vfio-user: device error in (.+?) \(the device is failed until reset\): (.*)$/;

/** What serve prints for a device error (its stack follows on the next lines). */
function deviceErrorLine(error: Error, command: number | undefined): string {
  const where = command === undefined ? ON_ITS_OWN : commandName(command);
  return `vfio-user: device error in ${where} (the device is failed until reset): ${error.stack ?? error.message}`;
}

/**
 * A device error from a line serve printed: how the fuzzer sees the device
 * errors of a device it serves in a child process, even one a reconnect
 * has reset before any request could be answered EIO.
 */
export function parseDeviceErrorLine(line: string): { error: Error; command: number | undefined } | undefined {
  const match = DEVICE_ERROR.exec(line);
  if (!match) return undefined;
  const command = match[1] === ON_ITS_OWN ? undefined : Command[match[1] as keyof typeof Command];
  const error = new Error(match[2]);
  // The child's stack, not this process's: its frames follow on the lines after.
  error.stack = match[2];
  return { error, command };
}

/** Resolves on the first SIGINT or SIGTERM: the way a served device or a trace is stopped. */
export function untilSignal(): Promise<void> {
  return new Promise((done) => {
    const stop = () => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      done();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}
