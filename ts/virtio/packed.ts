/**
 * The packed virtqueue (§2.8) over zero-copy views of guest memory: one
 * descriptor ring the driver and the device both write, and an event
 * suppression structure for each side. A descriptor is available when its
 * AVAIL bit equals the device's avail wrap counter and its USED bit does
 * not; the device writes used entries over descriptors it has read, in the
 * order it completes them, each skipping the entries its chain took.
 * Everything read from the ring is checked before use.
 */
import type { DmaSpace } from '../dma/space.js';
import { UsageError } from '../errors.js';
import { ChainWalk, reviveChain, type DescriptorChain, type SavedChain, type WalkSource } from './chain.js';
import { ringView, type Ring, type RingLayout } from './ring.js';
import { Desc, EventSuppress, PackedDesc } from './spec.js';

/** Alignments §2.8.10.1 requires of the three parts. */
export const PACKED_ALIGN = { desc: 16n, driver: 4n, device: 4n } as const;

/** A position as migration saves it and off_wrap encodes it: the index, and the wrap counter in bit 15. */
const position = (index: number, wrap: boolean) => index | (wrap ? EventSuppress.WRAP : 0);

/** Whether a descriptor's flags say "available" to a reader whose wrap counter is `wrap`: AVAIL equal to it, USED not. */
const available = (flags: number, wrap: boolean) => (flags & (PackedDesc.F_AVAIL | PackedDesc.F_USED)) === (wrap ? PackedDesc.F_AVAIL : PackedDesc.F_USED);

/** u16 index of descriptor `index`'s flags in the ring. */
const flagsAt = (index: number) => (index * Desc.SIZE + PackedDesc.FLAGS) / 2;

export class PackedRing implements Ring {
  /** Next descriptor to read, and the device's avail wrap counter (wrap counters start at 1, §2.8.1). */
  private availIdx = 0;
  private availWrap = true;
  /** Next descriptor to write a used entry over, and the used wrap counter. */
  private usedIdx = 0;
  private usedWrap = true;
  /** The used position (0 to 2 * size - 1, counting laps) the driver was last told about. */
  private publishedUsed = 0;
  private unpublished = false;
  /** Ring entries each buffer ID in flight took; 0: not in flight. */
  private readonly inFlight: Uint16Array;
  private memory: DmaSpace | undefined;
  private ring!: DataView;
  /** The ring as u16s: flags are loaded and stored with Atomics, ordering the rest of a descriptor. */
  private ringU16!: Uint16Array;
  private driverEvent!: Uint16Array;
  private deviceEvent!: Uint16Array;
  /** What walks read: made with the views, not per chain. */
  private source!: WalkSource;

  constructor(readonly layout: RingLayout) {
    this.inFlight = new Uint16Array(layout.size);
  }

  get availPosition(): number {
    return position(this.availIdx, this.availWrap);
  }

  get usedPosition(): number {
    return position(this.usedIdx, this.usedWrap);
  }

  restore(availPosition: number, usedPosition: number, held: readonly SavedChain[]): void {
    this.availIdx = availPosition & ~EventSuppress.WRAP;
    this.availWrap = (availPosition & EventSuppress.WRAP) !== 0;
    this.usedIdx = usedPosition & ~EventSuppress.WRAP;
    this.usedWrap = (usedPosition & EventSuppress.WRAP) !== 0;
    this.publishedUsed = this.usedLap();
    this.inFlight.fill(0);
    for (const chain of held) this.inFlight[chain.id] = chain.slots;
  }

  revive(saved: SavedChain): DescriptorChain {
    return reviveChain(this.source, saved);
  }

  /** Views of an unmapped window are detached: made again then. */
  attach(memory: DmaSpace): void {
    if (this.memory === memory && this.ring.byteLength !== 0 && this.driverEvent.byteLength !== 0 && this.deviceEvent.byteLength !== 0) return;
    const { size, queue } = this.layout;
    const ring = ringView(memory, queue, this.layout.desc, size * Desc.SIZE, 'descriptor ring');
    const driver = ringView(memory, queue, this.layout.driver, EventSuppress.SIZE, 'driver event suppression area');
    const device = ringView(memory, queue, this.layout.device, EventSuppress.SIZE, 'device event suppression area');
    this.ring = new DataView(ring.buffer, ring.byteOffset, ring.byteLength);
    this.ringU16 = new Uint16Array(ring.buffer, ring.byteOffset, ring.byteLength / 2);
    this.driverEvent = new Uint16Array(driver.buffer, driver.byteOffset, 2);
    this.deviceEvent = new Uint16Array(device.buffer, device.byteOffset, 2);
    this.memory = memory;
    this.source = { ...this.layout, memory };
  }

