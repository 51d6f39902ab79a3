#!/usr/bin/env node
// Before a release: lists every platform package under npm/ in the main
// package's optionalDependencies, pinned to its exact version (what `napi
// prepublish` does, without publishing; `npm version` keeps the versions equal
// through `napi version`). npm then
// installs the one that fits the user's machine. The repo's own package.json
// does not list them, because `npm ci` in a clone cannot resolve packages
// before they are published.
//   node scripts/pin-platform-packages.mjs [MANIFEST]
// MANIFEST defaults to this repo's package.json; the packaging test points it
// at a staged copy.
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = join(dirname(fileURLToPath(import.meta.url)), '..');
const manifestPath = process.argv[2] ?? join(repo, 'package.json');
const readJson = (path) => JSON.parse(readFileSync(path, 'utf8'));
const writeJson = (path, value) => writeFileSync(path, `${JSON.stringify(value, null, 2)}\n`);

const main = readJson(manifestPath);
const optionalDependencies = {};
for (const dir of readdirSync(join(repo, 'npm')).sort()) {
  const path = join(repo, 'npm', dir, 'package.json');
  const platform = readJson(path);
  if (platform.name !== `${main.name}-${dir}`) throw new Error(`${path}: expected the name ${main.name}-${dir}`);
  if (platform.version !== main.version) throw new Error(`${path}: version ${platform.version}, but ${main.name} is ${main.version} (run \`npx napi version\`)`);
  optionalDependencies[platform.name] = main.version;
}
writeJson(manifestPath, { ...main, optionalDependencies });
console.log(`${main.name}@${main.version}: ${Object.keys(optionalDependencies).join(', ')}`);
