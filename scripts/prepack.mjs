#!/usr/bin/env node
// `npm pack` / `npm publish` run straight in the repository or in a folder
// under npm/ would make a tarball users cannot install (the repository's
// manifest without its platform packages, a platform package without its
// addon): this stops them, naming what does it right. scripts/pack.mjs packs
// staged copies with --ignore-scripts, so it is not stopped.
import { existsSync, readFileSync } from 'node:fs';

const manifest = JSON.parse(readFileSync('package.json', 'utf8'));
if (manifest.napi) {
  console.error('npm pack here would ship the repository manifest (no platform packages, a `prepare` that needs Rust):');
  console.error('run `npm run pack:local` (this machine) or `node scripts/pack.mjs --all` (after `npm run build:all`).');
  process.exit(1);
}
const missing = manifest.files.filter((file) => !existsSync(file));
if (missing.length > 0) {
  const platform = manifest.name.replace(/^vfio-user-/, '');
  console.error(`${manifest.name} has no ${missing.join(', ')}: build it with \`npm run build:all -- ${platform}\`,`);
  console.error('or pack this machine\'s package with `npm run pack:local` from the repository root.');
  process.exit(1);
}
