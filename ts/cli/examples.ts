/**
 * The example devices shipped in the package, so `vfio-user serve --example
 * gpio` works after `npm install` without a clone. They sit in `examples/`
 * beside `ts/`: TS sources in a clone, compiled JS under `dist/` once built.
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { UsageError } from '../errors.js';

const EXAMPLES = join(__dirname, '..', '..', 'examples');

/** Scripts in examples/ that are not device modules. */
const NOT_DEVICES = new Set(['demo']);

export interface Example {
  name: string;
  /** The module to load: a file, or a folder's index module. */
  path: string;
  /** The module's leading doc comment up to its first full stop or colon. */
  summary: string;
}

const MODULE = /^(.+)\.(ts|js)$/;

function moduleOf(entry: string): { name: string; path: string } | undefined {
  const path = join(EXAMPLES, entry);
  if (statSync(path).isDirectory()) {
    const index = ['index.ts', 'index.js'].map((name) => join(path, name)).find((candidate) => existsSync(candidate));
    return index === undefined ? undefined : { name: entry, path: index };
  }
  const match = MODULE.exec(entry);
  return match && !entry.endsWith('.d.ts') ? { name: match[1], path } : undefined;
}

function summaryOf(path: string): string {
  const comment = /\/\*\*([\s\S]*?)\*\//.exec(readFileSync(path, 'utf8'))?.[1] ?? '';
  const text = comment.replace(/^\s*\*\s?/gm, '').replace(/\s+/g, ' ').trim();
  return /^(.*?)[.:](?=\s|$)/.exec(text)?.[1] ?? text;
}

export function listExamples(): Example[] {
  if (!existsSync(EXAMPLES)) return [];
  return readdirSync(EXAMPLES)
    .sort()
    .map(moduleOf)
    .filter((found): found is { name: string; path: string } => found !== undefined && !NOT_DEVICES.has(found.name))
    .map((found) => ({ ...found, summary: summaryOf(found.path) }));
}

/** The module of the example called `name`; a UsageError lists the names there are. */
export function examplePath(name: string): string {
  const examples = listExamples();
  const found = examples.find((example) => example.name === name);
  if (found === undefined) {
    throw new UsageError(`no example called ${name}; the examples are: ${examples.map((example) => example.name).join(', ')}`);
  }
  return found.path;
}
