/**
 * What `npm install vfio-user` gives a user. The main package (with the
 * optionalDependencies a release gives it) and the linux-x64-gnu platform
 * package holding the addon `npm ci` built are packed into tarballs and
 * installed, offline from npm's cache, into a fresh project whose PATH has no
 * cargo, rustc or C compiler. From there the package is required, imported,
 * served and read with its own command, and a small TS device is type-checked
 * on TypeScript 5 and 6 with the project's strict settings and no skipLibCheck.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import ts from 'typescript';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { until } from './helpers.js';

const repo = join(__dirname, '..');
const PLATFORM = 'linux-x64-gnu';
const ADDON = join(repo, 'native', `vfio-user.${PLATFORM}.node`);

interface LockEntry {
  dependencies?: Record<string, string>;
  optionalDependencies?: Record<string, string>;
  peerDependencies?: Record<string, string>;
  dev?: boolean;
  devOptional?: boolean;
}

/**
 * The lockfile entries of `names` and everything they depend on, taken from
 * the repo's lockfile: with them npm installs from the tarballs `npm ci` put
 * in its cache and never asks the registry.
 */
function lockedClosure(names: string[]): Record<string, LockEntry> {
  const lock = JSON.parse(readFileSync(join(repo, 'package-lock.json'), 'utf8')) as { packages: Record<string, LockEntry> };
  const entries: Record<string, LockEntry> = {};
  const visit = (name: string) => {
    const key = `node_modules/${name}`;
    if (entries[key] || !lock.packages[key]) return;
    const { dev: _dev, devOptional: _devOptional, ...entry } = lock.packages[key];
    entries[key] = entry;
    for (const deps of [entry.dependencies, entry.optionalDependencies, entry.peerDependencies]) Object.keys(deps ?? {}).forEach(visit);
  };
  names.forEach(visit);
  return entries;
}

/** A bin folder with node, npm, npx and sh and nothing else: no cargo, rustc or cc. */
function barePath(dir: string): string {
  mkdirSync(dir);
  // npm's own scripts name it; otherwise it sits in the node install's lib/node_modules.
  const npmCli = process.env.npm_execpath ? dirname(process.env.npm_execpath) : join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'bin');
  for (const [name, target] of [
    ['node', process.execPath],
    ['npm', join(npmCli, 'npm-cli.js')],
    ['npx', join(npmCli, 'npx-cli.js')],
    ['sh', '/bin/sh'],
  ]) {
    symlinkSync(target, join(dir, name));
  }
  return dir;
}

let work: string;
let app: string;
let env: NodeJS.ProcessEnv;

