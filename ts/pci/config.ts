/**
 * PCI configuration space as bytes plus per-byte write semantics. The bytes
 * are the single source of truth: the native layer answers config reads from
 * them directly, so every emulated effect is applied at write time.
 */

/** Offsets of the type-0 header registers (§10.1). */
export const Cfg = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION: 0x08,
  CLASS_PROG_IF: 0x09,
  CACHE_LINE_SIZE: 0x0c,
  LATENCY_TIMER: 0x0d,
  HEADER_TYPE: 0x0e,
  BAR0: 0x10,
  SUBSYSTEM_VENDOR_ID: 0x2c,
  SUBSYSTEM_ID: 0x2e,
  ROM_ADDRESS: 0x30,
  CAPABILITIES: 0x34,
  INTERRUPT_LINE: 0x3c,
  INTERRUPT_PIN: 0x3d,
} as const;

export const Command = {
  IO: 1 << 0,
  MEMORY: 1 << 1,
  BUS_MASTER: 1 << 2,
  PARITY: 1 << 6,
  SERR: 1 << 8,
  INTX_DISABLE: 1 << 10,
} as const;

export const Status = {
  INTX: 1 << 3,
  CAPABILITIES: 1 << 4,
  /** Error bits software clears by writing 1. */
  ERRORS_W1C: 0xf900,
} as const;

/** A write hook: runs after the masked write of any byte in [start, end). */
export interface WriteHook {
  start: number;
  end: number;
  apply(offset: number, data: Buffer, before: Buffer): void;
}

export class ConfigSpace {
  /** The live bytes (shared with the native layer). */
  readonly bytes: Buffer;
  /** Bits software may write. */
  readonly writable: Buffer;
  /** Bits a write of 1 clears. */
  readonly clearOnOne: Buffer;
  private defaults: Buffer | undefined;
  private readonly hooks: WriteHook[] = [];

  constructor(size: 256 | 4096) {
    this.bytes = Buffer.alloc(size);
    this.writable = Buffer.alloc(size);
    this.clearOnOne = Buffer.alloc(size);
  }

  get size(): number {
    return this.bytes.length;
  }

  /** Declares a field: its initial value and which of its bits are RW / RW1C. */
  define(offset: number, width: 1 | 2 | 4, value: number, writableMask = 0, clearOnOneMask = 0): void {
    this.bytes.writeUIntLE(value >>> 0, offset, width);
    this.writable.writeUIntLE(writableMask >>> 0, offset, width);
    this.clearOnOne.writeUIntLE(clearOnOneMask >>> 0, offset, width);
  }

  onWrite(hook: WriteHook): void {
    this.hooks.push(hook);
  }

  /** Remembers the current bytes as the power-on state restored by reset(). */
  seal(): void {
    this.defaults = Buffer.from(this.bytes);
  }

  reset(): void {
    if (this.defaults) this.defaults.copy(this.bytes);
  }

  read(offset: number, count: number): Buffer {
    return Buffer.from(this.bytes.subarray(offset, offset + count));
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
    const end = offset + data.length;
    for (const hook of this.hooks) {
      if (hook.start < end && offset < hook.end) hook.apply(offset, data, before);
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

  /** Sets or clears bits the device itself owns (e.g. INTx status). */
  setBits16(offset: number, bits: number, on: boolean): void {
    const v = this.u16(offset);
    this.bytes.writeUInt16LE(on ? v | bits : v & ~bits, offset);
  }
}
