#!/usr/bin/env node
// Packs what a user installs: the main package and platform packages, as
// tarballs in one folder.
//   node scripts/pack.mjs [--out DIR] [--all | PLATFORM...]
// `npm run pack:local` (no PLATFORM): this machine's platform package, its
// addon the one `npm ci` built into native/, into packages/. The release
// workflow passes --all once `npm run build:all` has filled every npm/*/.
//
// The main package's manifest is rewritten for consumers: optionalDependencies
// pin every platform package to the version (npm installs the one that fits
// the machine; the repository's own manifest cannot list them, as `npm ci` in
// a clone cannot resolve unpublished packages), and the repository's scripts
// are left out (its `prepare` builds the addon from Rust). A platform package
// whose addon is missing stops the packing instead of shipping a tarball with
// nothing to load.
import { execFileSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const repo = join(dirname(fileURLToPath(import.meta.url)), '..');
const readJson = (path) => JSON.parse(readFileSync(path, 'utf8'));
const writeJson = (path, value) => writeFileSync(path, `${JSON.stringify(value, null, 2)}\n`);
const fail = (message) => {
  console.error(`pack: ${message}`);
  process.exit(1);
};

const { values, positionals } = parseArgs({ options: { out: { type: 'string' }, all: { type: 'boolean' } }, allowPositionals: true });
const out = resolve(values.out ?? join(repo, 'packages'));

/** The platform package this machine loads (ts/native.ts picks it the same way). */
function hostPlatform() {
  const libc = process.report.getReport().header.glibcVersionRuntime ? 'gnu' : 'musl';
  return `${process.platform}-${process.arch}-${libc}`;
}

const main = readJson(join(repo, 'package.json'));
const platforms = readdirSync(join(repo, 'npm')).sort();
for (const dir of platforms) {
  const path = join(repo, 'npm', dir, 'package.json');
  const platform = readJson(path);
  if (platform.name !== `${main.name}-${dir}`) fail(`${path}: expected the name ${main.name}-${dir}`);
  if (platform.version !== main.version) fail(`${path}: version ${platform.version}, but ${main.name} is ${main.version} (run \`npx napi version\`)`);
}
const wanted = values.all ? platforms : positionals.length > 0 ? positionals : [hostPlatform()];
for (const platform of wanted) {
  if (!platforms.includes(platform)) fail(`no platform package ${platform} (there are: ${platforms.join(', ')})`);
}
if (!existsSync(join(repo, 'dist', 'ts', 'index.js'))) fail('dist/ is not built: run `npm ci` (or `npm run build`) first');

/** `npm pack` of a staged folder into `out`; the tarball's path. */
function pack(stage) {
  const [{ filename }] = JSON.parse(execFileSync('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', out], { cwd: stage, encoding: 'utf8' }));
  return join(out, filename);
}

const { scripts: _scripts, ...manifest } = main;
const optionalDependencies = Object.fromEntries(platforms.map((dir) => [`${main.name}-${dir}`, main.version]));
mkdirSync(out, { recursive: true });
const scratch = mkdtempSync(join(tmpdir(), 'vfio-user-pack-'));
const tarballs = [];
try {
  // The main package: the files its `files` field selects, as npm itself lists them.
  const stage = join(scratch, 'main');
  const [{ files }] = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: repo, encoding: 'utf8' }));
  for (const { path } of files) {
    mkdirSync(dirname(join(stage, path)), { recursive: true });
    copyFileSync(join(repo, path), join(stage, path));
  }
  writeJson(join(stage, 'package.json'), { ...manifest, optionalDependencies });
  tarballs.push(pack(stage));

  for (const platform of wanted) {
    const folder = join(repo, 'npm', platform);
    const addon = `${main.napi.binaryName}.${platform}.node`;
    // A release build (build:all) in the package's folder, else this machine's build from npm ci.
    const built = [join(folder, addon), ...(platform === hostPlatform() ? [join(repo, 'native', addon)] : [])].find(existsSync);
    if (built === undefined) {
      fail(`no ${addon} for ${platform}: build it with \`npm run build:all -- ${platform}\`${platform === hostPlatform() ? ' (or `npm run build:native` for this machine)' : ''}`);
    }
    const platformStage = join(scratch, platform);
    mkdirSync(platformStage);
    const { scripts: _platformScripts, ...platformManifest } = readJson(join(folder, 'package.json'));
    writeJson(join(platformStage, 'package.json'), platformManifest);
    cpSync(join(folder, 'README.md'), join(platformStage, 'README.md'));
    copyFileSync(built, join(platformStage, addon));
    tarballs.push(pack(platformStage));
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
for (const tarball of tarballs) console.log(tarball);
