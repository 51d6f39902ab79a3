/**
 * MSI capability (ID 0x05, §10.3): message control with enable, Multiple
 * Message Capable/Enable, 64-bit and per-vector masking; address, data, and
 * with masking the mask and pending bits. The address and data are only
 * stored: delivery goes to the client's eventfd for the vector.
 */
import { IrqIndex } from '../protocol/index.js';
import type { ConfigSpace } from './config.js';
import type { MsiCapability } from './description.js';
import { InvalidDeviceError } from './description.js';
import type { Delivery, Interrupts } from './interrupts.js';
import { BitArray, MessageVectors } from './vectors.js';

const CONTROL = 2;
const ADDRESS_LO = 4;
const ENABLE = 1 << 0;
const MMC_SHIFT = 1;
const MME_SHIFT = 4;
const MME_MASK = 0x7 << MME_SHIFT;
const ADDRESS_64 = 1 << 7;
const PER_VECTOR_MASK = 1 << 8;

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
    config.define(at + CONTROL, 2, (mmc << MMC_SHIFT) | (wide ? ADDRESS_64 : 0) | (description.perVectorMask ? PER_VECTOR_MASK : 0), ENABLE | MME_MASK);
    config.define(at + ADDRESS_LO, 4, 0, 0xfffffffc);
    if (wide) config.define(at + ADDRESS_LO + 4, 4, 0, 0xffffffff);
    const data = at + (wide ? 12 : 8);
    config.define(data, 2, 0, 0xffff);
    // Without per-vector masking only the client can mask, so pending bits are private.
    let pending: BitArray;
    if (description.perVectorMask) {
      this.maskOffset = data + 4;
      config.define(this.maskOffset, 4, 0, count === 32 ? 0xffffffff : (1 << count) - 1);
      pending = new BitArray(config.bytes.subarray(this.maskOffset + 4, this.maskOffset + 8));
    } else {
      this.internalPending = Buffer.alloc(4);
      pending = new BitArray(this.internalPending);
    }
    this.vectors = new MessageVectors(IrqIndex.MSI, count, interrupts, pending, (v) => this.guestMasked(v));
    config.onWrite({ start: at + CONTROL, end: at + CONTROL + 2, apply: () => this.controlWritten(mmc) });
    if (this.maskOffset !== undefined) {
      config.onWrite({ start: this.maskOffset, end: this.maskOffset + 4, apply: () => this.vectors.release() });
    }
  }

  get enabled(): boolean {
    return (this.config.u16(this.at + CONTROL) & ENABLE) !== 0;
  }

  /** Vectors the guest enabled (Multiple Message Enable). */
  get enabledVectors(): number {
    return 1 << ((this.config.u16(this.at + CONTROL) & MME_MASK) >> MME_SHIFT);
  }

  /**
   * Fires `vector`. With fewer vectors enabled than the device has, events
   * share them: the low bits of the vector number are what the message data
   * can carry (the spec's Multiple Message Enable rule).
   */
  fire(vector: number): Delivery {
    return this.vectors.fire(vector % this.enabledVectors);
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
    const control = this.config.u16(this.at + CONTROL);
    // Software must not enable more than capable; clamp rather than store a lie.
    if ((control & MME_MASK) >> MME_SHIFT > mmc) this.config.setU16(this.at + CONTROL, (control & ~MME_MASK) | (mmc << MME_SHIFT));
    this.vectors.release();
  }
}
