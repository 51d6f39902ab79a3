/**
 * Every ```ts sample in README.md and docs/*.md is type-checked against the
 * built package (as a user's file importing 'vfio-user' would be) and run:
 * ```ts run ones with tsx, ```ts vitest ones as a vitest file, and ```ts device
 * ones (a device module, as `vfio-user serve` takes) loaded as `serve` loads
 * them, served and read by a client. Each is saved as an `.mts` file, an ES
 * module as the docs tell users to save them (top-level await). An HTML comment
 * `<!-- sample prelude: CODE -->` right above a fence puts CODE before the
 * sample (for a fragment that uses names an earlier sample defined).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { connect, createServer, Region } from '../ts/index.js';
import { loadDevice } from '../ts/cli/serve.js';
import { tempSocketPath } from './helpers.js';

const root = join(__dirname, '..');

interface Sample {
  /** `docs/dma.md:42`: where the fence opens. */
  where: string;
  file: string;
  run: 'tsx' | 'vitest' | 'device' | undefined;
  prelude: string;
  code: string;
}

function samplesOf(markdown: string): Sample[] {
  const lines = readFileSync(join(root, markdown), 'utf8').split('\n');
  const samples: Sample[] = [];
  for (let i = 0; i < lines.length; i++) {
    const fence = /^```ts(?:\s+(run|vitest|device))?\s*$/.exec(lines[i]);
    if (!fence) continue;
    const prelude = /^<!-- sample prelude: (.*) -->$/.exec(lines[i - 1] ?? '')?.[1] ?? '';
    const start = i;
    const body: string[] = [];
    for (i++; i < lines.length && lines[i] !== '```'; i++) body.push(lines[i]);
    const run = fence[1] === 'run' ? 'tsx' : (fence[1] as 'vitest' | 'device' | undefined);
    const name = `${markdown.replace(/[/.]/g, '_')}_${start + 1}${run === 'vitest' ? '.test' : ''}.mts`;
    samples.push({ where: `${markdown}:${start + 1}`, file: name, run, prelude, code: body.join('\n') });
  }
  return samples;
}

const markdowns = ['README.md', ...readdirSync(join(root, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)];
const samples = markdowns.flatMap(samplesOf);

// Inside the package, so 'vfio-user' resolves to it by self-reference (its built dist/).
const dir = mkdtempSync(join(root, '.doc-samples-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The sample as an ES module (top-level await, as users write them): its prelude, then its code. */
function write(sample: Sample): string {
  const path = join(dir, sample.file);
  writeFileSync(path, `${sample.prelude}\n${sample.code}\nexport {};\n`);
  return path;
}

/** A config of the samples' own, or vitest would take the project's (which looks in __test__/). */
function vitestConfig(): string {
  const path = join(dir, 'vitest.config.mjs');
  writeFileSync(path, "export default { test: { include: ['*.test.mts'] } };\n");
  return path;
}

describe('code samples in README.md and docs/', () => {
  test('there are samples, and every one of them runs (fenced run, vitest or device)', () => {
    expect(samples.length).toBeGreaterThan(10);
    expect(samples.filter((s) => s.run === 'vitest').length).toBeGreaterThan(0);
    expect(samples.filter((s) => s.run === 'device').length).toBeGreaterThan(0);
    expect(samples.filter((s) => s.run === undefined).map((s) => s.where)).toEqual([]);
  });

  test('every ts sample type-checks against the package with the project\'s strict settings', () => {
    samples.forEach(write);
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify({
      extends: '../tsconfig.json',
      // Samples show a part of a program: what they declare need not be used. No `paths`: the
      // package resolves as a user's project sees it, by its exports (dist/ts/index.d.ts).
      compilerOptions: { noEmit: true, rootDir: '.', noUnusedLocals: false, noUnusedParameters: false, types: ['node'], paths: {} },
      include: ['*.mts'],
    }));
    const tsc = spawnSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', dir], { encoding: 'utf8' });
    // Name each error by its place in the markdown rather than in the temp file (the prelude is line 1).
    const errors = tsc.stdout.replace(/^.*?([^/\s(]+_md_(\d+)(?:\.test)?\.mts)\((\d+),(\d+)\)/gm, (_, file: string, fence: string, line: string) => {
      const sample = samples.find((s) => s.file === file)!;
      return `${sample.where.replace(/:\d+$/, '')}:${Number(fence) + Number(line) - 1}`;
    });
    expect(errors).toBe('');
    expect(tsc.status).toBe(0);
  }, 120_000);

  for (const sample of samples.filter((s) => s.run === 'device')) {
    test(`${sample.where} is a device module vfio-user serve serves`, async () => {
      const device = await loadDevice(write(sample));
      const socket = tempSocketPath();
      const server = createServer(device);
      try {
        await server.listen(socket.path);
        const client = await connect(socket.path);
        try {
          expect((await client.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).not.toBe(0xffff);
          expect((await client.pci.sizeBar(0))?.size).toBeGreaterThan(0n);
        } finally {
          client.close();
        }
      } finally {
        await server.close();
        await device.close?.();
        socket.cleanup();
      }
    });
  }

  for (const sample of samples.filter((s) => s.run === 'tsx' || s.run === 'vitest')) {
    test(`${sample.where} runs to completion`, () => {
      const path = write(sample);
      const command = sample.run === 'tsx'
        ? [join(root, 'node_modules/.bin/tsx'), path]
        : [join(root, 'node_modules/.bin/vitest'), 'run', '--root', dir, '--config', vitestConfig(), '--reporter', 'dot', sample.file];
      const result = spawnSync(command[0], command.slice(1), { encoding: 'utf8', timeout: 60_000, cwd: dir, env: { ...process.env, NO_COLOR: '1' } });
      expect(sample.run === 'tsx' ? result.stderr : '').toBe('');
      expect(result.status, `${result.stdout}\n${result.stderr}`).toBe(0);
    }, 90_000);
  }
});
