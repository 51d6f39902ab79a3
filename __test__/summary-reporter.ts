/**
 * Ends a vitest run with the plain "vitest: N passed, N failed" line that
 * tools reading the last line of a run (CI among them) understand. A file
 * that fails to load, a failing hook and an unhandled error count as
 * failures too: each fails the run, so the line must say so.
 *
 * Before it, one line names the files whose tests were skipped for want of
 * a real peer and the variables that were not set: a peer-gated test names
 * its variables (interop-peers.ts) in its own or its suite's title.
 */
import { basename } from 'node:path';
import type { Reporter, SerializedError, TestCase, TestModule } from 'vitest/node';
import { REAL_PEERS } from './interop-peers.js';

/** The real peers a skipped test's title names whose variables are unset. */
function missingPeers(test: TestCase): string[] {
  return Object.keys(REAL_PEERS).filter((name) => !process.env[name] && new RegExp(`\\b${name}\\b`).test(test.fullName));
}

export default class SummaryReporter implements Reporter {
  onTestRunEnd(modules: ReadonlyArray<TestModule>, unhandledErrors: ReadonlyArray<SerializedError>): void {
    let passed = 0;
    let failed = 0;
    let skipped = 0;
    let outsideTests = 0;
    // File -> how many of its tests were skipped for want of a peer, and which variables.
    const peerSkips = new Map<string, { tests: number; unset: Set<string> }>();
    for (const module of modules) {
      for (const test of module.children.allTests()) {
        const state = test.result().state;
        if (state === 'passed') passed++;
        else if (state === 'failed') failed++;
        else {
          skipped++;
          const unset = missingPeers(test);
          if (unset.length === 0) continue;
          const file = basename(module.moduleId);
          const entry = peerSkips.get(file) ?? { tests: 0, unset: new Set() };
          entry.tests++;
          for (const name of unset) entry.unset.add(name);
          peerSkips.set(file, entry);
        }
      }
      // Errors outside any test: the file failed to load, or a suite's hook threw.
      outsideTests += module.errors().length;
      for (const suite of module.children.allSuites()) outsideTests += suite.errors().length;
    }
    const why = [
      outsideTests ? `${outsideTests} outside tests` : '',
      unhandledErrors.length ? `${unhandledErrors.length} unhandled` : '',
    ].filter(Boolean);
    failed += outsideTests + unhandledErrors.length;
    const detail = why.length ? ` (${why.join(', ')})` : '';
    if (peerSkips.size > 0) {
      const files = [...peerSkips].map(([file, { tests, unset }]) => `${file} ${tests} (${[...unset].join(', ')} unset)`);
      const total = [...peerSkips.values()].reduce((sum, { tests }) => sum + tests, 0);
      process.stdout.write(`vitest: ${total} real-peer tests skipped: ${files.join('; ')}; docs/interop.md builds the peers, npm run test:interop runs them\n`);
    }
    process.stdout.write(`vitest: ${passed} passed, ${failed} failed${detail}${skipped ? `, ${skipped} skipped` : ''}\n`);
  }
}
