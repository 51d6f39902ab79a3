/**
 * Global setup of `npm run test:interop` (vitest.interop.config.mts): every
 * interop file runs there with its peer, so a peer that is not named, or not
 * where its variable says, fails the run instead of skipping its tests as
 * `npm test` does (docs/interop.md says how to build them).
 */
import { existsSync } from 'node:fs';

const PEERS: Record<string, string> = {
  VFIO_USER_LIBVFIO_USER: 'a libvfio-user meson build folder (samples/ inside)',
  VFIO_USER_LIBVFIO_USER_16K: "a libvfio-user build whose samples/server.c has a 16 KiB BAR1",
  VFIO_USER_QEMU: 'a qemu-system-x86_64 10.1+ with vfio-user-pci',
  VFIO_USER_GUEST: "the guest kit's output folder (shared/guest/mkguest.sh DIR)",
};

export default function setup(): void {
  const missing = Object.entries(PEERS).filter(([name]) => !process.env[name] || !existsSync(process.env[name]!));
  if (missing.length > 0) {
    const lines = missing.map(([name, what]) => `  ${name}: ${what}${process.env[name] ? ` (${process.env[name]} does not exist)` : ''}`);
    throw new Error(`interop tests need every peer; missing:\n${lines.join('\n')}`);
  }
}
