/**
 * `GuestMemoryAccess`: what device code does with guest memory, by IOVA.
 *
 * Two families of methods, chosen for speed where memory is mapped and for
 * reach where it is not:
 * - plain methods (`read`, `write`, `readU32`, `readSg`, `copySg`, `view`...)
 *   are synchronous: one bounds-checked native copy, no promise. They throw
 *   `AsyncDmaRequiredError` if any byte lies in a window the client mapped
 *   without an fd.
 * - `...Async` methods work for every window: mapped parts are copied at
 *   once, message-based parts go out as DMA_READ/DMA_WRITE.
 * A device written for any client uses the async ones; a device that
 * requires shared guest memory (QEMU with share=on) may use the sync ones.
 *
 * Integers are little-endian (PCI and every guest we serve). Lengths are
 * numbers, IOVAs bigints. Copies survive a client truncating its backing
 * file (DmaAccessError with EFAULT); views do not (see docs/dma.md).
 */
import { constants as bufferConstants } from 'node:buffer';
import { UsageError } from '../errors.js';
import { Errno } from '../protocol/index.js';
import { AsyncDmaRequiredError, DmaAccessError, DmaViewError } from './errors.js';
import type { MessageDma } from './messages.js';
import type { DmaWindow, FastAccess } from './space.js';

/** One element of a scatter-gather list. */
export interface SgEntry {
  readonly iova: bigint;
  readonly length: number;
}
export type SgList = readonly SgEntry[];

/** Dirty tracking granule (bytes): bit i of a dirty report is page i of the range. */
export const DIRTY_PAGE_SIZE = 4096;
/** Longest zero-copy view: the largest Buffer/ArrayBuffer this runtime makes. */
export const MAX_VIEW_LENGTH = Math.min(bufferConstants.MAX_LENGTH, 2 ** 32);

type Need = 'readable' | 'writable';

/** The part of an access that falls inside one window. @internal */
export interface Piece {
  window: DmaWindow;
  /** Offset of the piece in its window. */
  offset: number;
  length: number;
}

export abstract class GuestMemoryAccess {
  /** The window holding `iova`, if any. */
  protected abstract windowAt(iova: bigint): DmaWindow | undefined;
  /** Windows overlapping [iova, end), in IOVA order. */
  protected abstract windowsIn(iova: bigint, end: bigint): Iterable<DmaWindow>;
  /** How message-based windows are reached; undefined while no client is attached. */
  protected abstract get messages(): MessageDma | undefined;

  // One scratch buffer per integer width, so integer accesses allocate nothing.
  private readonly int8 = Buffer.alloc(1);
  private readonly int16 = Buffer.alloc(2);
  private readonly int32 = Buffer.alloc(4);
  private readonly int64 = Buffer.alloc(8);

  // ---- synchronous: fd-backed windows only ----

  read(iova: bigint, length: number): Buffer {
    const out = Buffer.allocUnsafe(checkLength(length));
    this.readInto(iova, out);
    return out;
  }

  readInto(iova: bigint, target: Uint8Array): void {
    // The common case first, with as little bigint arithmetic as possible.
    const w = this.windowAt(iova);
    const fast = w && fastAccess(w);
    if (fast) {
      const at = Number(iova - w.iova);
      if (at + target.length <= fast.bytes.length) return target.set(slice(fast, at, target.length));
    }
    const whole = this.whole(iova, target.length, 'readable');
    if (whole) check(whole.mapping!.readInto(Number(iova - whole.iova), target), iova, target.length);
    else this.copyPieces(this.pieces(iova, target.length, 'readable'), target, iova, 'read');
  }

  write(iova: bigint, data: Uint8Array): void {
    const w = this.windowAt(iova);
    const fast = w && fastAccess(w);
    if (fast) {
      const at = Number(iova - w.iova);
      if (at + data.length <= fast.bytes.length) {
        fast.bytes.set(data, at);
        return markDirty(fast.dirty, at, data.length);
      }
    }
    const whole = this.whole(iova, data.length, 'writable');
    if (whole) check(whole.mapping!.writeFrom(Number(iova - whole.iova), data), iova, data.length);
    else this.copyPieces(this.pieces(iova, data.length, 'writable'), data, iova, 'write');
  }

