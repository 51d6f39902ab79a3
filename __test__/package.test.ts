/**
 * What `npm install vfio-user` gives a user. `npm run pack:local`'s tarballs
 * (the main package, its manifest pinned to the platform packages and without
 * the repository's scripts, and the linux-x64-gnu platform package holding the
 * addon `npm ci` built) are installed, offline from npm's cache and with no
 * warning from npm, into a fresh project whose PATH has no cargo, rustc or C
 * compiler. From there the package is required, imported, served (a shipped
 * example without tsx, a TS device with it) and read with its own command,
 * and a small TS device is type-checked on TypeScript 5 and 6 with the
 * project's strict settings and no skipLibCheck.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import ts from 'typescript';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { connect, Errno, Region } from '../ts/index.js';
import { until } from './helpers.js';

const repo = join(__dirname, '..');
const PLATFORM = 'linux-x64-gnu';
const ADDON = join(repo, 'native', `vfio-user.${PLATFORM}.node`);

interface LockEntry {
  version?: string;
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

/** Runs `body` with tsx uninstalled from the fresh project (it is an optional peer dependency). */
async function withoutTsx<T>(body: () => Promise<T>): Promise<T> {
  const installed = join(app, 'node_modules', 'tsx');
  renameSync(installed, `${installed}.away`);
  try {
    return await body();
  } finally {
    renameSync(`${installed}.away`, installed);
  }
}

