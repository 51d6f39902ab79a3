/**
 * BARs: their config-space registers (sizing masks, type bits) and their
 * contents: plain memory, the device's handlers, or shared memory the client
 * may mmap in part. Ranges the library serves itself (the MSI-X table and
 * PBA, and the mappable areas of a shared BAR with handlers) are overlays:
 * accesses inside them go to the overlay, the rest to memory or handlers.
 */
import { SharedMemory } from '../dma/shared-memory.js';
import { RegionInfoFlags } from '../protocol/index.js';
import type { RegionDescription, RegionIoFd } from '../device.js';
import type { ConfigSpace } from './config.js';
import {
  encodeValue,
  InvalidDeviceError,
  isPowerOfTwo,
  type BarArea,
  type BarDescription,
  type BarIndex,
} from './description.js';
import { checkIoEventfds, IoEventfd } from './ioeventfds.js';
import type { DeviceContext } from '../boundary.js';
import { checkSharing } from './shared-bar.js';
import { BarBits, Cfg, NUM_BARS, Rom } from './spec.js';

/** A range of a BAR emulated by the library; offsets are relative to `start`. */
export interface BarOverlay {
  start: number;
  end: number;
  read(offset: number, count: number): Buffer;
  write(offset: number, data: Buffer): void;
}

/** A BAR as device code sees it (`PciDevice.bar(index)`). */
export interface PciBar {
  readonly index: BarIndex;
  readonly size: number;
  /**
   * The BAR's memory, for plain-memory and shared BARs (undefined for a BAR
   * whose reads a handler computes and which is not shared). Stores show in
   * guest reads at once; for a shared BAR the client's mappings see the same
   * bytes, so doorbells written by the guest appear here without a message.
   */
  readonly bytes: Uint8Array | undefined;
  /** The memfd behind a shared BAR. */
  readonly shared: SharedMemory | undefined;
  /** The BAR's ioeventfds, in description order. */
  readonly ioeventfds: readonly IoEventfd[];
}

const MAX_IO_BAR = 256;
const MAX_32BIT_BAR = 2 ** 31;

export class Bar implements PciBar {
  readonly bytes: Buffer | undefined;
  readonly shared: SharedMemory | undefined;
  readonly ioeventfds: readonly IoEventfd[];
  /** The REGION_INFO answer, built once: the session asks for it on every access. */
  readonly region: RegionDescription;
  /** The GET_REGION_IO_FDS entries. */
  readonly ioFds: readonly RegionIoFd[];
  private readonly ownsShared: boolean;
  private readonly overlays: BarOverlay[] = [];

  constructor(
    readonly index: BarIndex,
    readonly description: BarDescription,
    /** Areas the client may mmap (shared BARs only). */
    private readonly mappable: readonly BarArea[],
    /** The device's error boundary, which ioeventfd notifications run under. */
    context: DeviceContext,
  ) {
    const shared = description.kind === 'memory' ? description.shared : undefined;
    this.ownsShared = shared === true;
    this.shared = shared === true ? new SharedMemory(description.size, `vfio-user-bar${index}`) : shared;
    this.bytes = this.shared
      ? Buffer.from(this.shared.bytes.buffer, this.shared.bytes.byteOffset, this.shared.size)
      : description.read ? undefined : Buffer.alloc(description.size);
    this.region = this.shared
      ? this.shared.region({ mmap: mappable.map((a) => ({ offset: BigInt(a.offset), size: BigInt(a.size) })) })
      : { size: BigInt(description.size), flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE };
    this.ioeventfds = (description.ioeventfds ?? []).map((e) => new IoEventfd(e, context));
    this.ioFds = this.ioeventfds.map((e) => e.entry(description.kind === 'io'));
    // REGION_READ/WRITE of a mapped area must agree with the client's mapping, so they skip the handlers.
    if (this.shared && (description.read || description.write)) {
      const bytes = this.bytes!;
      for (const a of mappable) {
        this.addOverlay({
          start: a.offset,
          end: a.offset + a.size,
          read: (offset, count) => Buffer.from(bytes.subarray(a.offset + offset, a.offset + offset + count)),
          write: (offset, data) => bytes.set(data, a.offset + offset),
        });
      }
    }
  }