  readU8(iova: bigint): number {
    this.readInto(iova, this.int8);
    return this.int8[0];
  }

  readU16(iova: bigint): number {
    this.readInto(iova, this.int16);
    return this.int16.readUInt16LE(0);
  }

  readU32(iova: bigint): number {
    this.readInto(iova, this.int32);
    return this.int32.readUInt32LE(0);
  }

  readU64(iova: bigint): bigint {
    this.readInto(iova, this.int64);
    return this.int64.readBigUInt64LE(0);
  }

  writeU8(iova: bigint, value: number): void {
    this.int8[0] = value;
    this.write(iova, this.int8);
  }

  writeU16(iova: bigint, value: number): void {
    this.int16.writeUInt16LE(value, 0);
    this.write(iova, this.int16);
  }

  writeU32(iova: bigint, value: number): void {
    this.int32.writeUInt32LE(value, 0);
    this.write(iova, this.int32);
  }

  writeU64(iova: bigint, value: bigint): void {
    this.int64.writeBigUInt64LE(value, 0);
    this.write(iova, this.int64);
  }

  /** Gathers an SG list into a new Buffer. */
  readSg(sg: SgList): Buffer {
    const out = Buffer.allocUnsafe(sgLength(sg));
    this.copyPieces(this.sgPieces(sg, 'readable'), out, sg[0]?.iova ?? 0n, 'read');
    return out;
  }

  /** Scatters `data` (exactly the list's total length) over an SG list. */
  writeSg(sg: SgList, data: Uint8Array): void {
    sameLength(sgLength(sg), data.length);
    this.copyPieces(this.sgPieces(sg, 'writable'), data, sg[0]?.iova ?? 0n, 'write');
  }

  /** Copies guest memory to guest memory, list to list (equal totals), without a bounce buffer. */
  copySg(to: SgList, from: SgList): void {
    sameLength(sgLength(to), sgLength(from));
    const src = this.sgPieces(from, 'readable');
    const dst = this.sgPieces(to, 'writable');
    const iova = from[0]?.iova ?? 0n;
    for (const p of [...src, ...dst]) if (!p.window.mapping) throw new AsyncDmaRequiredError(p.window.iova + BigInt(p.offset));
    let s = 0;
    let d = 0;
    let sDone = 0;
    let dDone = 0;
    while (s < src.length && d < dst.length) {
      const a = src[s];
      const b = dst[d];
      const n = Math.min(a.length - sDone, b.length - dDone);
      const [from, to] = [fastAccess(a.window), fastAccess(b.window)];
      if (from && to) {
        to.bytes.set(slice(from, a.offset + sDone, n), b.offset + dDone);
        markDirty(to.dirty, b.offset + dDone, n);
      } else {
        check(a.window.mapping!.copyTo(a.offset + sDone, b.window.mapping!, b.offset + dDone, n), iova, n);
      }
      sDone += n;
      dDone += n;
      if (sDone === a.length) [s, sDone] = [s + 1, 0];
      if (dDone === b.length) [d, dDone] = [d + 1, 0];
    }
  }

