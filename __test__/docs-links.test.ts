/**
 * The docs lean only on files a clone has: every relative link in README.md
 * and docs/ resolves, every `scripts/peers/...` they name exists, and no doc
 * or test points outside the repository at the team's ../shared folder.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, expect, test } from 'vitest';

const root = join(__dirname, '..');
const markdowns = ['README.md', ...readdirSync(join(root, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)];

describe.each(markdowns)('%s', (file) => {
  const text = readFileSync(join(root, file), 'utf8');

  test('relative links resolve to files in the repository', () => {
    const targets = [...text.matchAll(/\]\(([^)\s#]+)(?:#[^)]*)?\)/g)].map((m) => m[1]).filter((t) => !/^[a-z]+:/.test(t));
    expect(targets.filter((t) => !existsSync(join(root, dirname(file), t)))).toEqual([]);
  });

  test('the peer scripts it names exist', () => {
    const scripts = [...text.matchAll(/scripts\/peers\/[\w.-]+/g)].map((m) => m[0]);
    expect(scripts.filter((s) => !existsSync(join(root, s)))).toEqual([]);
  });
});

test('no doc, test or script points at the ../shared folder outside the repository', () => {
  const files = [
    ...markdowns,
    ...readdirSync(join(root, '__test__'), { recursive: true, encoding: 'utf8' }).map((f) => `__test__/${f}`),
    ...readdirSync(join(root, 'scripts'), { recursive: true, encoding: 'utf8' }).map((f) => `scripts/${f}`),
  ].filter((f) => f !== '__test__/docs-links.test.ts' && /\.(md|ts|mts|mjs|sh)$|guest-init$/.test(f));
  const pattern = /(?:\.\.\/|\b)shared\/(?:guest|vfio-user-protocol\.md|architecture\.md|peers\.md)/;
  expect(files.filter((f) => pattern.test(readFileSync(join(root, f), 'utf8')))).toEqual([]);
});
