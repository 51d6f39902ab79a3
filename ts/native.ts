/**
 * The native addon, loaded from the package root whether this file runs from
 * `ts/` (tests) or `dist/ts/` (the built package).
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';

type Binding = typeof import('../native/index.js');

function packageRoot(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    const manifest = join(dir, 'package.json');
    if (existsSync(manifest) && JSON.parse(readFileSync(manifest, 'utf8')).name === 'vfio-user') return dir;
    if (dirname(dir) === dir) throw new Error(`vfio-user: cannot find the package root above ${from}`);
  }
}

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const native: Binding = require(join(packageRoot(__dirname), 'native', 'index.js'));

export type NativeConnection = InstanceType<Binding['NativeConnection']>;
export type NativeMapping = InstanceType<Binding['NativeMapping']>;
export type NativeRegionReads = InstanceType<Binding['NativeRegionReads']>;

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