  /**
   * A zero-copy view of guest memory, inside one readable and writable
   * fd-backed window. It is detached (byteLength 0) when the window is
   * unmapped or the client leaves. Stores through a view cannot be observed,
   * so its whole range counts as dirty in every dirty report (even after one
   * that clears) for as long as the view is alive, i.e. until it is detached
   * or garbage-collected; drop views you no longer need. A view touching
   * memory the client truncated kills the process with SIGBUS: see docs/dma.md.
   */
  view(iova: bigint, length: number): Uint8Array {
    if (checkLength(length) > MAX_VIEW_LENGTH) {
      throw new DmaViewError('too-large', iova, `${length} bytes exceed this runtime's ${MAX_VIEW_LENGTH}-byte ArrayBuffer limit; view a smaller window`);
    }
    const w = this.windowAt(iova);
    if (!w) throw new DmaAccessError(Errno.EFAULT, iova, length, 'no DMA window there');
    if (iova + BigInt(length) > w.end) {
      this.pieces(iova, length, 'readable'); // EFAULT if part of it is not mapped at all
      throw new DmaViewError('spans-windows', iova, 'the range crosses into another DMA window');
    }
    if (!w.mapping) throw new DmaViewError('message-based', iova, 'the window was mapped without an fd');
    if (!w.readable || !w.writable) throw new DmaViewError('read-only', iova, 'views need a readable and writable window');
    let buffer: ArrayBuffer;
    try {
      buffer = w.mapping.view(Number(iova - w.iova), length);
    } catch (error) {
      // Every other refusal was ruled out above.
      throw new DmaViewError('unsupported-runtime', iova, (error as Error).message);
    }
    return new Uint8Array(buffer);
  }

  /**
   * Whether [iova, iova + length) lies in one readable, writable window whose
   * file cannot shrink (sealed, as QEMU seals guest RAM): there copies are
   * plain memory accesses and `withView` costs nothing (a slice of memory
   * the library holds), and no access can fault. Elsewhere (SPDK's
   * hugetlbfs files are not sealed) each `withView` makes an external
   * ArrayBuffer for the garbage collector, which a device calling it per
   * request pays for: it should copy with `write`/`readInto` there instead.
   */
  hasPlainAccess(iova: bigint, length: number): boolean {
    const w = this.windowAt(iova);
    return !!w && iova + BigInt(checkLength(length)) <= w.end && w.readable && w.writable && fastAccess(w) !== null;
  }

  /**
   * Calls `use` with a zero-copy view of [iova, iova + length) and returns
   * what it returns. The view is valid only during the call: its pages are
   * marked dirty when `use` returns, and stores made through a copy of it
   * kept past the call are not tracked. Where the window's file is sealed
   * against shrinking the view is a slice of memory the library already
   * holds (no native call, nothing for the garbage collector); elsewhere it
   * is a `view()`, refused and detached as views are. For device code that
   * moves data straight between guest memory and a file or socket.
   */
  withView<T>(iova: bigint, length: number, use: (view: Uint8Array) => T): T {
    const w = this.windowAt(iova);
    const fast = w && iova + BigInt(checkLength(length)) <= w.end && w.readable && w.writable ? fastAccess(w) : null;
    if (!fast) return use(this.view(iova, length));
    const offset = Number(iova - w!.iova);
    try {
      return use(slice(fast, offset, length));
    } finally {
      markDirty(fast.dirty, offset, length);
    }
  }

  /**
   * Which 4 KiB pages of [iova, iova + length) the device wrote through this
   * API (bit i of word i/64 is page i, as VFIO bitmaps), clearing them when
   * `clear`. Both bounds are page-aligned. Windows without an fd report
   * clean: the client tracks what it writes for DMA_WRITE (§6.10).
   */
  dirtyPages(iova: bigint, length: number, clear = false): BigUint64Array {
    const page = BigInt(DIRTY_PAGE_SIZE);
    if (iova % page !== 0n || checkLength(length) % DIRTY_PAGE_SIZE !== 0) {
      throw new UsageError(`dirty ranges are whole ${DIRTY_PAGE_SIZE}-byte pages`);
    }
    const report = new BigUint64Array(Math.ceil(length / DIRTY_PAGE_SIZE / 64));
    const end = iova + BigInt(length);
    for (const w of this.windowsIn(iova, end)) {
      if (!w.mapping) continue;
      const from = iova > w.iova ? iova : w.iova;
      const to = end < w.end ? end : w.end;
      w.mapping.dirtyScan(Number(from - w.iova), Number(to - from), clear, report, Number((from - iova) / page));
    }
    return report;
  }