function inApp(command: string, args: string[]): string {
  return execFileSync(command, args, { cwd: app, env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** `npm pack` of `files` (copied from the repo) in a scratch folder; the tarball's path. */
function pack(name: string, files: Record<string, string>, prepare?: (dir: string) => void): string {
  const dir = join(work, `stage-${name}`);
  for (const [to, from] of Object.entries(files)) cpSync(from, join(dir, to), { recursive: true });
  prepare?.(dir);
  const [{ filename }] = JSON.parse(
    execFileSync('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', work], { cwd: dir, encoding: 'utf8' }),
  ) as { filename: string }[];
  return join(work, filename);
}

/** tsconfig.json options about the repo's build output and layout, not about checking. */
const REPO_ONLY_OPTIONS = new Set([
  'outDir', 'rootDir', 'declaration', 'declarationMap', 'sourceMap', 'inlineSourceMap', 'inlineSources', 'sourceRoot', 'mapRoot', 'paths', 'types',
]);

describe.skipIf(!existsSync(ADDON))(`the packed package installed without Rust (needs ${ADDON} from npm ci)`, () => {
  beforeAll(() => {
    work = mkdtempSync(join(tmpdir(), 'vfu-pack-'));
    const main = pack('main', {
      'package.json': join(repo, 'package.json'),
      'README.md': join(repo, 'README.md'),
      LICENSE: join(repo, 'LICENSE'),
      dist: join(repo, 'dist'),
    }, (dir) => execFileSync(process.execPath, [join(repo, 'scripts', 'pin-platform-packages.mjs'), join(dir, 'package.json')]));
    const binary = pack(PLATFORM, {
      'package.json': join(repo, 'npm', PLATFORM, 'package.json'),
      'README.md': join(repo, 'npm', PLATFORM, 'README.md'),
      [`vfio-user.${PLATFORM}.node`]: ADDON,
    });

    app = join(work, 'app');
    mkdirSync(app);
    const manifest = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')) as {
      dependencies: Record<string, string>;
      peerDependencies: Record<string, string>;
    };
    const dependencies = { 'vfio-user': `file:${main}`, [`vfio-user-${PLATFORM}`]: `file:${binary}` };
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true, dependencies }));
    const packages = lockedClosure([...Object.keys(manifest.dependencies), ...Object.keys(manifest.peerDependencies)]);
    writeFileSync(join(app, 'package-lock.json'), JSON.stringify({ name: 'app', lockfileVersion: 3, requires: true, packages }));
    env = { HOME: process.env.HOME ?? tmpdir(), PATH: barePath(join(work, 'bin')) };
    if (process.env.npm_config_cache) env.npm_config_cache = process.env.npm_config_cache;
    inApp('npm', ['install', '--offline', '--no-audit', '--no-fund']);
  }, 240_000);

  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  test('the fresh project has no cargo, rustc or C compiler on its PATH', () => {
    for (const tool of ['cargo', 'rustc', 'cc', 'gcc']) {
      expect(() => inApp('sh', ['-c', `command -v ${tool}`])).toThrow();
    }
  });

  test('the main package lists every platform package, pinned to its own version', () => {
    const installed = JSON.parse(readFileSync(join(app, 'node_modules', 'vfio-user', 'package.json'), 'utf8'));
    expect(installed.optionalDependencies).toEqual({
      'vfio-user-linux-arm64-gnu': installed.version,
      'vfio-user-linux-arm64-musl': installed.version,
      'vfio-user-linux-x64-gnu': installed.version,
      'vfio-user-linux-x64-musl': installed.version,
    });
  });

  test('require() and import() load it, with the addon from the platform package', () => {
    const script = `
      const cjs = require('vfio-user');
      import('vfio-user').then((esm) => {
        console.log(JSON.stringify({
          cjs: typeof cjs.createServer, esm: typeof esm.createServer, same: esm.PciDevice === cjs.PciDevice,
          native: 'native' in cjs, addon: Object.keys(require.cache).find((file) => file.endsWith('.node')),
        }));
      });`;
    const loaded = JSON.parse(inApp('node', ['-e', script]));
    expect(loaded).toEqual({
      cjs: 'function',
      esm: 'function',
      same: true,
      native: false,
      addon: join(app, 'node_modules', `vfio-user-${PLATFORM}`, `vfio-user.${PLATFORM}.node`),
    });
  });

  test('without the platform package, the error names the platform, the package and what to do', () => {
    const { version } = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')) as { version: string };
    const installed = join(app, 'node_modules', `vfio-user-${PLATFORM}`);
    renameSync(installed, `${installed}.away`);
    try {
      expect(() => inApp('node', ['-e', "require('vfio-user')"])).toThrow(
        new RegExp(`no native addon for ${PLATFORM}: the package vfio-user-${PLATFORM} is not installed.*npm install vfio-user-${PLATFORM}@${version.replaceAll('.', '\\.')}`),
      );
    } finally {
      renameSync(`${installed}.away`, installed);
    }
  });

  test('npx vfio-user serves a shipped example and npx vfio-user lspci reads it', async () => {
    const socket = join(work, 'gpio.sock');
    let server: ChildProcess | undefined;
    try {
      // Its own process group: npx does not pass SIGTERM on to the server it runs.
      server = spawn('npx', ['vfio-user', 'serve', '--example', 'gpio', '--socket', socket], {
        cwd: app,
        env,
        detached: true,
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      server.stderr!.on('data', (chunk) => (stderr += chunk));
      await until(() => stderr.includes('serving') || server!.exitCode !== null, 30_000);
      expect(stderr).toMatch(/serving .*node_modules\/vfio-user\/dist\/examples\/gpio\.js/);
      const lspci = inApp('npx', ['vfio-user', 'lspci', socket]);
      expect(lspci).toMatch(/494f:0dc8/);
      expect(lspci).toMatch(/Region 2: I\/O ports/);
      process.kill(-server.pid!, 'SIGTERM');
      // The server itself stops: it removes its socket on the way out.
      await until(() => !existsSync(socket), 15_000);
    } finally {
      if (server?.pid !== undefined) {
        try {
          process.kill(-server.pid, 'SIGKILL');
        } catch {
          // the whole group has exited
        }
      }
    }
  }, 60_000);

  const typescripts = [
    ['TypeScript 5', join(repo, 'node_modules', 'typescript-5')],
    ['TypeScript 6', join(repo, 'node_modules', 'typescript')],
  ] as const;
  test.each(typescripts)('a TS device type-checks on %s with strict settings and no skipLibCheck', (name, typescript) => {
    const { config } = ts.readConfigFile(join(repo, 'tsconfig.json'), ts.sys.readFile) as { config: { compilerOptions: Record<string, unknown> } };
    // The repo's own checking options without its emit and layout ones;
    // nothing that would hide a broken .d.ts, and no `types`, so TypeScript 6
    // finds Node's types only through the package.
    const checking = Object.entries(config.compilerOptions).filter(([option]) => !REPO_ONLY_OPTIONS.has(option));
    const compilerOptions = { ...Object.fromEntries(checking), noEmit: true, skipLibCheck: false };
    writeFileSync(join(app, 'tsconfig.json'), JSON.stringify({ compilerOptions, include: ['device.ts', 'client.mts'] }));
    writeFileSync(join(app, 'device.ts'), DEVICE);
    writeFileSync(join(app, 'client.mts'), CLIENT);
    const tsc = join(typescript, 'bin', 'tsc');
    expect(inApp('node', [tsc, '--version'])).toMatch(name === 'TypeScript 5' ? /^Version 5\./ : /^Version 6\./);
    let checked: string;
    try {
      checked = inApp('node', [tsc, '-p', 'tsconfig.json', '--listFiles']);
    } catch (error) {
      throw new Error(`tsc failed:\n${(error as { stdout: string }).stdout}`);
    }
    // Node's types came in through the package's own reference to them.
    expect(checked).toMatch(/node_modules\/@types\/node\/index\.d\.ts/);
  }, 120_000);
});

/** A small device as a user writes one (CommonJS). */
const DEVICE = `import { createServer, PciDevice, type VfioUserServer } from 'vfio-user';

/** One 32-bit register in BAR0 that counts the writes to it. */
export class Counter extends PciDevice {
  private writes = 0;

  constructor() {
    super({
      vendorId: 0x1234,
      deviceId: 0x0001,
      classCode: 0xff0000,
      bars: {
        0: {
          kind: 'memory',
          size: 4096,
          read: (offset: number, size: number) => (offset === 0 && size === 4 ? this.writes : 0),
          write: (_offset: number, data: Buffer) => {
            this.writes += data.length > 0 ? 1 : 0;
          },
        },
      },
    });
  }
}

export async function serveCounter(path: string): Promise<VfioUserServer> {
  const server = createServer(new Counter());
  await server.listen(path);
  return server;
}
`;

/** A client in an ES module: named imports from the CommonJS package. */
const CLIENT = `import { connect, Region } from 'vfio-user';

export async function readIds(path: string): Promise<number> {
  const client = await connect(path);
  const ids: Buffer = await client.regionRead(Region.CONFIG, 0n, 4);
  client.close();
  return ids.readUInt32LE(0);
}
`;
