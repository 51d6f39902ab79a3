/**
 * The release builds of the addon (`npm run build:all`, one per platform
 * package under npm/): each is an ELF shared object for its machine, linked
 * against its libc, and the gnu ones need no glibc newer than 2.17. The arm64
 * gnu one is then run under user-mode emulation: loaded by an arm64 Node,
 * serving the GPIO example, its config space read from this machine.
 * `npm run test:platforms` builds them and runs this file; CI builds none, so
 * there every case reports skipped.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { connect, Region } from '../ts/index.js';
import { until } from './helpers.js';

const repo = join(__dirname, '..');
const artifact = (platform: string) => join(repo, 'npm', platform, `vfio-user.${platform}.node`);

const PLATFORMS = [
  { platform: 'linux-x64-gnu', machine: 'Advanced Micro Devices X86-64', libc: 'gnu' },
  { platform: 'linux-arm64-gnu', machine: 'AArch64', libc: 'gnu' },
  { platform: 'linux-x64-musl', machine: 'Advanced Micro Devices X86-64', libc: 'musl' },
  { platform: 'linux-arm64-musl', machine: 'AArch64', libc: 'musl' },
] as const;

const readelf = (...args: string[]) => execFileSync('readelf', ['--wide', ...args], { encoding: 'utf8' });

/** 2.3.4 → 2003004 and 2.17 → 2017000, so versions compare as numbers. */
const versionKey = (version: string) => [0, 1, 2].reduce((key, i) => key * 1000 + Number(version.split('.')[i] ?? 0), 0);

describe.each(PLATFORMS)('the $platform addon', ({ platform, machine, libc }) => {
  const file = artifact(platform);

  test.skipIf(!existsSync(file))(`is a shared object for ${machine} linked against ${libc} libc (built by npm run build:all)`, () => {
    const header = readelf('--file-header', file);
    expect(header).toMatch(/Type:\s+DYN/);
    expect(header).toMatch(new RegExp(`Machine:\\s+${machine}`));
    // A library has no interpreter: the libc shows in what it needs.
    expect(readelf('--program-headers', file)).not.toMatch(/INTERP/);
    const needed = [...readelf('--dynamic', file).matchAll(/\(NEEDED\)\s+Shared library: \[(.+)\]/g)].map((match) => match[1]);
    const glibcVersions = [...new Set(readelf('--version-info', file).match(/GLIBC_[0-9.]+/g) ?? [])].map((name) => name.slice('GLIBC_'.length));
    if (libc === 'gnu') {
      expect(needed).toContain('libc.so.6');
      const highest = glibcVersions.sort((a, b) => versionKey(a) - versionKey(b)).at(-1)!;
      console.log(`${platform}: highest GLIBC_ symbol version ${highest}; needs ${needed.join(', ')}`);
      expect(versionKey(highest)).toBeLessThanOrEqual(versionKey('2.17'));
    } else {
      // musl's loader answers for libc.so itself; nothing may ask for glibc.
      expect(needed).toEqual(['libc.so']);
      expect(glibcVersions).toEqual([]);
      console.log(`${platform}: needs ${needed.join(', ')}, no GLIBC_ symbol versions`);
    }
  });
});

/**
 * An arm64 Node: Debian's nodejs:arm64 unpacked into a folder (see
 * scripts/arm64-node.sh), run by qemu-aarch64-static with that folder as its
 * root for libraries.
 */
const ARM64_ROOT = process.env.VFIO_USER_ARM64_ROOT;

describe.skipIf(!ARM64_ROOT || !existsSync(artifact('linux-arm64-gnu')))('the arm64 gnu addon under qemu-user (needs VFIO_USER_ARM64_ROOT and npm run build:all)', () => {
  test('an arm64 Node loads it from its platform package and serves the GPIO example', async () => {
    // The platform package where the loader looks for it: on the module path.
    const scratch = mkdtempSync(join(tmpdir(), 'vfu-arm64-'));
    cpSync(join(repo, 'npm', 'linux-arm64-gnu'), join(scratch, 'node_modules', 'vfio-user-linux-arm64-gnu'), { recursive: true });
    const socket = join(scratch, 'gpio.sock');
    const serve = `
      const { createServer } = require(${JSON.stringify(join(repo, 'dist', 'ts', 'index.js'))});
      const { PciIdio16 } = require(${JSON.stringify(join(repo, 'dist', 'examples', 'gpio.js'))});
      const addon = Object.keys(require.cache).find((file) => file.endsWith('.node'));
      createServer(new PciIdio16()).listen(${JSON.stringify(socket)}).then(() => console.log(process.arch, addon));`;
    let server: ChildProcess | undefined;
    try {
      server = spawn('qemu-aarch64-static', ['-L', ARM64_ROOT!, join(ARM64_ROOT!, 'usr', 'bin', 'node'), '-e', serve], {
        env: { ...process.env, NODE_PATH: join(scratch, 'node_modules') },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let output = '';
      server.stdout!.on('data', (chunk) => (output += chunk));
      server.stderr!.on('data', (chunk) => (output += chunk));
      await until(() => output.includes('\n') || server!.exitCode !== null, 300_000);
      expect(output.trim()).toBe(`arm64 ${join(scratch, 'node_modules', 'vfio-user-linux-arm64-gnu', 'vfio-user.linux-arm64-gnu.node')}`);
      const client = await connect(socket);
      const config = await client.regionRead(Region.CONFIG, 0n, 64);
      client.close();
      expect(config.readUInt32LE(0)).toBe(0x0dc8494f);
      expect(config.readUInt32LE(0x2c)).toBe(0x0dc8494f);
    } finally {
      server?.kill('SIGKILL');
      rmSync(scratch, { recursive: true, force: true });
    }
  }, 400_000);
});
