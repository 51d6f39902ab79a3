/**
 * MSI capability (ID 0x05, §10.3): message control with enable, Multiple
 * Message Capable/Enable, 64-bit and per-vector masking; address, data, and
 * with masking the mask and pending bits. The address and data are only
 * stored: delivery goes to the client's eventfd for the vector.
 */
import { IrqIndex } from '../protocol/index.js';
import type { ConfigSpace, ConfigWrite } from './config.js';
import type { MsiCapability } from './description.js';
import { InvalidDeviceError } from './description.js';
import type { Delivery, Interrupts } from './interrupts.js';
import { Msi as MsiReg } from './spec.js';
import { BitArray, MessageVectors } from './vectors.js';

/** Multiple Message Enable, in place. */
const MME_MASK = MsiReg.LOG2_MASK << MsiReg.ENABLED_SHIFT;

const VECTOR_COUNTS = [1, 2, 4, 8, 16, 32];

/** 10, 14, 20 or 24 bytes depending on the 64-bit and masking options. */
export function msiSize(d: MsiCapability): number {
  return (d.address64 ?? true ? 14 : 10) + (d.perVectorMask ? 10 : 0);
}

export function checkMsi(d: MsiCapability, field: string): void {
  if (!VECTOR_COUNTS.includes(d.vectors)) throw new InvalidDeviceError(`${field}.vectors`, `${d.vectors} is not one of ${VECTOR_COUNTS.join(', ')}`);
}

export class Msi {
  readonly vectors: MessageVectors;
  private readonly maskOffset: number | undefined;
  private readonly internalPending: Buffer | undefined;

  constructor(
    private readonly config: ConfigSpace,
    private readonly at: number,
    description: MsiCapability,
    interrupts: Interrupts,
  ) {
    const wide = description.address64 ?? true;
    const count = description.vectors;
    const mmc = Math.log2(count);
    config.define(at + MsiReg.CONTROL, 2,
      (mmc << MsiReg.CAPABLE_SHIFT) | (wide ? MsiReg.ADDRESS_64 : 0) | (description.perVectorMask ? MsiReg.MASKABLE : 0), MsiReg.ENABLE | MME_MASK);
    config.define(at + MsiReg.ADDRESS_LO, 4, 0, 0xfffffffc);
    if (wide) config.define(at + MsiReg.ADDRESS_HI_64, 4, 0, 0xffffffff);
    config.define(at + (wide ? MsiReg.DATA_64 : MsiReg.DATA_32), 2, 0, 0xffff);
    // Without per-vector masking only the client can mask, so pending bits are private.
    let pending: BitArray;
    if (description.perVectorMask) {
      this.maskOffset = at + (wide ? MsiReg.MASK_64 : MsiReg.MASK_32);
      config.define(this.maskOffset, 4, 0, count === 32 ? 0xffffffff : (1 << count) - 1);
      const pendingOffset = at + (wide ? MsiReg.PENDING_64 : MsiReg.PENDING_32);
      pending = new BitArray(config.bytes.subarray(pendingOffset, pendingOffset + 4));
    } else {
      this.internalPending = Buffer.alloc(4);
      pending = new BitArray(this.internalPending);
    }
    this.vectors = new MessageVectors(IrqIndex.MSI, count, interrupts, pending, (v) => this.guestMasked(v));
    config.onWrite({ start: at + MsiReg.CONTROL, end: at + MsiReg.CONTROL + 2, apply: () => this.controlWritten(mmc) });
    if (this.maskOffset !== undefined) {
      config.onWrite({ start: this.maskOffset, end: this.maskOffset + 4, apply: () => this.vectors.release() });
    }
  }

  get enabled(): boolean {
    return (this.config.u16(this.at + MsiReg.CONTROL) & MsiReg.ENABLE) !== 0;
  }

  /** Offset of Message Control in config space (its Enable bit selects the interrupt mode). */
  get control(): number {
    return this.at + MsiReg.CONTROL;
  }

  /** Whether the capability was enabled before `write` (a write hook's view). */
  enabledBefore(write: ConfigWrite): boolean {
    return (write.previous(this.at + MsiReg.CONTROL, 2) & MsiReg.ENABLE) !== 0;
  }

  /** Vectors the guest enabled (Multiple Message Enable). */
  get enabledVectors(): number {
    return 1 << ((this.config.u16(this.at + MsiReg.CONTROL) & MME_MASK) >> MsiReg.ENABLED_SHIFT);
  }

  /**
   * Fires `vector`. With fewer vectors enabled than the device has, events
   * share them: the low bits of the vector number are what the message data
   * can carry (the spec's Multiple Message Enable rule).
   */
  fire(vector: number): Delivery {
    return this.vectors.fire(vector % this.enabledVectors);
  }

  /**
   * Pending bits kept outside config space (MSI without per-vector masking,
   * where only the client can mask), as a u32; 0 when they live in config space.
   */
  get privatePending(): number {
    return this.internalPending?.readUInt32LE(0) ?? 0;
  }

  set privatePending(bits: number) {
    this.internalPending?.writeUInt32LE(bits >>> 0, 0);
  }

  /** Config space is restored by the caller; this forgets privately held pending bits. */
  reset(): void {
    this.internalPending?.fill(0);
  }

  /** Disabled counts as masked, so enabling MSI delivers what was held back. */
  private guestMasked(vector: number): boolean {
    if (!this.enabled) return true;
    return this.maskOffset !== undefined && ((this.config.u32(this.maskOffset) >>> vector) & 1) === 1;
  }

  private controlWritten(mmc: number): void {
    const control = this.config.u16(this.at + MsiReg.CONTROL);
    // Software must not enable more than capable; clamp rather than store a lie.
    if ((control & MME_MASK) >> MsiReg.ENABLED_SHIFT > mmc) this.config.setU16(this.at + MsiReg.CONTROL, (control & ~MME_MASK) | (mmc << MsiReg.ENABLED_SHIFT));
    this.vectors.release();
  }
}
