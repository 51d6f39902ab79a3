/**
 * What a test opens and must close: undos registered with `defer` run after
 * each test, last first. Call `testCleanups()` once at a test file's top
 * level (it registers the afterEach).
 */
import { afterEach } from 'vitest';
import { connect, GuestMemory, type ConnectOptions, type VfioUserClient } from '../ts/index.js';

export interface TestCleanups {
  defer(cleanup: () => void | Promise<void>): void;
  /** A client of `path`, closed after the test. */
  client(path: string, options?: ConnectOptions): Promise<VfioUserClient>;
  /** Guest memory of `size` bytes, closed after the test. */
  memory(size: number): GuestMemory;
}

export function testCleanups(): TestCleanups {
  const undos: (() => void | Promise<void>)[] = [];
  afterEach(async () => {
    // Every undo runs even when one throws (a server that reports device errors as it closes): nothing leaks into the next test.
    const failures: unknown[] = [];
    for (const undo of undos.splice(0).reverse()) {
      try {
        await undo();
      } catch (error) {
        failures.push(error);
      }
    }
    if (failures.length === 1) throw failures[0];
    if (failures.length > 1) throw new AggregateError(failures, `${failures.length} cleanups failed`);
  });
  const defer = (undo: () => void | Promise<void>) => void undos.push(undo);
  return {
    defer,
    async client(path, options) {
      const client = await connect(path, options);
      defer(() => client.close());
      return client;
    },
    memory(size) {
      const memory = new GuestMemory(size);
      defer(() => memory.close());
      return memory;
    },
  };
}
