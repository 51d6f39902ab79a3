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
    /** The id the used ring gives back: the head descriptor's index (split) or the buffer ID (packed). */
    readonly head: number,
    readonly readable: readonly SgEntry[],
    readonly writable: readonly SgEntry[],
    readonly memory: DmaSpace,
    /** The queue incarnation the chain belongs to (a queue reset makes old chains stale). @internal */
    readonly generation: number,
    /** Ring entries the chain took: a packed ring's used entry skips them all (1 on a split ring). @internal */
    readonly slots = 1,
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

/** What a walk needs from its queue. @internal */
export interface WalkSource {
  queue: number;
  /** RING_INDIRECT_DESC was negotiated. */
  indirect: boolean;
  memory: DmaSpace;
  generation: number;
}

/**
 * One chain's buffers collected in ring order, each checked as the walk
 * reaches it: both ring layouts walk with this. @internal
 */
export class ChainWalk {
  readonly readable: SgEntry[] = [];
  readonly writable: SgEntry[] = [];
  private readonly bytes = [0, 0];

  constructor(private readonly source: WalkSource, readonly head: number) {}

  fail(reason: string): never {
    throw new VirtqueueError(this.source.queue, reason);
  }

  /** The buffer of descriptor `index`: in guest memory, device-readable ones first. */
  buffer(addr: bigint, len: number, write: boolean, index: number): void {
    if (!write && this.writable.length > 0) this.fail(`descriptor ${index} is device-readable after a device-writable one`);
    checkBuffer(this.source, addr, len, write, `descriptor ${index}`);
    const direction = write ? 1 : 0;
    this.bytes[direction] += len;
    if (this.bytes[direction] > MAX_CHAIN_BYTES) this.fail(`chain at head ${this.head} describes more than 4 GiB`);
    (write ? this.writable : this.readable).push({ iova: addr, length: len });
  }

  /**
   * The table an indirect descriptor names, checked (negotiated, alone in its
   * chain, whole descriptors in guest memory) and copied: a copy cannot change
   * under the walk.
   */
  table(addr: bigint, len: number, flags: number, index: number): DataView {
    if (!this.source.indirect) this.fail(`descriptor ${index} is indirect but RING_INDIRECT_DESC was not negotiated`);
    if (flags & Desc.F_NEXT) this.fail(`indirect descriptor ${index} also has NEXT`);
    if (len === 0 || len % Desc.SIZE !== 0 || len / Desc.SIZE > MAX_QUEUE_SIZE) this.fail(`indirect table of ${len} bytes is not 1-${MAX_QUEUE_SIZE} descriptors`);
    if (this.readable.length + this.writable.length > 0) this.fail(`indirect descriptor ${index} follows direct ones in one chain`);
    checkBuffer(this.source, addr, len, false, 'indirect table');
    const copy = this.source.memory.read(addr, len);
    return new DataView(copy.buffer, copy.byteOffset, copy.byteLength);
  }

  /** The chain walked, given back to the driver as `id`; it took `slots` ring entries. */
  chain(id: number, slots: number): DescriptorChain {
    return new DescriptorChain(id, this.readable, this.writable, this.source.memory, this.source.generation, slots);
  }
}

/** What the split walker needs from its queue. @internal */
export interface ChainSource extends WalkSource {
  /** Queue size: the bound on a direct chain. */
  size: number;
  /** The descriptor table (`size` entries). */
  table: DataView;
}

/** Walks and checks the split-ring chain starting at descriptor `head` (§2.7.5). @internal */
export function walkChain(source: ChainSource, head: number): DescriptorChain {
  const walk = new ChainWalk(source, head);
  if (head >= source.size) walk.fail(`available ring names descriptor ${head}, past the queue size ${source.size}`);
  let table = source.table;
  let entries = source.size;
  let index = head;
  let indirect = false;
  // Each table is walked at most `entries` steps: a chain longer than its table loops.
  for (let steps = 0; ; steps++) {
    if (steps >= entries) walk.fail(indirect ? `indirect chain at head ${head} is longer than its ${entries}-entry table (a loop)` : `chain at head ${head} is longer than the queue size ${entries} (a loop)`);
    const at = index * Desc.SIZE;
    const addr = table.getBigUint64(at + Desc.ADDR, true);
    const len = table.getUint32(at + Desc.LEN, true);
    const flags = table.getUint16(at + Desc.FLAGS, true);
    if (flags & Desc.F_INDIRECT) {
      if (indirect) walk.fail(`descriptor ${index} of an indirect table is indirect again (nested)`);
      table = walk.table(addr, len, flags, index);
      entries = len / Desc.SIZE;
      indirect = true;
      index = 0;
      steps = -1;
      continue;
    }
    walk.buffer(addr, len, (flags & Desc.F_WRITE) !== 0, index);
    if (!(flags & Desc.F_NEXT)) break;
    index = table.getUint16(at + Desc.NEXT, true);
    if (index >= entries) walk.fail(`descriptor ${at / Desc.SIZE} chains to ${index}, past the ${entries}-entry table`);
  }
  return walk.chain(head, 1);
}

/** The buffer must lie in guest memory that allows the device's access. */
function checkBuffer(source: WalkSource, addr: bigint, len: number, write: boolean, what: string): void {
  const memory = source.memory;
  let at = addr;
  const end = addr + BigInt(len);
  // One step per DMA window crossed: bounded by the window count, not by guest data.
  for (let windows = 0; at < end; windows++) {
    const w = memory.find(at, 1);
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

/** A chain device code held, as migration carries it: its id, the ring entries it took, its buffers (addresses in hex). */
export interface SavedChain {
  id: number;
  slots: number;
  readable: [string, number][];
  writable: [string, number][];
}

/** @internal */
export function saveChain(chain: DescriptorChain): SavedChain {
  const list = (entries: readonly SgEntry[]) => entries.map((e): [string, number] => [e.iova.toString(16), e.length]);
  return { id: chain.head, slots: chain.slots, readable: list(chain.readable), writable: list(chain.writable) };
}

/** A saved chain as a chain again, its buffers checked against guest memory as a walk checks them. @internal */
export function reviveChain(source: WalkSource, saved: SavedChain): DescriptorChain {
  const walk = new ChainWalk(source, saved.id);
  for (const [addr, len] of saved.readable) walk.buffer(BigInt(`0x${addr}`), len, false, saved.id);
  for (const [addr, len] of saved.writable) walk.buffer(BigInt(`0x${addr}`), len, true, saved.id);
  return walk.chain(saved.id, saved.slots);
}

/** Why `value` is not a saved chain of a queue of `size` entries (undefined when it is one). @internal */
export function checkSavedChain(value: unknown, size: number): string | undefined {
  const c = value as SavedChain;
  if (typeof c !== 'object' || c === null) return 'a held chain is not an object';
  if (!Number.isInteger(c.id) || c.id < 0 || c.id >= size) return `held chain id ${String(c.id)} is past the queue size ${size}`;
  if (!Number.isInteger(c.slots) || c.slots < 1 || c.slots > size) return `held chain ${c.id} takes ${String(c.slots)} ring entries, not 1-${size}`;
  const buffers = (list: unknown) => Array.isArray(list) && list.length <= MAX_QUEUE_SIZE
    && list.every((b) => Array.isArray(b) && b.length === 2 && typeof b[0] === 'string' && /^[0-9a-f]{1,16}$/.test(b[0]) && Number.isInteger(b[1]) && b[1] >= 0 && b[1] <= 0xffffffff);
  if (!buffers(c.readable) || !buffers(c.writable)) return `held chain ${c.id} has malformed buffers`;
  return undefined;
}
