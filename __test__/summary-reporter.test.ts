/**
 * The summary line CI reads counts every way a run fails, not only failed
 * tests; the line before it names the tests skipped for want of a real peer.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { expect, test } from 'vitest';

test('a file that fails to load, a failing hook and an unhandled error are failures in the summary line; peer skips are named', () => {
  const root = join(__dirname, '..');
  // The guest variable is set (to anything): only the unset one is the reason.
  const env: NodeJS.ProcessEnv = { ...process.env, VFIO_USER_GUEST: '/nowhere' };
  delete env.VFIO_USER_QEMU;
  const run = spawnSync(process.execPath, [join(root, 'node_modules/vitest/vitest.mjs'), 'run', '--config', join(__dirname, 'fixtures/reporter/vitest.config.mts')], {
    cwd: root,
    env,
    encoding: 'utf8',
    timeout: 60_000,
  });
  expect(run.status).toBe(1);
  const lines = run.stdout.trim().split('\n');
  expect(lines.at(-2)).toBe('vitest: 2 real-peer tests skipped: needs-a-peer.fixture.ts 2 (VFIO_USER_QEMU unset); docs/interop.md builds the peers, npm run test:interop runs them');
  // One failed test, a file that does not load, a beforeAll that throws, one unhandled rejection;
  // the hook's test and the two peer tests skipped.
  expect(lines.at(-1)).toBe('vitest: 2 passed, 4 failed (2 outside tests, 1 unhandled), 3 skipped');
});