  get size(): number {
    return this.description.size;
  }

  /** The bytes trapped accesses read and store: set when no `read` handler computes them (so reads can be native). */
  get memory(): Buffer | undefined {
    return this.description.read ? undefined : this.bytes;
  }

  addOverlay(overlay: BarOverlay): void {
    this.overlays.push(overlay);
    this.overlays.sort((a, b) => a.start - b.start);
  }

  /**
   * Why [start, end) cannot hold a range the library must see every access
   * to (the MSI-X table and PBA): a mappable area (QEMU traps those ranges
   * itself, other clients would not) or an ioeventfd (its writes never come).
   */
  conflict(start: number, end: number): string | undefined {
    const field = `bars[${this.index}]`;
    const overlaps = (offset: number, size: number) => offset < end && start < offset + Math.max(size, 1);
    const area = this.mappable.findIndex((a) => overlaps(a.offset, a.size));
    if (area >= 0) {
      const description = this.description.kind === 'memory' ? this.description : undefined;
      return description?.mmap ? `${field}.mmap[${area}] is mappable` : `${field} is mappable as a whole (no mmap areas given)`;
    }
    const fd = this.ioeventfds.findIndex((e) => overlaps(e.offset, e.size));
    if (fd >= 0) return `${field}.ioeventfds[${fd}] takes writes there`;
    return undefined;
  }

  read(offset: number, count: number): Uint8Array | Promise<Uint8Array> {
    const pieces = this.split(offset, count).map(({ start, end, overlay }) =>
      overlay ? overlay.read(start - overlay.start, end - start) : this.readPlain(start, end - start));
    if (pieces.length === 1) return pieces[0];
    if (!pieces.some((p) => p instanceof Promise)) return Buffer.concat(pieces as Uint8Array[]);
    return Promise.all(pieces).then((parts) => Buffer.concat(parts));
  }

  write(offset: number, data: Buffer): void | Promise<void> {
    // What KVM would have signalled, had the client wired the eventfd.
    const ioeventfd = this.ioeventfds.find((e) => e.matches(offset, data));
    if (ioeventfd) {
      ioeventfd.signal();
      return;
    }
    const pending: Promise<void>[] = [];
    for (const { start, end, overlay } of this.split(offset, data.length)) {
      const part = data.subarray(start - offset, end - offset);
      if (overlay) {
        overlay.write(start - overlay.start, part);
        continue;
      }
      this.memory?.set(part, start);
      const done = this.description.write?.(start, part);
      if (done instanceof Promise) pending.push(done);
    }
    if (pending.length > 0) return Promise.all(pending).then(() => undefined);
  }

  /** Power-on contents: plain and shared memory is zeroed (overlays restore their own state after). */
  reset(): void {
    this.bytes?.fill(0);
  }

  /** Frees the eventfds and the shared memory the BAR created; a caller's SharedMemory stays open. */
  close(): void {
    for (const e of this.ioeventfds) e.close();
    if (this.ownsShared) this.shared!.close();
  }

  private readPlain(offset: number, count: number): Uint8Array | Promise<Uint8Array> {
    if (this.memory) return Buffer.from(this.memory.subarray(offset, offset + count));
    const value = this.description.read!(offset, count);
    const handler = `bars[${this.index}].read`;
    return value instanceof Promise ? value.then((v) => encodeValue(v, count, handler, offset)) : encodeValue(value, count, handler, offset);
  }

  /** Cuts [offset, offset + count) at overlay boundaries. */
  private split(offset: number, count: number): { start: number; end: number; overlay?: BarOverlay }[] {
    const end = offset + count;
    const pieces: { start: number; end: number; overlay?: BarOverlay }[] = [];
    let at = offset;
    for (const overlay of this.overlays) {
      if (overlay.end <= at || overlay.start >= end) continue;
      if (overlay.start > at) pieces.push({ start: at, end: overlay.start });
      const stop = Math.min(end, overlay.end);
      pieces.push({ start: Math.max(at, overlay.start), end: stop, overlay });
      at = stop;
    }
    if (at < end) pieces.push({ start: at, end });
    return pieces;
  }
}

