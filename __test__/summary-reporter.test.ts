/** The summary line CI reads counts every way a run fails, not only failed tests. */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { expect, test } from 'vitest';

test('a file that fails to load, a failing hook and an unhandled error are failures in the summary line', () => {
  const root = join(__dirname, '..');
  const run = spawnSync(process.execPath, [join(root, 'node_modules/vitest/vitest.mjs'), 'run', '--config', join(__dirname, 'fixtures/reporter/vitest.config.mts')], {
    cwd: root,
    encoding: 'utf8',
    timeout: 60_000,
  });
  expect(run.status).toBe(1);
  const lines = run.stdout.trim().split('\n');
  // One failed test, a file that does not load, a beforeAll that throws, one unhandled rejection.
  expect(lines.at(-1)).toBe('vitest: 2 passed, 4 failed (2 outside tests, 1 unhandled), 1 skipped');
});
