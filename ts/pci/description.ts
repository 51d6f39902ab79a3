/**
 * The declarative description of a PCI device: what a user writes to get a
 * device. Everything here is data plus optional handlers; `PciDevice` checks
 * it at construction and throws `InvalidDeviceError` naming the bad field.
 */
import { brand } from '../brand.js';
import { HandlerResultError, UsageError } from '../errors.js';
import type { SharedMemory } from '../dma/shared-memory.js';

/** What a register read may return: a number/bigint (little-endian) or the bytes. */
export type RegisterValue = number | bigint | Uint8Array;

export interface BarHandlers {
  /** Reads `size` bytes at `offset`. Without it, reads return the BAR's memory. */
  read?(offset: number, size: number): RegisterValue | Promise<RegisterValue>;
  /** A write of `data` at `offset` (after it is stored, for memory-backed BARs). */
  write?(offset: number, data: Buffer): void | Promise<void>;
  /**
   * Guest writes the client may turn into eventfd signals (GET_REGION_IO_FDS):
   * KVM then signals without exiting and the write never reaches the device.
   * The device creates the eventfds; device code reads them with
   * `device.bar(i).ioeventfds[n].take()`. A matching write that is trapped
   * after all (a client that did not wire the fd) signals the same eventfd
   * instead of reaching the handlers, so device code has one path.
   */
  ioeventfds?: IoEventfdDescription[];
}

/** One ioeventfd: writes of `size` bytes at `offset` (and of value `datamatch`, when given). */
export interface IoEventfdDescription {
  offset: number;
  /** Access size to match; 0 matches any size (then no `datamatch`). */
  size: 0 | 1 | 2 | 4 | 8;
  /** Only writes of this value (little-endian, `size` bytes) signal. */
  datamatch?: number | bigint;
}

/** A byte range of a BAR (`offset` and `size` in bytes). */
export interface BarArea {
  offset: number;
  size: number;
}

export interface IoBar extends BarHandlers {
  kind: 'io';
  /** Bytes; a power of two, at least 4. */
  size: number;
}

export interface MemoryBar extends BarHandlers {
  kind: 'memory';
  /** Bytes; a power of two, at least 16. */
  size: number;
  /** 64-bit BARs take the next BAR slot as their upper half. */
  width?: 32 | 64;
  prefetchable?: boolean;
  /**
   * Backs the BAR with memory the client may mmap (a memfd): `true` for one
   * the device creates and frees in `close()`, or a `SharedMemory` of exactly
   * `size` bytes that stays the caller's. Device code sees the bytes as
   * `device.bar(i).bytes`; guest stores to mapped areas land there directly.
   * At least 4096 bytes (mmaps are whole pages).
   */
  shared?: true | SharedMemory;
  /**
   * With `shared`: the areas the client may map (sparse mmap), whole 4 KiB
   * pages, never overlapping; default the whole BAR. Accesses elsewhere are
   * trapped and behave as in a plain BAR: without a `read` handler they read
   * the shared bytes (natively) and writes are stored before `write` sees
   * them. REGION_READ/WRITE inside mapped areas use the bytes, never the
   * handlers, as the client's own mapping would.
   */
  mmap?: BarArea[];
}

export type BarDescription = IoBar | MemoryBar;
export type BarIndex = 0 | 1 | 2 | 3 | 4 | 5;
export type InterruptPin = 'A' | 'B' | 'C' | 'D';

/** A place in a BAR (the MSI-X table and PBA). `offset` is 8-byte aligned. */
export interface BarLocation {
  bar: BarIndex;
  offset: number;
}

/** A capability's offset in config space; omit it to have the library place it. */
interface Placement {
  /** Dword-aligned; 0x40-0xFF for capabilities, 0x100-0xFFF for extended ones. */
  at?: number;
}

/**
 * Registers a device defines inside a vendor capability (standard or
 * extended). The library stores the bytes and applies the writable mask;
 * handlers add behaviour.
 */
