/**
 * The split virtqueue (§2.7) over zero-copy views of guest memory: the
 * descriptor table and both rings are views the device reads and writes in
 * place. Indices are u16 and wrap; everything read from the rings is checked
 * before use.
 */
import type { DmaSpace } from '../dma/space.js';
import { DmaViewError, DmaAccessError } from '../dma/errors.js';
import { VirtqueueError, walkChain, type DescriptorChain } from './chain.js';
import { Desc, Ring } from './spec.js';

/** Where a driver put a queue, and how it was negotiated. */
export interface SplitLayout {
  queue: number;
  size: number;
  desc: bigint;
  driver: bigint;
  device: bigint;
  eventIdx: boolean;
  indirect: boolean;
}

/** Alignments §2.7 requires of the three parts. */
export const SPLIT_ALIGN = { desc: 16n, driver: 2n, device: 4n } as const;

export class SplitRing {
  /** Next available-ring entry to take. */
  lastAvail = 0;
  /** Next used-ring entry to fill (published when the batch is flushed). */
  usedIdx = 0;
  /** The used index the driver last saw: interrupts are decided against it. */
  private publishedUsed = 0;
  /** The available index as last loaded: entries up to it are known to exist. */
  private seenAvail = 0;
  private memory: DmaSpace | undefined;
  private table!: DataView;
  private avail!: DataView;
  private availIdx!: Uint16Array;
  private used!: DataView;
  /** The used ring as u16s, for the stores that must be ordered before a load (Atomics fence). */
  private usedU16!: Uint16Array;
  private generation = 0;

  constructor(readonly layout: SplitLayout) {}

  /** Picks up the indices the used ring shows (a queue enabled after a migration continues from them). */
  restore(lastAvail: number, usedIdx: number, generation: number): void {
    this.lastAvail = this.seenAvail = lastAvail;
    this.usedIdx = this.publishedUsed = usedIdx;
    this.generation = generation;
  }

  /**
   * Views of the rings in `memory`, made again when the client changed or
   * unmapped the window under them (views of an unmapped window are detached).
   */
  attach(memory: DmaSpace): void {
    if (this.memory === memory && this.table.byteLength !== 0 && this.avail.byteLength !== 0 && this.used.byteLength !== 0) return;
    const { size, queue } = this.layout;
    const view = (iova: bigint, length: number, what: string) => {
      try {
        return memory.view(iova, length);
      } catch (error) {
        if (error instanceof DmaViewError || error instanceof DmaAccessError) {
          throw new VirtqueueError(queue, `the ${what} (${length} bytes at 0x${iova.toString(16)}) is not in one shared, writable window of guest memory: ${error.message}`);
        }
        throw error;
      }
    };
    const table = view(this.layout.desc, size * Desc.SIZE, 'descriptor table');
    const avail = view(this.layout.driver, Ring.ENTRIES + 2 * size + 2, 'available ring');
    const used = view(this.layout.device, Ring.ENTRIES + Ring.USED_ELEM_SIZE * size + 2, 'used ring');
    this.table = new DataView(table.buffer, table.byteOffset, table.byteLength);
    this.avail = new DataView(avail.buffer, avail.byteOffset, avail.byteLength);
    this.availIdx = new Uint16Array(avail.buffer, avail.byteOffset + Ring.IDX, 1);
    this.used = new DataView(used.buffer, used.byteOffset, used.byteLength);
    this.usedU16 = new Uint16Array(used.buffer, used.byteOffset, used.byteLength / 2);
    this.memory = memory;
  }

  /** Whether the driver has made chains available that were not taken yet (loads the index). */
  get pending(): boolean {
    this.loadAvail();
    return this.seenAvail !== this.lastAvail;
  }

  /** The next available chain, walked and checked; undefined when the ring is empty. */
  pop(): DescriptorChain | undefined {
    if (this.seenAvail === this.lastAvail) this.loadAvail();
    if (this.seenAvail === this.lastAvail) return undefined;
    const head = this.avail.getUint16(Ring.ENTRIES + 2 * (this.lastAvail % this.layout.size), true);
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    return this.chainAt(head);
  }

  /** Walks the chain at `head` again (one a migration carried while device code held it). */
  chainAt(head: number): DescriptorChain {
    const { size, queue, indirect } = this.layout;
    return walkChain({ queue, size, table: this.table, indirect, memory: this.memory!, generation: this.generation }, head);
  }

  /** Fills the next used entry; the driver sees it at the next `publish()`. */
  push(head: number, written: number): void {
    const at = Ring.ENTRIES + Ring.USED_ELEM_SIZE * (this.usedIdx % this.layout.size);
    this.used.setUint32(at, head, true);
    this.used.setUint32(at + 4, written, true);
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
  }

  /** Makes pushed entries visible; returns whether the driver asked to be interrupted for them. */
  publish(): boolean {
    if (this.usedIdx === this.publishedUsed) return false;
    const old = this.publishedUsed;
    // The entries were stored first; the index store publishes them (sequentially consistent).
    Atomics.store(this.usedU16, Ring.IDX / 2, this.usedIdx);
    this.publishedUsed = this.usedIdx;
    if (!this.layout.eventIdx) return (this.avail.getUint16(Ring.FLAGS, true) & Ring.AVAIL_NO_INTERRUPT) === 0;
    // used_event: interrupt when the used index passes it (vring_need_event, §2.7.10).
    const usedEvent = this.avail.getUint16(Ring.ENTRIES + 2 * this.layout.size, true);
    return ((this.usedIdx - usedEvent - 1) & 0xffff) < ((this.usedIdx - old) & 0xffff);
  }

  /**
   * Asks the driver not to notify while the device is taking chains anyway
   * (`quiet`), or to notify for the next chain. Returns whether chains arrived
   * that the driver may not have notified for: take them before sleeping.
   */
  notifications(quiet: boolean): boolean {
    if (this.layout.eventIdx) {
      if (quiet) return false;
      Atomics.store(this.usedU16, (Ring.ENTRIES + Ring.USED_ELEM_SIZE * this.layout.size) / 2, this.seenAvail);
    } else {
      Atomics.store(this.usedU16, Ring.FLAGS / 2, quiet ? Ring.USED_NO_NOTIFY : 0);
      if (quiet) return false;
    }
    // The store above is seen before this load (Atomics are sequentially consistent).
    const before = this.seenAvail;
    return Atomics.load(this.availIdx, 0) !== before;
  }

  private loadAvail(): void {
    const idx = Atomics.load(this.availIdx, 0);
    const count = (idx - this.lastAvail) & 0xffff;
    if (count > this.layout.size) {
      throw new VirtqueueError(this.layout.queue, `available index ${idx} is ${count} entries ahead of the device's ${this.lastAvail}, more than the queue size ${this.layout.size}`);
    }
    this.seenAvail = idx;
  }
}