  // ---- asynchronous: every window ----

  async readAsync(iova: bigint, length: number): Promise<Buffer> {
    const out = Buffer.allocUnsafe(checkLength(length));
    await this.readIntoAsync(iova, out);
    return out;
  }

  async readIntoAsync(iova: bigint, target: Uint8Array): Promise<void> {
    if (this.whole(iova, target.length, 'readable')) return this.readInto(iova, target);
    await this.transfer(this.pieces(iova, target.length, 'readable'), target, iova, 'read');
  }

  async writeAsync(iova: bigint, data: Uint8Array): Promise<void> {
    if (this.whole(iova, data.length, 'writable')) return this.write(iova, data);
    await this.transfer(this.pieces(iova, data.length, 'writable'), data, iova, 'write');
  }

  async readSgAsync(sg: SgList): Promise<Buffer> {
    const out = Buffer.allocUnsafe(sgLength(sg));
    await this.transfer(this.sgPieces(sg, 'readable'), out, sg[0]?.iova ?? 0n, 'read');
    return out;
  }

  async writeSgAsync(sg: SgList, data: Uint8Array): Promise<void> {
    sameLength(sgLength(sg), data.length);
    await this.transfer(this.sgPieces(sg, 'writable'), data, sg[0]?.iova ?? 0n, 'write');
  }

  /** copySg for any windows: through a bounce buffer when a part is message-based. */
  async copySgAsync(to: SgList, from: SgList): Promise<void> {
    sameLength(sgLength(to), sgLength(from));
    const mapped = (p: Piece) => p.window.mapping !== undefined;
    const dst = this.sgPieces(to, 'writable');
    const src = this.sgPieces(from, 'readable');
    if (dst.every(mapped) && src.every(mapped)) return this.copySg(to, from);
    const data = Buffer.allocUnsafe(sgLength(from));
    await this.transfer(src, data, from[0].iova, 'read');
    await this.transfer(dst, data, to[0].iova, 'write');
  }

  // ---- resolution ----

  /** The window when [iova, iova + length) is all inside one fd-backed window allowing `need`. */
  private whole(iova: bigint, length: number, need: Need): DmaWindow | undefined {
    const w = this.windowAt(iova);
    return w && w.mapping && w[need] && iova + BigInt(length) <= w.end ? w : undefined;
  }

  /** Splits an access at window boundaries; throws if any byte is unmapped or not allowed. */
  private pieces(iova: bigint, length: number, need: Need, into: Piece[] = []): Piece[] {
    let at = iova;
    let left = checkLength(length);
    while (left > 0) {
      const w = this.windowAt(at);
      if (!w) throw new DmaAccessError(Errno.EFAULT, iova, length, `no DMA window at 0x${at.toString(16)}`);
      if (!w[need]) throw new DmaAccessError(Errno.EPERM, iova, length, `the window at 0x${w.iova.toString(16)} is not ${need}`);
      const offset = at - w.iova;
      const n = Math.min(left, Number(w.size - offset));
      into.push({ window: w, offset: Number(offset), length: n });
      at += BigInt(n);
      left -= n;
    }
    return into;
  }

  /**
   * An SG list split at window boundaries, every byte checked (DmaAccessError
   * otherwise), for native code that moves the data itself (block I/O). @internal
   */
  resolveSg(sg: SgList, need: 'readable' | 'writable'): Piece[] {
    return this.sgPieces(sg, need);
  }

  private sgPieces(sg: SgList, need: Need): Piece[] {
    const out: Piece[] = [];
    for (const e of sg) this.pieces(e.iova, e.length, need, out);
    return out;
  }