export interface DeviceRegisters {
  /** Initial contents of the registers after the capability's own header. */
  data: Uint8Array;
  /** Bits the guest may write, byte for byte over `data`; `true` for every bit. Default: read-only. */
  writable?: Uint8Array | true;
  /**
   * Computes registers when the guest reads them (offset relative to `data`).
   * Config reads then go through JS instead of being answered natively
   * (docs/pci-model.md, "Config reads and hooks").
   */
  read?(offset: number, size: number): RegisterValue;
  /** Sees every guest write to the registers, after the writable bits are stored. */
  write?(offset: number, data: Buffer): void;
}

export type PowerState = 'D0' | 'D1' | 'D2' | 'D3hot';

/** Power Management (ID 0x01): PMCSR power state and No_Soft_Reset. */
export interface PowerManagementCapability extends Placement {
  kind: 'pm';
  /** Whether the optional D1 / D2 states exist; writes of a missing state are discarded. */
  d1?: boolean;
  d2?: boolean;
  /**
   * No_Soft_Reset (default true): D3hot to D0 keeps the device's state. When
   * false, that transition resets the device as DEVICE_RESET does.
   */
  noSoftReset?: boolean;
}

export type MsiVectorCount = 1 | 2 | 4 | 8 | 16 | 32;

/** MSI (ID 0x05). */
export interface MsiCapability extends Placement {
  kind: 'msi';
  /** Multiple Message Capable: the vectors the device can use. */
  vectors: MsiVectorCount;
  /** 64-bit message address (default true). */
  address64?: boolean;
  /** Per-vector mask and pending bits (default false). */
  perVectorMask?: boolean;
}

/** MSI-X (ID 0x11): the library emulates the table and PBA inside the named BARs. */
export interface MsixCapability extends Placement {
  kind: 'msix';
  /** Table size, 1-2048. */
  vectors: number;
  table: BarLocation;
  pba: BarLocation;
}

export type PcieDeviceType = 'endpoint' | 'legacy-endpoint' | 'integrated-endpoint';
export type MaxPayload = 128 | 256 | 512 | 1024 | 2048 | 4096;

/** PCI Express (ID 0x10), version 2, 60 bytes. Makes config space 4 KiB. */
export interface PciExpressCapability extends Placement {
  kind: 'pcie';
  /** Default 'endpoint'. Integrated endpoints have no link registers. */
  type?: PcieDeviceType;
  /** Function Level Reset capable (default true): Initiate FLR resets the device. */
  flr?: boolean;
  /** Max_Payload_Size Supported (default 128). */
  maxPayload?: MaxPayload;
}

/** Vendor-specific (ID 0x09): ID, next, length, then the device's registers. */
export interface VendorCapability extends Placement, DeviceRegisters {
  kind: 'vendor';
}

export type Capability =
  | PowerManagementCapability
  | MsiCapability
  | MsixCapability
  | PciExpressCapability
  | VendorCapability;

/** Device Serial Number (extended ID 0x0003). */
export interface SerialNumberCapability extends Placement {
  kind: 'dsn';
  /** The 64-bit serial (an EUI-64 by convention). */
  serial: bigint;
}

/** Vendor-Specific Extended (extended ID 0x000B): VSEC header, then the device's registers. */
export interface VendorExtendedCapability extends Placement, DeviceRegisters {
  kind: 'vsec';
  /** VSEC ID, 16 bits, meaning defined by the vendor. */
  vsecId: number;
  /** VSEC Rev, 4 bits (default 0). */
  vsecRevision?: number;
}

/** Advanced Error Reporting (extended ID 0x0001), endpoint registers with the usual defaults. */
export interface AerCapability extends Placement {
  kind: 'aer';
}

export type ExtendedCapability = SerialNumberCapability | VendorExtendedCapability | AerCapability;

/**
 * Live migration of a PCI device (docs/pci-model.md, "Migration"). The
 * library saves and restores config space, BAR memory, the MSI/MSI-X and
 * INTx state and ioeventfd counts itself; these hooks cover what only device
 * code knows.
 */
