/**
 * A 16-in/16-out GPIO card modelled on the ACCES PCI-IDIO-16 (vendor 0x494f,
 * device 0x0dc8), so software written for the real card (Linux's
 * gpio-pci-idio-16 driver) can drive it. Its registers sit in I/O BAR2:
 *
 *   +0  outputs 0-7      read back what was written
 *   +1  inputs 0-7       a write clears the pending interrupt
 *   +2  IRQ control      a read enables the change interrupt, a write disables it
 *   +3  input filters    a read activates them, a write deactivates them
 *   +4  outputs 8-15     read back what was written
 *   +5  inputs 8-15
 *   +6  IRQ status       bit 0/1: inputs 0-7/8-15 changed, bit 2: interrupt pending
 *
 * Reads of +2 and +3 have side effects, so BAR2 is handled in TS (the other
 * end of the benchmark from config space, which is answered natively).
 * The registers live in fields, so the card migrates them through the
 * `saveState`/`loadState` hooks; the library migrates the rest.
 */
import { PciDevice } from 'vfio-user';

export const IDIO16 = {
  OUT0_7: 0,
  IN0_7: 1,
  IRQ_CTL: 2,
  FILTER_CTL: 3,
  OUT8_15: 4,
  IN8_15: 5,
  IRQ_STATUS: 6,
} as const;

export class PciIdio16 extends PciDevice {
  private out = [0, 0];
  private inputs = 0;
  private irqEnabled = false;
  private filtersActive = false;
  /** Bits 0/1: which input group changed since the last clear. */
  private changed = 0;

  constructor() {
    super({
      vendorId: 0x494f,
      deviceId: 0x0dc8,
      subsystemVendorId: 0x494f,
      subsystemId: 0x0dc8,
      // Signal processing controller, "other": what a digital I/O card reports.
      classCode: 0x118000,
      intx: 'A',
      bars: {
        2: {
          kind: 'io',
          size: 8,
          read: (offset, size) => this.readRegisters(offset, size),
          write: (offset, data) => data.forEach((byte, i) => this.writeRegister(offset + i, byte)),
        },
      },
      onReset: () => {
        this.out = [0, 0];
        this.irqEnabled = false;
        this.filtersActive = false;
        this.changed = 0;
      },
      // The registers live in fields: they travel in saveState (config space,
      // the INTx line and the rest are the library's).
      migration: {
        saveState: () => this.saveRegisters(),
        loadState: (data) => this.loadRegisters(data),
      },
    });
  }

  /** Version 1: out 0-7, out 8-15, inputs (u16), flags (1 IRQ enabled, 2 filters), changed. */
  private saveRegisters(): Uint8Array {
    const flags = (this.irqEnabled ? 1 : 0) | (this.filtersActive ? 2 : 0);
    return Uint8Array.of(1, this.out[0], this.out[1], this.inputs & 0xff, this.inputs >> 8, flags, this.changed);
  }

  /** Checks everything before changing anything, as the hook must. */
  private loadRegisters(data: Uint8Array): void {
    if (data.length !== 7 || data[0] !== 1) throw new Error(`not version-1 PCI-IDIO-16 registers (${data.length} bytes)`);
    if (data[5] & ~3 || data[6] & ~3) throw new Error('PCI-IDIO-16 registers: reserved bits set');
    this.out = [data[1], data[2]];
    this.inputs = data[3] | (data[4] << 8);
    this.irqEnabled = (data[5] & 1) !== 0;
    this.filtersActive = (data[5] & 2) !== 0;
    this.changed = data[6];
  }

  /** The 16 output lines as the guest last drove them. */
  get outputs(): number {
    return this.out[0] | (this.out[1] << 8);
  }

  get interruptEnabled(): boolean {
    return this.irqEnabled;
  }

  get filtersEnabled(): boolean {
    return this.filtersActive;
  }

  /** Drives the 16 input lines (the outside world); a change may interrupt. */
  setInputs(value: number): void {
    const next = value & 0xffff;
    const diff = next ^ this.inputs;
    this.inputs = next;
    // With the change interrupt disabled nothing is latched.
    if (!diff || !this.irqEnabled) return;
    this.changed |= (diff & 0xff ? 1 : 0) | (diff & 0xff00 ? 2 : 0);
    this.irq.raise();
  }

  private readRegisters(offset: number, size: number): Uint8Array {
    const out = new Uint8Array(size);
    for (let i = 0; i < size; i++) out[i] = this.readRegister(offset + i);
    return out;
  }

  private readRegister(reg: number): number {
    switch (reg) {
      case IDIO16.OUT0_7: return this.out[0];
      case IDIO16.IN0_7: return this.inputs & 0xff;
      case IDIO16.IRQ_CTL:
        this.irqEnabled = true;
        return 0;
      case IDIO16.FILTER_CTL:
        this.filtersActive = true;
        return 0;
      case IDIO16.OUT8_15: return this.out[1];
      case IDIO16.IN8_15: return this.inputs >> 8;
      case IDIO16.IRQ_STATUS: return this.changed | (this.irq.intxRaised ? 4 : 0);
      default: return 0;
    }
  }

  private writeRegister(reg: number, value: number): void {
    switch (reg) {
      case IDIO16.OUT0_7: this.out[0] = value; break;
      case IDIO16.IN0_7:
        this.changed = 0;
        this.irq.lower();
        break;
      case IDIO16.IRQ_CTL:
        this.irqEnabled = false;
        this.irq.lower();
        break;
      case IDIO16.FILTER_CTL: this.filtersActive = false; break;
      case IDIO16.OUT8_15: this.out[1] = value; break;
    }
  }
}

/** `vfio-user serve` loads the default export: a device, or a function making one. */
export default function createDevice(): PciIdio16 {
  return new PciIdio16();
}
