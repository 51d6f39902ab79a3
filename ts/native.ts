/**
 * The native addon. An installed package loads it from the platform package
 * npm installed as an optional dependency (`vfio-user-linux-x64-gnu` and its
 * siblings, one per platform); a clone loads its own build from `native/`
 * (`npm run build:native`). `NAPI_RS_NATIVE_LIBRARY_PATH` names a `.node` file
 * to load instead, as in every napi-rs package.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { getSystemErrorMap } from 'node:util';
import type * as NativeBinding from './native-binding.js';

const PACKAGE = 'vfio-user';

const PREBUILT = ['linux-x64-gnu', 'linux-arm64-gnu', 'linux-x64-musl', 'linux-arm64-musl'];

/** This machine's platform as napi-rs names it: `linux-x64-gnu`. */
function platformName(): string {
  // Node reports the glibc it runs on; a Node built for musl reports none.
  const header = (process.report.getReport() as { header?: { glibcVersionRuntime?: string } }).header;
  return `${process.platform}-${process.arch}${process.platform === 'linux' ? (header?.glibcVersionRuntime ? '-gnu' : '-musl') : ''}`;
}

function packageRoot(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    const manifest = join(dir, 'package.json');
    if (existsSync(manifest) && JSON.parse(readFileSync(manifest, 'utf8')).name === PACKAGE) return dir;
    if (dirname(dir) === dir) throw new Error(`vfio-user: cannot find the package root above ${from}`);
  }
}

function firstLine(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).split('\n')[0];
}

function load(): typeof NativeBinding {
  const override = process.env.NAPI_RS_NATIVE_LIBRARY_PATH;
  if (override) return require(override);
  const platform = platformName();
  if (process.platform !== 'linux') {
    throw new Error(`vfio-user runs on Linux only (vfio-user sockets carry Linux fds: eventfds, memfds); this is ${platform}.`);
  }
  if (!PREBUILT.includes(platform)) {
    throw new Error(
      `vfio-user: no prebuilt native addon for ${platform} (there are for ${PREBUILT.join(', ')}). ` +
        `Build one from source in a clone of vfio-user with \`npm run build:native\` (needs Rust), ` +
        `or point NAPI_RS_NATIVE_LIBRARY_PATH at a .node file you built.`,
    );
  }
  const root = packageRoot(__dirname);
  const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string };
  const localBuild = join(root, 'native', `${PACKAGE}.${platform}.node`);
  if (existsSync(localBuild)) return require(localBuild);
  const binaryPackage = `${PACKAGE}-${platform}`;
  let manifest: string;
  try {
    manifest = require.resolve(`${binaryPackage}/package.json`, { paths: [root] });
  } catch {
    throw new Error(
      `vfio-user: no native addon for ${platform}: the package ${binaryPackage} is not installed. ` +
        `npm installs it with vfio-user as an optional dependency: reinstall without --omit=optional (or --no-optional), ` +
        `or add it yourself with \`npm install ${binaryPackage}@${version}\`. ` +
        `In a clone of vfio-user, build the addon from source with \`npm run build:native\` (needs Rust).`,
    );
  }
  const installed = (JSON.parse(readFileSync(manifest, 'utf8')) as { version: string }).version;
  if (installed !== version) {
    throw new Error(`vfio-user: ${binaryPackage} is version ${installed} but vfio-user is ${version}: install the same version of both (\`npm install ${binaryPackage}@${version}\`).`);
  }
  try {
    return require(dirname(manifest));
  } catch (error) {
    throw new Error(`vfio-user: the native addon in ${binaryPackage} (for ${platform}) failed to load: ${firstLine(error)}`, { cause: error });
  }
}

export const native = load();

export type NativeConnection = NativeBinding.NativeConnection;
export type NativeMapping = NativeBinding.NativeMapping;
export type NativeDmaTable = NativeBinding.NativeDmaTable;
export type DmaChange = NativeBinding.DmaChange;
export type NativeDoorbellWatcher = NativeBinding.NativeDoorbellWatcher;
export type NativeBlockDevice = NativeBinding.NativeBlockDevice;
export type NativeRegionReads = NativeBinding.NativeRegionReads;
export type PeerCredentials = NativeBinding.PeerCredentials;

/**
 * Says a failure the native layer reports by errno (a connection's
 * `onClose`, the `code` of what `send` throws): `ECONNRESET (connection
 * reset by peer)`, with `reason` in place of the system's words when given.
 */
export function describeFailure(errno: number | undefined, reason?: string): string {
  if (errno === undefined) return reason || 'an unknown failure';
  const [name, text] = getSystemErrorMap().get(-errno) ?? [`errno ${errno}`, 'unknown error'];
  return `${name} (${reason || text})`;
}

/** The errno a native call threw with as its `code` (NativeConnection.send); undefined for others. */
export function errnoOf(error: unknown): number | undefined {
  const code = (error as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' && /^\d+$/.test(code) ? Number(code) : undefined;
}

/** Closes every fd in `fds`, ignoring ones already closed. */
export function closeFds(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      native.closeFd(fd);
    } catch {
      // already closed: nothing leaks
    }
  }
}

/**
 * A new memfd of `size` bytes and a read-write mapping of it (the caller owns
 * both). `sealSize` fixes the size for good, as QEMU seals guest RAM, so no
 * mapping of it can ever fault.
 */
export function mapNewMemfd(name: string, size: number, sealSize: boolean): { fd: number; mapping: NativeMapping } {
  const fd = native.memfdCreate(name, BigInt(size), sealSize);
  try {
    return { fd, mapping: new native.NativeMapping(fd, 0n, BigInt(size), true, true) };
  } catch (error) {
    native.closeFd(fd);
    throw error;
  }
}
