import { defineConfig } from 'vitest/config';

// `npm run test:interop`: the files that drive real peers, one at a time (they start
// processes and a guest under TCG), failing when a peer is missing (__test__/interop-peers.ts).
export default defineConfig({
  test: {
    include: ['__test__/interop-*.test.ts'],
    globalSetup: ['./__test__/interop-peers.ts'],
    fileParallelism: false,
    testTimeout: 300000,
    pool: 'forks',
    reporters: ['default', './__test__/summary-reporter.ts'],
  },
});
