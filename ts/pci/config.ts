/**
 * PCI configuration space as bytes plus per-byte write semantics. The bytes
 * are the single source of truth: the native layer answers config reads from
 * them directly, so every emulated effect is applied at write time.
 */
import type { CONFIG_SIZE, EXTENDED_CONFIG_SIZE } from './spec.js';

/** One guest write, as write hooks see it: the raw bytes and the register values before. */
export class ConfigWrite {
  constructor(
    readonly offset: number,
    readonly data: Buffer,
    private readonly before: Buffer,
    private readonly current: Buffer,
  ) {}

  get end(): number {
    return this.offset + this.data.length;
  }

  touches(start: number, width: number): boolean {
    return start < this.end && this.offset < start + width;
  }

  /** The register [at, at + width) as it was before the write. */
  previous(at: number, width: 1 | 2 | 4): number {
    let value = 0;
    for (let i = width - 1; i >= 0; i--) {
      const o = at + i;
      const inside = o >= this.offset && o < this.end;
      value = value * 256 + (inside ? this.before[o - this.offset] : this.current[o]);
    }
    return value;
  }

  /**
   * The bits the guest wrote to [at, at + width), unmasked (bytes it did not
   * write read as 0): for command bits that are acted on but never stored.
   */
  written(at: number, width: 1 | 2 | 4): number {
    let value = 0;
    for (let i = width - 1; i >= 0; i--) {
      const o = at + i;
      value = value * 256 + (o >= this.offset && o < this.end ? this.data[o - this.offset] : 0);
    }
    return value;
  }
}

/** Runs after the masked store of a write touching [start, end). */
export interface WriteHook {
  start: number;
  end: number;
  apply(write: ConfigWrite): void;
}

/** Refreshes bytes in [start, end) before a read overlapping them is answered. */
export interface ReadHook {
  start: number;
  end: number;
  refresh(offset: number, count: number): void;
}

export class ConfigSpace {
  /** The live bytes (shared with the native layer). */
  readonly bytes: Buffer;
  /** Bits software may write. */
  readonly writable: Buffer;
  /** Bits a write of 1 clears. */
  readonly clearOnOne: Buffer;
  /**
   * Bits reset() leaves alone: sticky registers (RWS, RW1CS) and the fields
   * PCIe §6.6.2 says an FLR does not modify (Max_Payload_Size, link control).
   */
  readonly keptOnReset: Buffer;
  private defaults: Buffer | undefined;
  private readonly writeHooks: WriteHook[] = [];
  private readonly readHooks: ReadHook[] = [];

  constructor(size: typeof CONFIG_SIZE | typeof EXTENDED_CONFIG_SIZE) {
    this.bytes = Buffer.alloc(size);
    this.writable = Buffer.alloc(size);
    this.clearOnOne = Buffer.alloc(size);
    this.keptOnReset = Buffer.alloc(size);
  }

  get size(): number {
    return this.bytes.length;
  }

  /** Whether some reads need JS (a read hook exists), so reads cannot be answered natively. */
  get hasReadHooks(): boolean {
    return this.readHooks.length > 0;
  }

  /** Declares a field: its initial value and which of its bits are RW / RW1C. */
  define(offset: number, width: 1 | 2 | 4, value: number, writableMask = 0, clearOnOneMask = 0): void {
    this.bytes.writeUIntLE(value >>> 0, offset, width);
    this.writable.writeUIntLE(writableMask >>> 0, offset, width);
    this.clearOnOne.writeUIntLE(clearOnOneMask >>> 0, offset, width);
  }

  /** Declares a run of bytes and, byte for byte, which bits are RW. */
  defineBytes(offset: number, value: Uint8Array, writableMask?: Uint8Array): void {
    this.bytes.set(value, offset);
    if (writableMask) this.writable.set(writableMask, offset);
  }

  /**
   * Marks bits of [offset, offset + width) as surviving reset(): sticky
   * registers and fields an FLR does not modify. Their power-on value is
   * what define() set.
   */
  keepOnReset(offset: number, width: 1 | 2 | 4, mask: number): void {
    const bits = Buffer.alloc(width);
    bits.writeUIntLE(mask >>> 0, 0, width);
    for (let i = 0; i < width; i++) this.keptOnReset[offset + i] |= bits[i];
  }

  onWrite(hook: WriteHook): void {
    this.writeHooks.push(hook);
  }

  onRead(hook: ReadHook): void {
    this.readHooks.push(hook);
  }

  /** Remembers the current bytes as the power-on state restored by reset(). */
  seal(): void {
    this.defaults = Buffer.from(this.bytes);
  }

  /**
   * Every reset the model has (DEVICE_RESET, FLR, D3hot to D0 soft reset):
   * the power-on bytes, except the bits marked by keepOnReset(), which keep
   * their current value (only a cold, power-on reset would clear them).
   */
  reset(): void {
    const defaults = this.defaults;
    if (!defaults) return;
    for (let i = 0; i < defaults.length; i++) {
      const keep = this.keptOnReset[i];
      this.bytes[i] = keep === 0 ? defaults[i] : (defaults[i] & ~keep) | (this.bytes[i] & keep);
    }
  }

  /**
   * What fixes the layout of this config space: the power-on bytes and the
   * RW and RW1C masks. Two devices with equal layouts come from equivalent
   * descriptions (IDs, capabilities and their places, BAR types and sizes).
   */
  layout(): Buffer {
    return Buffer.concat([this.defaults ?? this.bytes, this.writable, this.clearOnOne]);
  }

  read(offset: number, count: number): Buffer {
    const end = offset + count;
    for (const hook of this.readHooks) {
      if (hook.start < end && offset < hook.end) hook.refresh(offset, count);
    }
    return Buffer.from(this.bytes.subarray(offset, end));
  }

  /** A guest write of any width at any offset: masked per byte, then hooks. */
  write(offset: number, data: Buffer): void {
    const before = Buffer.from(this.bytes.subarray(offset, offset + data.length));
    for (let i = 0; i < data.length; i++) {
      const at = offset + i;
      const rw = this.writable[at];
      const w1c = this.clearOnOne[at];
      this.bytes[at] = ((this.bytes[at] & ~rw) | (data[i] & rw)) & ~(data[i] & w1c);
    }
    const write = new ConfigWrite(offset, data, before, this.bytes);
    for (const hook of this.writeHooks) {
      if (hook.start < write.end && offset < hook.end) hook.apply(write);
    }
  }

  u8(offset: number): number {
    return this.bytes[offset];
  }

  u16(offset: number): number {
    return this.bytes.readUInt16LE(offset);
  }

  u32(offset: number): number {
    return this.bytes.readUInt32LE(offset);
  }

  /** Device-side stores that bypass the guest's write masks (status bits, state). */
  setU16(offset: number, value: number): void {
    this.bytes.writeUInt16LE(value & 0xffff, offset);
  }

  setBits16(offset: number, bits: number, on: boolean): void {
    const v = this.u16(offset);
    this.setU16(offset, on ? v | bits : v & ~bits);
  }
}
