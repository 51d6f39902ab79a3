/**
 * Descriptor chains: what a driver hands the device in one available-ring
 * entry, walked and checked before device code sees any of it.
 *
 * The walk is bounded by the queue size (or the indirect table's entry
 * count), never by guest data alone: a chain that loops, runs past the queue
 * size, nests indirect tables, puts a device-readable buffer after a
 * device-writable one, or points outside guest memory throws a
 * `VirtqueueError`, and the device marks itself NEEDS_RESET.
 */
import { UsageError, VfioUserError } from '../errors.js';
import type { DmaSpace } from '../dma/space.js';
import type { SgEntry } from '../dma/access.js';
import { Desc, MAX_QUEUE_SIZE } from './spec.js';

/** The driver broke the virtqueue rules (§2.7); the device needs a reset. */
export class VirtqueueError extends VfioUserError {
  constructor(readonly queue: number, readonly reason: string) {
    super(`virtqueue ${queue}: ${reason}`);
  }
}

/** Largest total a chain may describe in one direction: the used ring's length is a u32. */
const MAX_CHAIN_BYTES = 0xffffffff;

/**
 * One request: the device-readable buffers (driver to device) then the
 * device-writable ones, as guest addresses. Read and write them through the
 * methods here or through `memory` (the device's `dma`).
 */
export class DescriptorChain {
  /** Bytes written into `writable`, reported in the used ring on completion. */
  written = 0;

  constructor(
    /** The head descriptor's index: the id the used ring gives back. */
    readonly head: number,
    readonly readable: readonly SgEntry[],
    readonly writable: readonly SgEntry[],
    readonly memory: DmaSpace,
    /** The queue incarnation the chain belongs to (a queue reset makes old chains stale). @internal */
    readonly generation: number,
  ) {}

  get readableLength(): number {
    return total(this.readable);
  }

  get writableLength(): number {
    return total(this.writable);
  }

  /** The device-readable bytes, gathered into one Buffer. */
  read(): Buffer {
    return this.memory.readSg(this.readable);
  }

  /** `length` device-readable bytes from `offset`, gathered. */
  readAt(offset: number, length: number): Buffer {
    return this.memory.readSg(slice(this.readable, offset, length, 'readable'));
  }

  /**
   * Writes `data` into the device-writable buffers at `offset`, and counts the
   * bytes as written (the used length is the furthest byte written).
   */
  writeAt(offset: number, data: Uint8Array): void {
    this.memory.writeSg(slice(this.writable, offset, data.length, 'writable'), data);
    this.written = Math.max(this.written, offset + data.length);
  }

  /** The device-writable part [offset, offset + length) as guest addresses, for zero-copy I/O. */
  writableRange(offset: number, length: number): SgEntry[] {
    return slice(this.writable, offset, length, 'writable');
  }

  /** The device-readable part [offset, offset + length) as guest addresses. */
  readableRange(offset: number, length: number): SgEntry[] {
    return slice(this.readable, offset, length, 'readable');
  }
}

/** What the walker needs from its queue. */
export interface ChainSource {
  queue: number;
  /** Queue size: the bound on a direct chain. */
  size: number;
  /** The descriptor table (`size` entries). */
  table: DataView;
  indirect: boolean;
  memory: DmaSpace;
  generation: number;
}

