/**
 * A doorbell/counter card with every capability the library emulates: a
 * PCIe endpoint with Power Management, MSI (4 vectors, per-vector masking),
 * MSI-X (8 vectors, table and PBA in BAR4), a vendor-specific capability,
 * and Device Serial Number, Vendor-Specific Extended and AER extended
 * capabilities. Its registers sit in the 64-bit BAR0 (dwords):
 *
 *   +0x00 ID        RO  0x44420001 ("DB", version 1)
 *   +0x04 COUNTER   RO  doorbells rung since reset
 *   +0x08 RING      WO  writing v rings doorbell v: COUNTER++, STATUS bit v, interrupt v
 *   +0x0C STATUS    RW1C one bit per doorbell rung and not yet acknowledged
 *   +0x10 SCRATCH   RW
 *
 * Interrupt v goes out as MSI-X vector v, MSI vector v, or INTA, whichever
 * the guest enabled; in INTx mode the line stays asserted while STATUS is
 * non-zero (level semantics).
 *
 * The registers are fields, migrated through `saveState`/`loadState`; config
 * space, the MSI-X table and PBA and interrupt state are the library's.
 *
 * The IDs borrow Red Hat's QEMU vendor ID with a device ID QEMU does not
 * use: fine for experiments, not for anything shipped.
 */
import { PciDevice, type Delivery } from 'vfio-user';

export const DOORBELL = {
  ID: 0x00,
  COUNTER: 0x04,
  RING: 0x08,
  STATUS: 0x0c,
  SCRATCH: 0x10,
} as const;

export const DOORBELL_ID = 0x44420001;
export const DOORBELL_VECTORS = 8;
/** BAR4 layout: the MSI-X table, then the PBA on its own 2 KiB boundary. */
export const MSIX_TABLE_OFFSET = 0x000;
export const MSIX_PBA_OFFSET = 0x800;
export const DOORBELL_SERIAL = 0x0011223344556677n;

const REGISTER_BYTES = 0x14;

export class DoorbellDevice extends PciDevice {
  private counter = 0;
  private status = 0;
  private scratch = 0;

  constructor() {
    super({
      vendorId: 0x1b36,
      deviceId: 0x10f0,
      subsystemVendorId: 0x1b36,
      subsystemId: 0x0001,
      revision: 1,
      // Base class 0xff: a device that fits no class (no stock driver binds to it).
      classCode: 0xff0000,
      intx: 'A',
      bars: {
        0: {
          kind: 'memory',
          size: 4096,
          width: 64,
          read: (offset, size) => this.readRegisters(offset, size),
          write: (offset, data) => this.writeRegisters(offset, data),
        },
        // Plain memory: the library keeps the MSI-X table and PBA bytes in it.
        4: { kind: 'memory', size: 4096 },
      },
      rom: Buffer.from('DOORBELL ROM'),
      capabilities: [
        { kind: 'pm', d1: false, d2: false },
        { kind: 'msi', vectors: 4, address64: true, perVectorMask: true },
        {
          kind: 'msix',
          vectors: DOORBELL_VECTORS,
          table: { bar: 4, offset: MSIX_TABLE_OFFSET },
          pba: { bar: 4, offset: MSIX_PBA_OFFSET },
        },
        { kind: 'pcie', type: 'endpoint', flr: true, maxPayload: 256 },
        // Bytes 0-3: feature flags (read-only); 4-7: a guest-writable word.
        { kind: 'vendor', data: Buffer.from([0x01, 0x00, 0x00, 0x00, 0, 0, 0, 0]), writable: Buffer.from([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]) },
      ],
      extendedCapabilities: [
        { kind: 'dsn', serial: DOORBELL_SERIAL },
        { kind: 'vsec', vsecId: 0x0001, vsecRevision: 1, data: Buffer.from('DBELL\0\0\0') },
        { kind: 'aer' },
      ],
      onReset: () => {
        this.counter = 0;
        this.status = 0;
        this.scratch = 0;
      },
      // The registers live in fields, not in BAR memory: they travel in saveState.
      migration: {
        saveState: () => this.saveRegisters(),
        loadState: (data) => this.loadRegisters(data),
      },
    });
  }

  /** Version 1: COUNTER, STATUS, SCRATCH (u32 each) after a version byte. */
  private saveRegisters(): Uint8Array {
    const state = Buffer.alloc(13);
    state[0] = 1;
    state.writeUInt32LE(this.counter, 1);
    state.writeUInt32LE(this.status, 5);
    state.writeUInt32LE(this.scratch, 9);
    return state;
  }

  private loadRegisters(data: Uint8Array): void {
    if (data.length !== 13 || data[0] !== 1) throw new Error(`not version-1 doorbell registers (${data.length} bytes)`);
    const state = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    this.counter = state.readUInt32LE(1);
    this.status = state.readUInt32LE(5);
    this.scratch = state.readUInt32LE(9);
  }

  get rings(): number {
    return this.counter;
  }

  /** Rings doorbell `vector` (what a guest write to RING does). */
  ring(vector: number): Delivery {
    this.counter = (this.counter + 1) >>> 0;
    this.status |= 1 << vector;
    return this.irq.raise(vector);
  }

  private registers(): Buffer {
    const regs = Buffer.alloc(REGISTER_BYTES);
    regs.writeUInt32LE(DOORBELL_ID, DOORBELL.ID);
    regs.writeUInt32LE(this.counter, DOORBELL.COUNTER);
    regs.writeUInt32LE(this.status, DOORBELL.STATUS);
    regs.writeUInt32LE(this.scratch, DOORBELL.SCRATCH);
    return regs;
  }

  private readRegisters(offset: number, size: number): Uint8Array {
    const out = Buffer.alloc(size);
    this.registers().copy(out, 0, Math.min(offset, REGISTER_BYTES), Math.min(offset + size, REGISTER_BYTES));
    return out;
  }

  /** Writes of any width: each dword register sees the bytes written to it (others 0). */
  private writeRegisters(offset: number, data: Buffer): void {
    for (let reg = offset & ~3; reg < offset + data.length; reg += 4) {
      const bytes = Buffer.alloc(4);
      const from = Math.max(reg, offset);
      data.copy(bytes, from - reg, from - offset, Math.min(reg + 4, offset + data.length) - offset);
      const value = bytes.readUInt32LE(0);
      switch (reg) {
        case DOORBELL.RING:
          this.ring(value % DOORBELL_VECTORS);
          break;
        case DOORBELL.STATUS:
          this.status &= ~value;
          if (this.status === 0) this.irq.lower();
          break;
        case DOORBELL.SCRATCH: {
          const current = Buffer.alloc(4);
          current.writeUInt32LE(this.scratch, 0);
          data.copy(current, from - reg, from - offset, Math.min(reg + 4, offset + data.length) - offset);
          this.scratch = current.readUInt32LE(0);
          break;
        }
      }
    }
  }
}

/** `vfio-user serve` loads the default export: a device, or a function making one. */
export default function createDevice(): DoorbellDevice {
  return new DoorbellDevice();
}
