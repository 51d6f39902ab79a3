#!/usr/bin/env node
// `npm run build:all`: the release build of the native addon for every
// platform package, each into its folder under npm/. The gnu builds link with
// napi-rs's cross toolchain (gcc and a glibc 2.17 sysroot, from the npm
// registry), so they load on any glibc from 2.17 on; the musl builds link with
// zig (`pip install ziglang cargo-zigbuild`). Needs
// `rustup target add aarch64-unknown-linux-gnu x86_64-unknown-linux-musl aarch64-unknown-linux-musl`.
//   node scripts/build-all.mjs [PLATFORM...]   (default: all four)
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { homedir, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = join(dirname(fileURLToPath(import.meta.url)), '..');
const TARGETS = {
  'linux-x64-gnu': { triple: 'x86_64-unknown-linux-gnu', toolchain: 'napi-cross' },
  'linux-arm64-gnu': { triple: 'aarch64-unknown-linux-gnu', toolchain: 'napi-cross' },
  'linux-x64-musl': { triple: 'x86_64-unknown-linux-musl', toolchain: 'zig' },
  'linux-arm64-musl': { triple: 'aarch64-unknown-linux-musl', toolchain: 'zig' },
};

const run = (command, args, cwd = repo) => execFileSync(command, args, { cwd, stdio: 'inherit' });

/**
 * `napi build --use-napi-cross` unpacks the toolchain itself with
 * @napi-rs/lzma, whose binding needs Node 22 or later; on older Node (and
 * when the registry lacks the toolchain of the exact version napi asks for)
 * this puts the newest published one where napi looks for it, unpacked by tar.
 */
function ensureCrossToolchain(triple) {
  const { version } = createRequire(join(repo, 'package.json'))('@napi-rs/cross-toolchain/package.json');
  const dest = join(homedir(), '.napi-rs', 'cross-toolchain', version, triple);
  if (existsSync(join(dest, 'package.json'))) return;
  const arch = triple.split('-')[0];
  const name = `@napi-rs/cross-toolchain-${process.arch}-target-${arch}`;
  const scratch = mkdtempSync(join(tmpdir(), 'napi-cross-'));
  try {
    run('npm', ['pack', name, '--silent'], scratch);
    const tarball = readdirSync(scratch).find((file) => file.endsWith('.tgz'));
    run('tar', ['-xzf', tarball], scratch);
    mkdirSync(dest, { recursive: true });
    run('tar', ['-xJf', join(scratch, 'package', `${triple}.tar.xz`), '-C', dest]);
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

const platforms = process.argv.length > 2 ? process.argv.slice(2) : Object.keys(TARGETS);
for (const platform of platforms) {
  const target = TARGETS[platform];
  if (!target) throw new Error(`unknown platform ${platform} (known: ${Object.keys(TARGETS).join(', ')})`);
  if (target.toolchain === 'napi-cross') ensureCrossToolchain(target.triple);
  const outDir = join('npm', platform);
  run('npx', [
    'napi', 'build', '--platform', '--release', '--strip',
    '--manifest-path', 'crates/napi/Cargo.toml',
    '--target', target.triple,
    target.toolchain === 'zig' ? '--cross-compile' : '--use-napi-cross',
    '--output-dir', outDir,
    '--no-js',
    // The declarations are the same for every target: the one ts/ uses.
    '--dts', join('..', '..', 'ts', 'native-binding.ts'),
  ]);
  console.log(`built ${join(outDir, `vfio-user.${platform}.node`)}`);
}