export interface PciMigration {
  /**
   * The state device code keeps outside the library (handler registers,
   * queues, timers' progress), as bytes. Called in STOP_COPY, after `stop`.
   * Put a version in it.
   */
  saveState?(): Uint8Array;
  /**
   * Applies what `saveState` returned on the source. Called on the
   * destination after the library has restored config space, BARs and
   * interrupt state (so it may read them); if it throws, the library puts
   * them back and the load fails (a ProtocolError chooses the errno, else EIO).
   * Check the data before changing anything.
   */
  loadState?(data: Uint8Array): void;
  /** Stop acting on your own: timers, DMA, work in flight. Interrupts are held by the library. */
  stop?(): void | Promise<void>;
  /** Undo `stop`; on the destination, start the device from the loaded state. */
  start?(): void | Promise<void>;
}

export interface PciDeviceDescription {
  vendorId: number;
  deviceId: number;
  subsystemVendorId?: number;
  subsystemId?: number;
  revision?: number;
  /** 24 bits: base class << 16 | subclass << 8 | programming interface. */
  classCode: number;
  bars?: Partial<Record<BarIndex, BarDescription>>;
  /** Expansion ROM contents (sized up to a power of two, at least 2 KiB). */
  rom?: Uint8Array;
  /** The INTx pin the device uses; omit for none. */
  intx?: InterruptPin;
  /** Chained in ascending offset order; auto-placed ones take the lowest free slot, in array order. */
  capabilities?: Capability[];
  /** Needs a `pcie` capability. The one at the lowest offset must sit at 0x100. */
  extendedCapabilities?: ExtendedCapability[];
  /**
   * Called on DEVICE_RESET, FLR and soft reset, after the library has put
   * config space, BARs and interrupts back to their power-on state: device
   * code resets its own registers here. (A PciDevice subclass cannot define
   * a `reset` method: this hook is the one place.)
   */
  onReset?(): void | Promise<void>;
  /**
   * Called by `PciDevice.close()` (and so when `vfio-user serve` stops)
   * before the library frees the device's memory: device code stops its
   * timers, watches and workers here, so the process can exit.
   */
  onClose?(): void;
  /**
   * Live migration. Omitted: the device migrates when the library holds all
   * of its state, i.e. the description has no BAR or register handlers, no
   * ioeventfds and no `onReset` hook; otherwise it is not migratable (state in
   * handlers would be lost silently), until this says how. `true`: migrate
   * what the library holds; device code keeps nothing else. Hooks: that,
   * plus device code's own state. `false`: never.
   */
  migration?: boolean | PciMigration;
}

/** A description that cannot describe a real device; `field` names the culprit. */
export class InvalidDeviceError extends UsageError {
  static {
    brand(this, 'InvalidDeviceError');
  }

  constructor(readonly field: string, problem: string) {
    super(`${field}: ${problem}`);
  }
}

export const isPowerOfTwo = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

/** Throws unless `value` (when given) is an unsigned integer of `bits` bits. */
export function checkUint(field: string, value: number | undefined, bits: number): void {
  if (value !== undefined && !(Number.isInteger(value) && value >= 0 && value < 2 ** bits)) {
    throw new InvalidDeviceError(field, `${value} is not a ${bits}-bit unsigned integer`);
  }
}

/**
 * Encodes a handler's answer as exactly `size` little-endian bytes: an
 * integer gives its low `size` bytes (two's complement for negative ones, so
 * a narrow read of a wider register works); bytes must be exactly `size`
 * long. Anything else throws a HandlerResultError naming `handler`.
 */
export function encodeValue(value: RegisterValue, size: number, handler: string, offset: number): Uint8Array {
  const fail = (problem: string) => new HandlerResultError(handler, offset, size, value, problem);
  if (value instanceof Uint8Array) {
    if (value.length !== size) throw fail(`a read of ${size} bytes needs ${size} bytes`);
    return value;
  }
  let integer: bigint;
  if (typeof value === 'bigint') integer = value;
  else if (typeof value === 'number' && Number.isInteger(value)) integer = BigInt(value);
  else throw fail(`expected an integer (number or bigint) or a Uint8Array of ${size} bytes`);
  const out = Buffer.alloc(Math.max(size, 8));
  out.writeBigUInt64LE(BigInt.asUintN(64, integer), 0);
  return out.subarray(0, size);
}
