/**
 * MSI-X capability (ID 0x11, 12 bytes, §10.3) and its table and PBA, which
 * the library emulates inside the BARs the description names (libvfio-user
 * leaves all of this to the device).
 *
 * The table and PBA bytes always hold what the guest must read: in a
 * plain-memory BAR they are views of the BAR's memory, so the native read
 * path answers them without entering JS; in a handler-backed BAR they are
 * overlays the BAR routes to this module.
 *
 * QEMU's vfio-user-pci emulates the table itself and never forwards table
 * writes (it does forward config writes and PBA reads). With every entry
 * masked at reset, as the spec says, nothing would ever be delivered under
 * QEMU, so entry mask bits gate delivery only once the client has written
 * the table since the last reset. Function mask and enable are in config
 * space, which every client forwards, and always apply.
 */
import { IrqIndex } from '../protocol/index.js';
import type { Bar, BarOverlay } from './bars.js';
import type { ConfigSpace, ConfigWrite } from './config.js';
import { InvalidDeviceError, type BarLocation, type MsixCapability } from './description.js';
import type { Delivery, Interrupts } from './interrupts.js';
import { MsiX } from './spec.js';
import { BitArray, MessageVectors } from './vectors.js';

/** The table size field holds vectors - 1. */
const MAX_MSIX_VECTORS = MsiX.TABLE_SIZE_MASK + 1;

const tableBytes = (vectors: number) => vectors * MsiX.ENTRY_SIZE;
/** One pending bit per vector, in whole u64 words. */
const pbaBytes = (vectors: number) => Math.ceil(vectors / 64) * 8;

/** Checks the table and PBA locations against the device's BARs. */
export function checkMsix(d: MsixCapability, field: string, bars: readonly (Bar | undefined)[]): void {
  if (!Number.isInteger(d.vectors) || d.vectors < 1 || d.vectors > MAX_MSIX_VECTORS) {
    throw new InvalidDeviceError(`${field}.vectors`, `${d.vectors} is not in 1-${MAX_MSIX_VECTORS}`);
  }
  const check = (what: 'table' | 'pba', where: BarLocation, size: number) => {
    const bar = bars[where.bar];
    if (!bar) throw new InvalidDeviceError(`${field}.${what}.bar`, `BAR${where.bar} is not declared`);
    if (bar.description.kind !== 'memory') throw new InvalidDeviceError(`${field}.${what}.bar`, `BAR${where.bar} is an I/O BAR; MSI-X lives in memory space`);
    if (!Number.isInteger(where.offset) || where.offset < 0 || where.offset % 8 !== 0) {
      throw new InvalidDeviceError(`${field}.${what}.offset`, `${where.offset} is not a multiple of 8`);
    }
    if (where.offset + size > bar.size) {
      throw new InvalidDeviceError(`${field}.${what}.offset`, `${size} bytes at ${where.offset} run past BAR${where.bar}'s ${bar.size} bytes`);
    }
    const conflict = bar.conflict(where.offset, where.offset + size);
    if (conflict) throw new InvalidDeviceError(`${field}.${what}.offset`, `the ${what} must be trapped, but ${conflict}`);
  };
  check('table', d.table, tableBytes(d.vectors));
  check('pba', d.pba, pbaBytes(d.vectors));
  if (d.table.bar === d.pba.bar
    && d.table.offset < d.pba.offset + pbaBytes(d.vectors) && d.pba.offset < d.table.offset + tableBytes(d.vectors)) {
    throw new InvalidDeviceError(`${field}.pba.offset`, 'the PBA overlaps the table');
  }
}

export class Msix {
  readonly vectors: MessageVectors;
  /** The table's bytes (a view of the BAR's memory when the BAR is plain memory). */
  private readonly table: Buffer;
  private readonly pba: Buffer;
  /** The client writes the table through us (QEMU does not: see the module comment). */
  private tableDriven = false;

