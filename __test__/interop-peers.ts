/**
 * The real peers the interop files drive, each named by an environment
 * variable (docs/interop.md says how scripts/peers builds them). `npm test`
 * skips a test whose peer is not named and its summary says which
 * (summary-reporter.ts); `npm run test:interop` (vitest.interop.config.mts)
 * runs this file's setup first, so there a peer that is not named, or not
 * where its variable says, fails the run instead.
 */
import { existsSync } from 'node:fs';

export const REAL_PEERS: Readonly<Record<string, string>> = {
  VFIO_USER_LIBVFIO_USER: 'a libvfio-user build folder (scripts/peers/build-libvfio-user.sh SRC OUT)',
  VFIO_USER_LIBVFIO_USER_16K: 'a libvfio-user build with a 16 KiB BAR1 (scripts/peers/build-libvfio-user.sh SRC OUT --bar1-16k)',
  VFIO_USER_QEMU: 'OUT/qemu-system-x86_64 of scripts/peers/build-qemu.sh SRC OUT --multiprocess',
  VFIO_USER_GUEST: 'the guest kit (scripts/peers/mkguest.sh OUT)',
  VFIO_USER_SPDK: 'an SPDK build (scripts/peers/build-spdk.sh SRC OUT), with 2 MiB hugepages reserved',
};

export default function setup(): void {
  const missing = Object.entries(REAL_PEERS).filter(([name]) => !process.env[name] || !existsSync(process.env[name]!));
  if (missing.length > 0) {
    const lines = missing.map(([name, what]) => `  ${name}: ${what}${process.env[name] ? ` (${process.env[name]} does not exist)` : ''}`);
    throw new Error(`interop tests need every peer; missing:\n${lines.join('\n')}`);
  }
}