/** `npx vfio-user serve ARGS` in its own process group (npx does not pass SIGTERM on); resolves once it serves. */
async function served(args: string[]): Promise<{ server: ChildProcess; stderr: () => string; stop(): Promise<void> }> {
  const server = spawn('npx', ['vfio-user', 'serve', ...args], { cwd: app, env, detached: true, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  server.stderr!.on('data', (chunk) => (stderr += chunk));
  const exited = new Promise<number | null>((r) => server.on('exit', r));
  await until(() => stderr.includes('serving') || server.exitCode !== null, 30_000);
  return {
    server,
    stderr: () => stderr,
    async stop() {
      try {
        process.kill(-server.pid!, 'SIGTERM');
        await exited;
      } finally {
        try {
          process.kill(-server.pid!, 'SIGKILL');
        } catch {
          // the whole group has exited
        }
      }
    },
  };
}

let installLog: string;

/** tsconfig.json options about the repo's build output and layout, not about checking. */
const REPO_ONLY_OPTIONS = new Set([
  'outDir', 'rootDir', 'declaration', 'declarationMap', 'sourceMap', 'inlineSourceMap', 'inlineSources', 'sourceRoot', 'mapRoot', 'paths', 'types',
]);

describe.skipIf(!existsSync(ADDON))(`the packed package installed without Rust (needs ${ADDON} from npm ci)`, () => {
  beforeAll(() => {
    work = mkdtempSync(join(tmpdir(), 'vfu-pack-'));
    // What `npm run pack:local` does, into the scratch folder.
    const manifest = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')) as { version: string };
    const packed = execFileSync(process.execPath, [join(repo, 'scripts', 'pack.mjs'), '--out', join(work, 'packages')], { encoding: 'utf8' });
    const main = join(work, 'packages', `vfio-user-${manifest.version}.tgz`);
    const binary = join(work, 'packages', `vfio-user-${PLATFORM}-${manifest.version}.tgz`);
    expect(packed.trim().split('\n')).toEqual([main, binary]);

    app = join(work, 'app');
    mkdirSync(app);
    env = { HOME: process.env.HOME ?? tmpdir(), PATH: barePath(join(work, 'bin')) };
    if (process.env.npm_config_cache) env.npm_config_cache = process.env.npm_config_cache;
    /** `npm install` of `dependencies` from the repo's lockfile entries, offline; npm's output. */
    const install = (dependencies: Record<string, string>, tools: string[]): string => {
      writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true, dependencies }));
      writeFileSync(join(app, 'package-lock.json'), JSON.stringify({ name: 'app', lockfileVersion: 3, requires: true, packages: lockedClosure(tools) }));
      const npm = spawnSync('npm', ['install', '--offline', '--no-audit', '--no-fund'], { cwd: app, env, encoding: 'utf8' });
      const log = `${npm.stdout}${npm.stderr}`;
      expect(npm.status, log).toBe(0);
      return log;
    };
    // The package as `npm install vfio-user` brings it (npm adds @types/node, a peer)...
    const dependencies = { 'vfio-user': `file:${main}`, [`vfio-user-${PLATFORM}`]: `file:${binary}` };
    installLog = install(dependencies, ['@types/node']);
    // ...then tsx, which a TypeScript user adds to serve .ts devices (an optional peer: npm
    // leaves it out, and esbuild's install script warns about itself, not about vfio-user).
    const { version: tsx } = JSON.parse(readFileSync(join(repo, 'node_modules', 'tsx', 'package.json'), 'utf8')) as { version: string };
    install({ ...dependencies, tsx }, ['@types/node', 'tsx']);
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

  test('npm installs the tarballs without a warning, and the installed manifest has no scripts', () => {
    expect(installLog).toMatch(/added \d+ packages/);
    expect(installLog).not.toMatch(/warn/i);
    const installed = JSON.parse(readFileSync(join(app, 'node_modules', 'vfio-user', 'package.json'), 'utf8'));
    expect(installed.scripts).toBeUndefined();
    expect(installed.dependencies).toBeUndefined();
    expect(installed.peerDependenciesMeta).toEqual({ tsx: { optional: true } });
  });

  test('the codec is the vfio-user/protocol subpath, not part of the root', () => {
    const script = `
      const root = require('vfio-user');
      const protocol = require('vfio-user/protocol');
      console.log(JSON.stringify({
        codec: typeof protocol.encodeMessage, header: typeof protocol.decodeHeader,
        root: ['protocol', 'ServerSession', 'ConfigSpace', 'Interrupts', 'encodeMessage', 'isKnownCommand', 'KvmIoregionFlags'].filter((name) => name in root),
      }));`;
    expect(JSON.parse(inApp('node', ['-e', script]))).toEqual({ codec: 'function', header: 'function', root: [] });
  });

  test('the examples ship as TypeScript sources beside the compiled ones', () => {
    const pkg = join(app, 'node_modules', 'vfio-user');
    for (const example of ['gpio', 'msix-device', 'nvme-doorbell', 'demo']) {
      expect(existsSync(join(pkg, 'examples', `${example}.ts`)), example).toBe(true);
      expect(existsSync(join(pkg, 'dist', 'examples', `${example}.js`)), example).toBe(true);
    }
    expect(existsSync(join(pkg, 'examples', 'nvme', 'index.ts'))).toBe(true);
  });

  test('without tsx: npx vfio-user serves a shipped example, lspci reads it; a .ts device says it needs tsx', async () => {
    await withoutTsx(async () => {
      const socket = join(work, 'gpio.sock');
      const gpio = await served(['--example', 'gpio', '--socket', socket]);
      try {
        expect(gpio.stderr()).toMatch(/serving .*node_modules\/vfio-user\/dist\/examples\/gpio\.js/);
        const lspci = inApp('npx', ['vfio-user', 'lspci', socket]);
        expect(lspci).toMatch(/494f:0dc8/);
        expect(lspci).toMatch(/Region 2: I\/O ports/);
      } finally {
        await gpio.stop();
      }
      // The server itself stopped: it removed its socket on the way out.
      expect(existsSync(socket)).toBe(false);

      writeFileSync(join(app, 'failing-device.ts'), FAILING_DEVICE);
      const refused = spawnSync('npx', ['vfio-user', 'serve', 'failing-device.ts', '--socket', join(work, 'no.sock')], { cwd: app, env, encoding: 'utf8' });
      expect(refused.status).toBe(1);
      expect(refused.stderr).toMatch(/failing-device\.ts is TypeScript: serving it needs tsx \(npm install --save-dev tsx\)/);
    });
  }, 60_000);

  test('with tsx a TS device serves, and the stack of its error names only files the package ships', async () => {
    writeFileSync(join(app, 'failing-device.ts'), FAILING_DEVICE);
    const socket = join(work, 'failing.sock');
    const device = await served(['failing-device.ts', '--socket', socket]);
    try {
      const client = await connect(socket);
      try {
        expect((await client.regionRead(Region.CONFIG, 0n, 4)).readUInt32LE(0)).toBe(0x00041234);
        await expect(client.regionRead(Region.BAR0, 0n, 4)).rejects.toMatchObject({ errno: Errno.EIO });
      } finally {
        client.close();
      }
      await until(() => device.stderr().includes('register 0 is broken'));
    } finally {
      await device.stop();
    }
    const stack = device.stderr();
    expect(stack).toMatch(/failing-device\.ts:\d+/);
    const library = [...stack.matchAll(/(\/[^\s():]*node_modules\/vfio-user\/[^\s():]+):\d+/g)].map((m) => m[1]);
    expect(library.length, stack).toBeGreaterThan(0);
    for (const file of library) expect(existsSync(file), `${file} (in the stack) is not in the package`).toBe(true);
    // Source maps lead from dist/ to the TypeScript the package ships.
    expect(library.some((file) => /node_modules\/vfio-user\/ts\/.*\.ts$/.test(file)), stack).toBe(true);
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

/** A device whose BAR0 read handler throws: `vfio-user serve` logs the error's stack. */
const FAILING_DEVICE = `import { PciDevice } from 'vfio-user';

export default function failingDevice(): PciDevice {
  return new PciDevice({
    vendorId: 0x1234, deviceId: 0x0004, classCode: 0xff0000,
    bars: {
      0: {
        kind: 'memory', size: 4096,
        read: () => {
          throw new Error('register 0 is broken');
        },
      },
    },
  });
}
`;

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
