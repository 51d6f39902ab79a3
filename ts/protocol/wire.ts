// Internal helpers shared by the payload codecs (not re-exported from index.ts).
import { invalid } from './errors.js';

/** Views a Uint8Array as a Buffer without copying. */
export function asBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

/** Throws EINVAL unless `payload` has at least `n` bytes. */
export function need(payload: Uint8Array, n: number, command: number, what: string): void {
  if (payload.length < n) {
    throw invalid(command, `${what} needs ${n} bytes, got ${payload.length}`);
  }
}

/**
 * Reads a u64 that counts bytes or items carried in this very message; such a value must fit a
 * JS number before it can be compared with buffer lengths.
 */
export function readCount64(buf: Buffer, off: number, command: number, what: string): number {
  const v = buf.readBigUInt64LE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(command, `${what} ${v} is too large`);
  return Number(v);
}

