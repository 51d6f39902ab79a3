/**
 * Sparse files behind device backends (a raw disk image): giving a range's
 * space back to the filesystem.
 */
import { UsageError } from './errors.js';
import { native } from './native.js';

/**
 * Deallocates `length` bytes at `position` of the file open for writing on
 * `fd` (FALLOC_FL_PUNCH_HOLE, keeping its size): the range reads as zeros
 * and takes no space. Returns false, changing nothing, where the filesystem
 * cannot punch holes (write zeros instead). Other failures throw, with the
 * errno in the message.
 */
export function punchHole(fd: number, position: number, length: number): boolean {
  for (const [name, value] of [['position', position], ['length', length]] as const) {
    if (!Number.isSafeInteger(value) || value < 0) throw new UsageError(`punchHole: ${name} ${value} is not a non-negative integer`);
  }
  return native.punchHole(fd, BigInt(position), BigInt(length));
}
