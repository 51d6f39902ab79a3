/**
 * The split virtqueue (§2.7) over zero-copy views of guest memory: the
 * descriptor table and both rings are views the device reads and writes in
 * place. Indices are u16 and wrap; everything read from the rings is checked
 * before use.
 */
import type { DmaSpace } from '../dma/space.js';
import { reviveChain, VirtqueueError, walkChain, type ChainSource, type DescriptorChain, type SavedChain } from './chain.js';
import { ringView, type Ring as VirtqueueRing, type RingLayout } from './ring.js';
import { Desc, Ring } from './spec.js';

/** Alignments §2.7 requires of the three parts. */
export const SPLIT_ALIGN = { desc: 16n, driver: 2n, device: 4n } as const;

export class SplitRing implements VirtqueueRing {
  /** Next available-ring entry to take. */
  private lastAvail = 0;
  /** Next used-ring entry to fill (published when the batch is flushed). */
  private usedIdx = 0;
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
  /** What walks read: made with the views, not per chain. */
  private source!: ChainSource;

  constructor(readonly layout: RingLayout) {}

  get availPosition(): number {
    return this.lastAvail;
  }

  get usedPosition(): number {
    return this.usedIdx;
  }

  /** Picks up the indices the used ring shows; held chains need no bookkeeping here. */
  restore(lastAvail: number, usedIdx: number): void {
    this.lastAvail = this.seenAvail = lastAvail;
    this.usedIdx = this.publishedUsed = usedIdx;
  }

  revive(saved: SavedChain): DescriptorChain {
    return reviveChain(this.source, saved);
  }

  /** Views of an unmapped window are detached: made again then. */
  attach(memory: DmaSpace): void {
    if (this.memory === memory && this.table.byteLength !== 0 && this.avail.byteLength !== 0 && this.used.byteLength !== 0) return;
    const { size, queue } = this.layout;
    const view = (iova: bigint, length: number, what: string) => ringView(memory, queue, iova, length, what);
    const table = view(this.layout.desc, size * Desc.SIZE, 'descriptor table');
    const avail = view(this.layout.driver, Ring.ENTRIES + 2 * size + 2, 'available ring');
    const used = view(this.layout.device, Ring.ENTRIES + Ring.USED_ELEM_SIZE * size + 2, 'used ring');
    this.table = new DataView(table.buffer, table.byteOffset, table.byteLength);
    this.avail = new DataView(avail.buffer, avail.byteOffset, avail.byteLength);
    this.availIdx = new Uint16Array(avail.buffer, avail.byteOffset + Ring.IDX, 1);
    this.used = new DataView(used.buffer, used.byteOffset, used.byteLength);
    this.usedU16 = new Uint16Array(used.buffer, used.byteOffset, used.byteLength / 2);
    this.memory = memory;
    this.source = { ...this.layout, table: this.table, memory };
  }

  pop(): DescriptorChain | undefined {
    if (this.seenAvail === this.lastAvail) this.loadAvail();
    if (this.seenAvail === this.lastAvail) return undefined;
    const head = this.avail.getUint16(Ring.ENTRIES + 2 * (this.lastAvail % this.layout.size), true);
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    return walkChain(this.source, head);
  }

  /** Fills the next used entry; the driver sees it when `publish()` moves the index. */
  push(chain: DescriptorChain, written: number): void {
    const at = Ring.ENTRIES + Ring.USED_ELEM_SIZE * (this.usedIdx % this.layout.size);
    this.used.setUint32(at, chain.head, true);
    this.used.setUint32(at + 4, written, true);
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
  }

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
