#!/usr/bin/env node
// `npm run build:all`: the release build of the native addon for every
// platform package, each into its folder under npm/. The gnu builds link with
// napi-rs's cross toolchain (gcc and a glibc 2.17 sysroot, from the npm
// registry), so they load on any glibc from 2.17 on; the musl builds link with
// zig through cargo-zigbuild. Before building anything it sets up what the
// requested platforms lack: rustup targets, zig and cargo-zigbuild (from PyPI,
// in a virtual environment of its own under target/), the cross toolchains;
// what it cannot set up itself stops it at once, naming the command to run.
// The release workflow runs it the same way, one platform per job.
//   node scripts/build-all.mjs [PLATFORM...]   (default: all four)
import { execFileSync, spawnSync } from 'node:child_process';
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

const run = (command, args, cwd = repo, env = process.env) => execFileSync(command, args, { cwd, env, stdio: 'inherit' });

/** Stops the build before it starts, saying what to run. */
function missing(what, command) {
  console.error(`build:all: ${what}. Run:\n  ${command}\nthen \`npm run build:all\` again.`);
  process.exit(1);
}

/** Whether `command` runs at all (found on PATH and starts). */
const runs = (command, args = ['--version']) => spawnSync(command, args, { stdio: 'ignore' }).status === 0;

/** The rust standard library of every target, added with rustup. */
function ensureRustTargets(triples) {
  if (!runs('cargo')) missing('cargo is not on PATH', "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh");
  if (!runs('rustup')) missing(`rustup is not on PATH, and the targets ${triples.join(', ')} need it`, "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh");
  const installed = execFileSync('rustup', ['target', 'list', '--installed'], { encoding: 'utf8' }).split('\n');
  const absent = triples.filter((triple) => !installed.includes(triple));
  if (absent.length > 0) run('rustup', ['target', 'add', ...absent]);
}

/** A virtual environment under target/ with zig and cargo-zigbuild from PyPI; returns its bin folder. */
function ensureZig() {
  const venv = join(repo, 'target', 'zig-venv');
  const bin = join(venv, 'bin');
  if (existsSync(join(bin, 'cargo-zigbuild'))) return bin;
  if (!runs('python3')) missing('python3 is needed to install zig and cargo-zigbuild from PyPI', 'sudo apt-get install python3 python3-venv');
  if (!existsSync(join(bin, 'pip')) && spawnSync('python3', ['-m', 'venv', venv], { stdio: 'inherit' }).status !== 0) {
    rmSync(venv, { recursive: true, force: true });
    missing('python3 cannot make a virtual environment', 'sudo apt-get install python3-venv');
  }
  run(join(bin, 'pip'), ['install', '--disable-pip-version-check', 'ziglang', 'cargo-zigbuild']);
  return bin;
}

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
  if (!TARGETS[platform]) {
    console.error(`build:all: no platform ${platform} (there are: ${Object.keys(TARGETS).join(', ')})`);
    process.exit(2);
  }
}
// Everything the builds need, before the first one starts.
const targets = platforms.map((platform) => TARGETS[platform]);
ensureRustTargets(targets.map((target) => target.triple));
for (const target of targets) if (target.toolchain === 'napi-cross') ensureCrossToolchain(target.triple);
// cargo-zigbuild runs zig as `python3 -m ziglang` when no `zig` is on PATH: the environment's python3 comes first.
const zigPath = targets.some((target) => target.toolchain === 'zig') ? `${ensureZig()}:${process.env.PATH}` : process.env.PATH;

for (const platform of platforms) {
  const target = TARGETS[platform];
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
  ], repo, { ...process.env, PATH: zigPath });
  console.log(`built ${join(outDir, `vfio-user.${platform}.node`)}`);
}