/** Checks the BAR descriptions and defines their registers; returns the BARs by slot. */
export function defineBars(config: ConfigSpace, bars: Partial<Record<BarIndex, BarDescription>>, context: DeviceContext): (Bar | undefined)[] {
  const checked: { index: BarIndex; bar: BarDescription; mappable: BarArea[] }[] = [];
  for (let i = 0; i < NUM_BARS; i++) {
    const bar = bars[i as BarIndex];
    if (!bar) continue;
    const field = `bars[${i}]`;
    const upperOf = i > 0 ? bars[(i - 1) as BarIndex] : undefined;
    if (upperOf?.kind === 'memory' && upperOf.width === 64) {
      throw new InvalidDeviceError(field, `slot ${i} is the upper half of the 64-bit BAR${i - 1}`);
    }
    if (bar.kind !== 'io' && bar.kind !== 'memory') {
      throw new InvalidDeviceError(`${field}.kind`, `${String((bar as { kind: unknown }).kind)} is neither 'io' nor 'memory'`);
    }
    const min = bar.kind === 'io' ? 4 : 16;
    if (!isPowerOfTwo(bar.size) || bar.size < min) {
      throw new InvalidDeviceError(`${field}.size`, `${bar.size} is not a power of two of at least ${min}`);
    }
    const offset = Cfg.BAR0 + 4 * i;
    if (bar.kind === 'io') {
      if (bar.size > MAX_IO_BAR) throw new InvalidDeviceError(`${field}.size`, `I/O BARs are at most ${MAX_IO_BAR} bytes`);
      config.define(offset, 4, BarBits.IO_SPACE, ~(bar.size - 1) & BarBits.IO_ADDRESS_MASK);
    } else {
      if (bar.width !== undefined && bar.width !== 32 && bar.width !== 64) {
        throw new InvalidDeviceError(`${field}.width`, `${String(bar.width)} is neither 32 nor 64`);
      }
      const wide = bar.width === 64;
      if (wide && i === 5) throw new InvalidDeviceError(`${field}.width`, 'a 64-bit BAR cannot sit in BAR5 (it needs BAR6 as its upper half)');
      if (!wide && bar.size > MAX_32BIT_BAR) throw new InvalidDeviceError(`${field}.size`, '32-bit BARs are at most 2 GiB');
      const type = (wide ? BarBits.MEM_TYPE_64 << BarBits.MEM_TYPE_SHIFT : 0) | (bar.prefetchable ? BarBits.MEM_PREFETCHABLE : 0);
      // Address bits above the size are writable; sizing reads back ~(size - 1), both halves.
      const sizeMask = BigInt.asUintN(64, ~(BigInt(bar.size) - 1n));
      config.define(offset, 4, type, Number(sizeMask & BigInt(BarBits.MEM_ADDRESS_MASK)));
      if (wide) config.define(offset + 4, 4, 0, Number(sizeMask >> 32n));
    }
    const mappable = checkSharing(bar, field);
    checkIoEventfds(bar.ioeventfds, `${field}.ioeventfds`, bar.size, mappable);
    checked.push({ index: i as BarIndex, bar, mappable });
  }
  // Created only once every BAR is valid: a later bad one must not leak memfds and eventfds.
  const out: (Bar | undefined)[] = new Array(NUM_BARS).fill(undefined);
  for (const { index, bar, mappable } of checked) out[index] = new Bar(index, bar, mappable, context);
  return out;
}

/** The ROM BAR's address bits start at bit 11 (§10.2). */
const MIN_ROM = 2048;

/** Pads the ROM image to its BAR size and defines the ROM BAR register. */
export function defineRom(config: ConfigSpace, image: Uint8Array): Buffer {
  const size = Math.max(MIN_ROM, 2 ** Math.ceil(Math.log2(Math.max(1, image.length))));
  const rom = Buffer.alloc(size);
  rom.set(image);
  config.define(Cfg.ROM_ADDRESS, 4, 0, (~(size - 1) & Rom.ADDRESS_MASK) | Rom.ENABLE);
  return rom;
}