/** Walks and checks the chain starting at descriptor `head`. */
export function walkChain(source: ChainSource, head: number): DescriptorChain {
  const fail = (reason: string): never => {
    throw new VirtqueueError(source.queue, reason);
  };
  if (head >= source.size) fail(`available ring names descriptor ${head}, past the queue size ${source.size}`);
  const readable: SgEntry[] = [];
  const writable: SgEntry[] = [];
  const bytes = [0, 0];
  let table = source.table;
  let entries = source.size;
  let index = head;
  let indirect = false;
  // Each table is walked at most `entries` steps: a chain longer than its table loops.
  for (let steps = 0; ; steps++) {
    if (steps >= entries) fail(indirect ? `indirect chain at head ${head} is longer than its ${entries}-entry table (a loop)` : `chain at head ${head} is longer than the queue size ${entries} (a loop)`);
    const at = index * Desc.SIZE;
    const addr = table.getBigUint64(at + Desc.ADDR, true);
    const len = table.getUint32(at + Desc.LEN, true);
    const flags = table.getUint16(at + Desc.FLAGS, true);
    if (flags & Desc.F_INDIRECT) {
      if (!source.indirect) fail(`descriptor ${index} is indirect but RING_INDIRECT_DESC was not negotiated`);
      if (indirect) fail(`descriptor ${index} of an indirect table is indirect again (nested)`);
      if (flags & Desc.F_NEXT) fail(`indirect descriptor ${index} also has NEXT`);
      if (len === 0 || len % Desc.SIZE !== 0 || len / Desc.SIZE > MAX_QUEUE_SIZE) fail(`indirect table of ${len} bytes is not 1-${MAX_QUEUE_SIZE} descriptors`);
      if (readable.length + writable.length > 0) fail(`indirect descriptor ${index} follows direct ones in one chain`);
      table = indirectTable(source, addr, len);
      entries = len / Desc.SIZE;
      indirect = true;
      index = 0;
      steps = -1;
      continue;
    }
    const write = (flags & Desc.F_WRITE) !== 0;
    if (!write && writable.length > 0) fail(`descriptor ${index} is device-readable after a device-writable one`);
    checkBuffer(source, addr, len, write, index);
    const direction = write ? 1 : 0;
    bytes[direction] += len;
    if (bytes[direction] > MAX_CHAIN_BYTES) fail(`chain at head ${head} describes more than 4 GiB`);
    (write ? writable : readable).push({ iova: addr, length: len });
    if (!(flags & Desc.F_NEXT)) break;
    index = table.getUint16(at + Desc.NEXT, true);
    if (index >= entries) fail(`descriptor ${at / Desc.SIZE} chains to ${index}, past the ${entries}-entry table`);
  }
  return new DescriptorChain(head, readable, writable, source.memory, source.generation);
}

/** A copy of an indirect table (it is small, and a copy cannot change under the walk). */
function indirectTable(source: ChainSource, addr: bigint, len: number): DataView {
  checkBuffer(source, addr, len, false, -1);
  const copy = source.memory.read(addr, len);
  return new DataView(copy.buffer, copy.byteOffset, copy.byteLength);
}

/** The buffer must lie in guest memory that allows the device's access. */
function checkBuffer(source: ChainSource, addr: bigint, len: number, write: boolean, index: number): void {
  const memory = source.memory;
  let at = addr;
  const end = addr + BigInt(len);
  // One step per DMA window crossed: bounded by the window count, not by guest data.
  for (let windows = 0; at < end; windows++) {
    const w = memory.find(at, 1);
    const what = index < 0 ? 'indirect table' : `descriptor ${index}`;
    if (!w || windows > memory.count) {
      throw new VirtqueueError(source.queue, `${what} (${len} bytes at 0x${addr.toString(16)}) is outside guest memory`);
    }
    if (write ? !w.writable : !w.readable) {
      throw new VirtqueueError(source.queue, `${what} at 0x${addr.toString(16)} is in a window the device may not ${write ? 'write' : 'read'}`);
    }
    at = w.end;
  }
}

function total(list: readonly SgEntry[]): number {
  let sum = 0;
  for (const e of list) sum += e.length;
  return sum;
}

/** The part [offset, offset + length) of an SG list; past its end is a device-code bug. */
function slice(list: readonly SgEntry[], offset: number, length: number, which: string): SgEntry[] {
  const out: SgEntry[] = [];
  let skip = offset;
  let left = length;
  for (const e of list) {
    if (left === 0) break;
    if (skip >= e.length) {
      skip -= e.length;
      continue;
    }
    const n = Math.min(e.length - skip, left);
    out.push({ iova: e.iova + BigInt(skip), length: n });
    skip = 0;
    left -= n;
  }
  if (left > 0 || !Number.isSafeInteger(offset) || offset < 0) {
    throw new UsageError(`[${offset}, ${offset + length}) is past the chain's ${total(list)} ${which} bytes`);
  }
  return out;
}
