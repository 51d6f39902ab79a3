import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  // Examples import the package by name, as users do (tsconfig.json's "paths").
  resolve: {
    alias: [
      { find: /^vfio-user$/, replacement: fileURLToPath(new URL('./ts/index.ts', import.meta.url)) },
      { find: /^vfio-user\/protocol$/, replacement: fileURLToPath(new URL('./ts/protocol/index.ts', import.meta.url)) },
    ],
  },
  test: {
    include: ['__test__/**/*.test.ts'],
    testTimeout: 20000,
    pool: 'forks',
    reporters: ['default', './__test__/summary-reporter.ts'],
  },
});
