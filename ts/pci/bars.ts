/**
 * BARs: their config-space registers (sizing masks, type bits) and their
 * contents, either plain memory or the device's handlers. Ranges the library
 * emulates itself (the MSI-X table and PBA) are overlays: accesses inside
 * them go to the emulation, the rest to memory or the handlers.
 */
import { Cfg, type ConfigSpace } from './config.js';
import {
  encodeValue,
  InvalidDeviceError,
  isPowerOfTwo,
  type BarDescription,
  type BarIndex,
} from './description.js';

/** A range of a BAR emulated by the library; offsets are relative to `start`. */
export interface BarOverlay {
  start: number;
  end: number;
  read(offset: number, count: number): Buffer;
  write(offset: number, data: Buffer): void;
}

/** Memory BAR type bits (§10.2). */
const MEMORY_64 = 0x4;
const PREFETCHABLE = 0x8;
const IO_SPACE = 0x1;
const MAX_IO_BAR = 256;
const MAX_32BIT_BAR = 2 ** 31;

export class Bar {
  /** Backing bytes for BARs read without a handler (shared with the native layer). */
  readonly memory: Buffer | undefined;
  private readonly overlays: BarOverlay[] = [];

  constructor(readonly description: BarDescription) {
    this.memory = description.read ? undefined : Buffer.alloc(description.size);
  }

  get size(): number {
    return this.description.size;
  }

  addOverlay(overlay: BarOverlay): void {
    this.overlays.push(overlay);
    this.overlays.sort((a, b) => a.start - b.start);
  }

  read(offset: number, count: number): Uint8Array | Promise<Uint8Array> {
    const pieces = this.split(offset, count).map(({ start, end, overlay }) =>
      overlay ? overlay.read(start - overlay.start, end - start) : this.readPlain(start, end - start));
    if (pieces.length === 1) return pieces[0];
    if (!pieces.some((p) => p instanceof Promise)) return Buffer.concat(pieces as Uint8Array[]);
    return Promise.all(pieces).then((parts) => Buffer.concat(parts));
  }

  write(offset: number, data: Buffer): void | Promise<void> {
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

  /** Power-on contents: memory BARs are zeroed (overlays restore their own state after). */
  reset(): void {
    this.memory?.fill(0);
  }

  private readPlain(offset: number, count: number): Uint8Array | Promise<Uint8Array> {
    if (this.memory) return Buffer.from(this.memory.subarray(offset, offset + count));
    const value = this.description.read!(offset, count);
    return value instanceof Promise ? value.then((v) => encodeValue(v, count)) : encodeValue(value, count);
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
export function defineBars(config: ConfigSpace, bars: Partial<Record<BarIndex, BarDescription>>): (Bar | undefined)[] {
  const out: (Bar | undefined)[] = new Array(6).fill(undefined);
  for (let i = 0; i < 6; i++) {
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
      config.define(offset, 4, IO_SPACE, ~(bar.size - 1) & 0xfffffffc);
    } else {
      if (bar.width !== undefined && bar.width !== 32 && bar.width !== 64) {
        throw new InvalidDeviceError(`${field}.width`, `${String(bar.width)} is neither 32 nor 64`);
      }
      const wide = bar.width === 64;
      if (wide && i === 5) throw new InvalidDeviceError(`${field}.width`, 'a 64-bit BAR cannot sit in BAR5 (it needs BAR6 as its upper half)');
      if (!wide && bar.size > MAX_32BIT_BAR) throw new InvalidDeviceError(`${field}.size`, '32-bit BARs are at most 2 GiB');
      const type = (wide ? MEMORY_64 : 0) | (bar.prefetchable ? PREFETCHABLE : 0);
      // Address bits above the size are writable; sizing reads back ~(size - 1), both halves.
      const sizeMask = BigInt.asUintN(64, ~(BigInt(bar.size) - 1n));
      config.define(offset, 4, type, Number(sizeMask & 0xfffffff0n));
      if (wide) config.define(offset + 4, 4, 0, Number(sizeMask >> 32n));
    }
    out[i] = new Bar(bar);
  }
  return out;
}

/** ROM BAR: address bits 31:11 above the size, and the enable bit (§10.2). */
const ROM_ADDRESS_MASK = 0xfffff800;
const ROM_ENABLE = 0x1;
const MIN_ROM = 2048;

/** Pads the ROM image to its BAR size and defines the ROM BAR register. */
export function defineRom(config: ConfigSpace, image: Uint8Array): Buffer {
  const size = Math.max(MIN_ROM, 2 ** Math.ceil(Math.log2(Math.max(1, image.length))));
  const rom = Buffer.alloc(size);
  rom.set(image);
  config.define(Cfg.ROM_ADDRESS, 4, 0, (~(size - 1) & ROM_ADDRESS_MASK) | ROM_ENABLE);
  return rom;
}