  /** Copies every piece natively; throws before copying if one is message-based. */
  private copyPieces(pieces: Piece[], buffer: Uint8Array, iova: bigint, direction: 'read' | 'write'): void {
    for (const p of pieces) if (!p.window.mapping) throw new AsyncDmaRequiredError(p.window.iova + BigInt(p.offset));
    let at = 0;
    for (const p of pieces) {
      copyMapped(p, buffer.subarray(at, at + p.length), direction, iova, buffer.length);
      at += p.length;
    }
  }

  /** Copies mapped pieces now and sends messages for the rest, all in flight at once. */
  private async transfer(pieces: Piece[], buffer: Uint8Array, iova: bigint, direction: 'read' | 'write'): Promise<void> {
    const pending: Promise<void>[] = [];
    let at = 0;
    try {
      for (const p of pieces) {
        const part = buffer.subarray(at, at + p.length);
        at += p.length;
        if (p.window.mapping) {
          copyMapped(p, part, direction, iova, buffer.length);
          continue;
        }
        const messages = this.messages;
        if (!messages) throw new DmaAccessError(Errno.EFAULT, iova, buffer.length, 'no client is attached');
        const address = p.window.iova + BigInt(p.offset);
        pending.push(direction === 'read' ? messages.read(address, part) : messages.write(address, part));
      }
    } catch (error) {
      // Messages already sent still settle; only the first failure is reported.
      for (const p of pending) p.catch(() => {});
      throw error;
    }
    await Promise.all(pending);
  }
}

/**
 * The window's plain-memory access, fetched once: only windows whose file is
 * sealed against shrinking get one, so these loads and stores cannot fault.
 * A JS copy costs no native call, which is what small and 64 KiB copies pay
 * most for.
 */
function fastAccess(w: DmaWindow): FastAccess | null {
  if (!w.mapping) return null;
  if (w.fast === undefined) {
    const raw = w.mapping!.fastAccess();
    w.fast = raw && { bytes: new Uint8Array(raw.bytes), dirty: new Uint32Array(raw.dirty) };
  }
  return w.fast;
}

/** Copies between `part` and a piece of an fd-backed window. */
function copyMapped(p: Piece, part: Uint8Array, direction: 'read' | 'write', iova: bigint, total: number): void {
  const fast = fastAccess(p.window);
  if (!fast) {
    const m = p.window.mapping!;
    return check(direction === 'read' ? m.readInto(p.offset, part) : m.writeFrom(p.offset, part), iova, total);
  }
  if (direction === 'read') {
    part.set(slice(fast, p.offset, part.length));
  } else {
    fast.bytes.set(part, p.offset);
    markDirty(fast.dirty, p.offset, part.length);
  }
}

/** A view of `length` bytes at `offset` (a plain Uint8Array: cheaper to make than a Buffer slice). */
function slice(fast: FastAccess, offset: number, length: number): Uint8Array {
  return new Uint8Array(fast.bytes.buffer, offset, length);
}

function markDirty(dirty: Uint32Array, offset: number, length: number): void {
  if (length === 0) return;
  const last = Math.floor((offset + length - 1) / DIRTY_PAGE_SIZE);
  for (let page = Math.floor(offset / DIRTY_PAGE_SIZE); page <= last; page++) dirty[page >>> 5] |= 1 << (page & 31);
}

/** Turns a native copy's errno into a typed error. */
function check(errno: number, iova: bigint, length: number): void {
  if (errno === 0) return;
  const why = errno === Errno.EFAULT ? 'the memory is gone: unmapped, or the client truncated its backing file' : 'the window does not allow it';
  throw new DmaAccessError(errno, iova, length, why);
}

function checkLength(length: number): number {
  if (!Number.isSafeInteger(length) || length < 0) throw new UsageError(`length ${length} is not a non-negative integer`);
  return length;
}

function sgLength(sg: SgList): number {
  let total = 0;
  for (const e of sg) total += checkLength(e.length);
  return total;
}

function sameLength(a: number, b: number): void {
  if (a !== b) throw new UsageError(`the lengths differ: ${a} and ${b} bytes`);
}
