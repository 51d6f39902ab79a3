/**
 * Ends a vitest run with the plain "vitest: N passed, N failed" line that
 * tools reading the last line of a run (CI among them) understand. A file
 * that fails to load, a failing hook and an unhandled error count as
 * failures too: each fails the run, so the line must say so.
 */
import type { Reporter, SerializedError, TestModule } from 'vitest/node';

export default class SummaryReporter implements Reporter {
  onTestRunEnd(modules: ReadonlyArray<TestModule>, unhandledErrors: ReadonlyArray<SerializedError>): void {
    let passed = 0;
    let failed = 0;
    let skipped = 0;
    let outsideTests = 0;
    for (const module of modules) {
      for (const test of module.children.allTests()) {
        const state = test.result().state;
        if (state === 'passed') passed++;
        else if (state === 'failed') failed++;
        else skipped++;
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
    process.stdout.write(`vitest: ${passed} passed, ${failed} failed${detail}${skipped ? `, ${skipped} skipped` : ''}\n`);
  }
}
