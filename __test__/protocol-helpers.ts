import { expect } from 'vitest';
import { Errno, ProtocolError, commandName } from '../ts/protocol/index.js';

/** Bytes from a hand-written hex string; spaces and newlines are ignored. */
export function hex(s: string): Buffer {
  const clean = s.replace(/\s+/g, '');
  if (clean.length % 2 !== 0 || /[^0-9a-f]/i.test(clean)) throw new Error(`bad hex: ${s}`);
  return Buffer.from(clean, 'hex');
}

/** Asserts that fn throws ProtocolError(EINVAL, command). */
export function expectEinval(fn: () => unknown, command: number): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught, `expected ${commandName(command)} to throw`).toBeInstanceOf(ProtocolError);
  const err = caught as ProtocolError;
  expect(err.errno).toBe(Errno.EINVAL);
  expect(commandName(err.command)).toBe(commandName(command));
  expect(err.message).toMatch(new RegExp(`^${commandName(command).replace(/[()]/g, '\\$&')} failed: EINVAL`));
}