  /**
   * The chain whose first descriptor is the next one, when the driver made it
   * available. Each later descriptor of the chain must be available in its own
   * lap too (§2.8.6: the driver sets every descriptor's flags), the chain may
   * not be longer than the ring, and its buffer ID (in the last descriptor)
   * must be below the queue size and not in flight already.
   */
  pop(): DescriptorChain | undefined {
    const { size } = this.layout;
    const start = this.availIdx;
    let flags = Atomics.load(this.ringU16, flagsAt(start));
    if (!available(flags, this.availWrap)) return undefined;
    const walk = new ChainWalk(this.source, start);
    let index = start;
    let wrap = this.availWrap;
    let slots = 1;
    for (;;) {
      const at = index * Desc.SIZE;
      const addr = this.ring.getBigUint64(at + Desc.ADDR, true);
      const len = this.ring.getUint32(at + Desc.LEN, true);
      if (flags & Desc.F_INDIRECT) {
        this.walkTable(walk, walk.table(addr, len, flags, index));
        break;
      }
      walk.buffer(addr, len, (flags & Desc.F_WRITE) !== 0, index);
      if (!(flags & Desc.F_NEXT)) break;
      if (slots === size) walk.fail(`chain at descriptor ${start} is longer than the queue size ${size}`);
      if (++index === size) {
        index = 0;
        wrap = !wrap;
      }
      flags = this.ring.getUint16(index * Desc.SIZE + PackedDesc.FLAGS, true);
      if (!available(flags, wrap)) walk.fail(`descriptor ${index} continues the chain at ${start} but is not available in wrap ${wrap ? 1 : 0} (flags 0x${flags.toString(16)})`);
      slots++;
    }
    const id = this.ring.getUint16(index * Desc.SIZE + PackedDesc.ID, true);
    if (id >= size) walk.fail(`buffer id ${id} is past the queue size ${size}`);
    if (this.inFlight[id] !== 0) walk.fail(`buffer id ${id} is already in flight`);
    this.inFlight[id] = slots;
    this.availIdx = start + slots;
    if (this.availIdx >= size) {
      this.availIdx -= size;
      this.availWrap = !this.availWrap;
    }
    return walk.chain(id, slots);
  }

  /** An indirect table in packed form: every entry in order, WRITE the only flag that counts (§2.8.8). */
  private walkTable(walk: ChainWalk, table: DataView): void {
    const entries = table.byteLength / Desc.SIZE;
    for (let i = 0; i < entries; i++) {
      const at = i * Desc.SIZE;
      const flags = table.getUint16(at + PackedDesc.FLAGS, true);
      if (flags & Desc.F_INDIRECT) walk.fail(`descriptor ${i} of an indirect table is indirect again (nested)`);
      walk.buffer(table.getBigUint64(at + Desc.ADDR, true), table.getUint32(at + Desc.LEN, true), (flags & Desc.F_WRITE) !== 0, i);
    }
  }

  /** Writes the used entry over the next descriptor (flags last) and skips the entries the chain took. */
  push(chain: DescriptorChain, written: number): void {
    if (this.inFlight[chain.head] !== chain.slots) throw new UsageError(`queue ${this.layout.queue}: buffer id ${chain.head} is not in flight (completed twice?)`);
    const at = this.usedIdx * Desc.SIZE;
    this.ring.setUint32(at + Desc.LEN, written, true);
    this.ring.setUint16(at + PackedDesc.ID, chain.head, true);
    const used = this.usedWrap ? PackedDesc.F_AVAIL | PackedDesc.F_USED : 0;
    Atomics.store(this.ringU16, flagsAt(this.usedIdx), used | (written > 0 ? Desc.F_WRITE : 0));
    this.inFlight[chain.head] = 0;
    this.usedIdx += chain.slots;
    if (this.usedIdx >= this.layout.size) {
      this.usedIdx -= this.layout.size;
      this.usedWrap = !this.usedWrap;
    }
    this.unpublished = true;
  }

  /**
   * Used entries are visible as they are pushed; this decides the interrupt
   * by the driver's event suppression: ENABLE, DISABLE, or (with EVENT_IDX)
   * DESC: when a used entry was written at its off_wrap since the last time.
   */
  publish(): boolean {
    if (!this.unpublished) return false;
    this.unpublished = false;
    const old = this.publishedUsed;
    const now = (this.publishedUsed = this.usedLap());
    // The used flags were stored first (sequentially consistent): the driver's choice is read after.
    const flags = Atomics.load(this.driverEvent, EventSuppress.FLAGS / 2) & 3;
    if (flags === EventSuppress.DISABLE) return false;
    if (flags !== EventSuppress.DESC || !this.layout.eventIdx) return true;
    const offWrap = Atomics.load(this.driverEvent, EventSuppress.OFF_WRAP / 2);
    const lap = 2 * this.layout.size;
    const event = ((offWrap & ~EventSuppress.WRAP) + (offWrap & EventSuppress.WRAP ? 0 : this.layout.size)) % lap;
    return (event - old + lap) % lap < (now - old + lap) % lap;
  }

  notifications(quiet: boolean): boolean {
    if (quiet) {
      Atomics.store(this.deviceEvent, EventSuppress.FLAGS / 2, EventSuppress.DISABLE);
      return false;
    }
    if (this.layout.eventIdx) {
      Atomics.store(this.deviceEvent, EventSuppress.OFF_WRAP / 2, this.availPosition);
      Atomics.store(this.deviceEvent, EventSuppress.FLAGS / 2, EventSuppress.DESC);
    } else {
      Atomics.store(this.deviceEvent, EventSuppress.FLAGS / 2, EventSuppress.ENABLE);
    }
    // The stores above are seen before this load (Atomics are sequentially consistent).
    return available(Atomics.load(this.ringU16, flagsAt(this.availIdx)), this.availWrap);
  }

  /** The used position counting laps: 0 to 2 * size - 1, as off_wrap compares. */
  private usedLap(): number {
    return this.usedIdx + (this.usedWrap ? 0 : this.layout.size);
  }
}