  constructor(
    private readonly config: ConfigSpace,
    private readonly at: number,
    description: MsixCapability,
    bars: readonly (Bar | undefined)[],
    interrupts: Interrupts,
  ) {
    const count = description.vectors;
    config.define(at + MsiX.CONTROL, 2, count - 1, MsiX.FUNCTION_MASK | MsiX.ENABLE);
    config.define(at + MsiX.TABLE, 4, description.table.offset | description.table.bar);
    config.define(at + MsiX.PBA, 4, description.pba.offset | description.pba.bar);
    this.table = this.store(bars[description.table.bar]!, description.table.offset, tableBytes(count), {
      read: (offset, n) => Buffer.from(this.table.subarray(offset, offset + n)),
      write: (offset, data) => this.writeTable(offset, data),
    });
    this.pba = this.store(bars[description.pba.bar]!, description.pba.offset, pbaBytes(count), {
      read: (offset, n) => Buffer.from(this.pba.subarray(offset, offset + n)),
      write: () => {}, // read-only: the guest cannot set or clear pending bits
    });
    this.vectors = new MessageVectors(IrqIndex.MSIX, count, interrupts, new BitArray(this.pba), (v) => this.guestMasked(v));
    config.onWrite({ start: at + MsiX.CONTROL, end: at + MsiX.CONTROL + 2, apply: () => this.vectors.release() });
    this.reset();
  }

  get enabled(): boolean {
    return (this.config.u16(this.at + MsiX.CONTROL) & MsiX.ENABLE) !== 0;
  }

  /** Offset of Message Control in config space (its Enable bit selects the interrupt mode). */
  get control(): number {
    return this.at + MsiX.CONTROL;
  }

  /** Whether the capability was enabled before `write` (a write hook's view). */
  enabledBefore(write: ConfigWrite): boolean {
    return (write.previous(this.at + MsiX.CONTROL, 2) & MsiX.ENABLE) !== 0;
  }

  get functionMasked(): boolean {
    return (this.config.u16(this.at + MsiX.CONTROL) & MsiX.FUNCTION_MASK) !== 0;
  }

  /** The entry's mask bit as the guest reads it. */
  entryMasked(vector: number): boolean {
    return (this.table[vector * MsiX.ENTRY_SIZE + MsiX.ENTRY_VECTOR_CONTROL] & MsiX.ENTRY_MASKED) !== 0;
  }

  fire(vector: number): Delivery {
    return this.vectors.fire(vector);
  }

  /** The table bytes, the PBA bytes and whether entry masks gate delivery: what migration saves. */
  get state(): { table: Buffer; pba: Buffer; tableDriven: boolean } {
    return { table: this.table, pba: this.pba, tableDriven: this.tableDriven };
  }

  /** Restores a saved state (sizes already checked); delivery is re-derived by the caller. */
  restore(table: Uint8Array, pba: Uint8Array, tableDriven: boolean): void {
    this.table.set(table);
    this.pba.set(pba);
    this.tableDriven = tableDriven;
  }

  /** Power-on table (every entry masked, address and data 0) and no pending bits. */
  reset(): void {
    this.table.fill(0);
    for (let v = 0; v < this.vectors.count; v++) this.table[v * MsiX.ENTRY_SIZE + MsiX.ENTRY_VECTOR_CONTROL] = MsiX.ENTRY_MASKED;
    this.pba.fill(0);
    this.tableDriven = false;
  }

  /** Backing bytes for [offset, offset + size) of `bar`, routed to `access` by an overlay. */
  private store(bar: Bar, offset: number, size: number, access: Pick<BarOverlay, 'read' | 'write'>): Buffer {
    bar.addOverlay({ start: offset, end: offset + size, ...access });
    return bar.memory ? bar.memory.subarray(offset, offset + size) : Buffer.alloc(size);
  }

  /** Disabled counts as masked, so enabling MSI-X delivers what was held back. */
  private guestMasked(vector: number): boolean {
    if (!this.enabled || this.functionMasked) return true;
    return this.tableDriven && this.entryMasked(vector);
  }

  private writeTable(offset: number, data: Buffer): void {
    for (let i = 0; i < data.length; i++) {
      const at = offset + i;
      const field = at % MsiX.ENTRY_SIZE;
      // Vector control: only the mask bit is writable; the rest is reserved.
      if (field < MsiX.ENTRY_VECTOR_CONTROL) this.table[at] = data[i];
      else if (field === MsiX.ENTRY_VECTOR_CONTROL) this.table[at] = data[i] & MsiX.ENTRY_MASKED;
    }
    this.tableDriven = true;
    this.vectors.release(Math.floor(offset / MsiX.ENTRY_SIZE), Math.ceil((offset + data.length) / MsiX.ENTRY_SIZE));
  }
}
