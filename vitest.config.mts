import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['__test__/**/*.test.ts'],
    testTimeout: 20000,
    pool: 'forks',
    reporters: ['default', './__test__/summary-reporter.ts'],
  },
});
