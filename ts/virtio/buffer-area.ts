/**
 * A driver queue's buffer area: the byte ranges `VirtioDriver` carves for a
 * chain's buffers (and its indirect table), given back when the device uses
 * the chain. First fit over a sorted free list, so a queue kept busy, with
 * chains used in any order, never runs dry while what is outstanding fits.
 */
import { UsageError } from '../errors.js';

/** Ranges start 16-byte aligned (descriptor tables need it) and take at least 16 bytes, so no two buffers share an address. */
const ALIGN = 16;

interface Range {
  at: number;
  length: number;
}

function rounded(length: number): number {
  return Math.max(ALIGN, Math.ceil(length / ALIGN) * ALIGN);
}

export class BufferArea {
  /** Free ranges by offset; never two adjacent ones. */
  private readonly free: Range[];
  private taken = 0;

  constructor(readonly size: number) {
    if (!Number.isSafeInteger(size) || size < ALIGN || size % ALIGN !== 0) throw new UsageError(`a buffer area of ${size} bytes: a multiple of ${ALIGN}, at least ${ALIGN}`);
    this.free = [{ at: 0, length: size }];
  }

  /** Bytes outstanding (as rounded up). */
  get used(): number {
    return this.taken;
  }

  /** The offset of `length` bytes, or undefined when no free range holds them. */
  take(length: number): number | undefined {
    const need = rounded(length);
    const i = this.free.findIndex((r) => r.length >= need);
    if (i < 0) return undefined;
    const range = this.free[i]!;
    const at = range.at;
    if (range.length === need) this.free.splice(i, 1);
    else {
      range.at += need;
      range.length -= need;
    }
    this.taken += need;
    return at;
  }

  /** Gives back what `take(length)` returned as `at`, merged with its free neighbours. */
  give(at: number, length: number): void {
    const need = rounded(length);
    let i = 0;
    while (i < this.free.length && this.free[i]!.at < at) i++;
    const before = this.free[i - 1];
    const after = this.free[i];
    if ((before && before.at + before.length > at) || (after && at + need > after.at) || at + need > this.size) {
      throw new Error(`buffer range ${at}+${need} is not taken`);
    }
    this.taken -= need;
    if (before && before.at + before.length === at) {
      before.length += need;
      if (after && before.at + before.length === after.at) {
        before.length += after.length;
        this.free.splice(i, 1);
      }
    } else if (after && at + need === after.at) {
      after.at = at;
      after.length += need;
    } else {
      this.free.splice(i, 0, { at, length: need });
    }
  }
}
