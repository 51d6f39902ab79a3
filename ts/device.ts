/**
 * The contract between a server session and the device it serves. The PCI
 * model (ts/pci) implements it; a session validates every request against
 * what the device declares before calling it, so implementations see only
 * well-formed, in-bounds accesses.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { NativeRegionReads } from './native.js';
import type { DmaSpace } from './dma/space.js';
import type { PciDevice } from './pci/device.js';
import type { IrqInfo, RegionCap, SetIrqs } from './protocol/index.js';
import type { DeviceContext } from './boundary.js';

export interface RegionDescription {
  size: bigint;
  /** RegionInfoFlags: READ, WRITE, MMAP. */
  flags: number;
  caps?: RegionCap[];
  /** The fd a client may mmap (with MMAP set), owned by the device. */
  fd?: number;
  /** File offset of the region within `fd`. */
  offset?: bigint;
}

/**
 * An eventfd the client may wire to guest writes at `offset` of a region
 * (GET_REGION_IO_FDS, an ioeventfd entry): KVM then signals it directly and
 * the write never reaches the socket. The device owns `fd` and reads it; the
 * session sends the client dups.
 */
export interface RegionIoFd {
  offset: bigint;
  /** Access size to match, 1/2/4/8; 0 = any. */
  size: bigint;
  fd: number;
  /** KvmIoeventfdFlags (DATAMATCH, PIO); 0 by default. */
  flags?: number;
  /** The value to match with DATAMATCH. */
  datamatch?: bigint;
}

/** Which save a unit of migration data comes from (docs/migration.md). */
export type MigrationPhase = 'precopy' | 'stopcopy';

/** Identifies one unit of migration data: one `save()` call on the source, one `load()` on the destination. */
export interface MigrationUnit {
  readonly phase: MigrationPhase;
  /**
   * The unit's place in its save session, from 0. Unit 0 must stand alone;
   * later units may be deltas against the earlier ones, which the destination
   * loads first and in order.
   */
  readonly index: number;
}

/**
 * What `save()` returns: the bytes at once, or chunks that are pulled as the
 * client reads (a generator keeps large state out of memory).
 */
export type MigrationData = Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

/**
 * Live migration (migration v2) for a device; see docs/migration.md. The
 * session runs the state machine and frames the data stream; the device only
 * stops, starts, saves and loads. Each hook should throw before changing
 * anything: a hook that throws fails the transition and leaves the device in
 * the state it was in.
 */
export interface DeviceMigration {
  /** Offer PRE_COPY: `save({ phase: 'precopy' })` is then called while the device runs. */
  readonly preCopy?: boolean;
  /**
   * The stop-copy unit holds the whole state, so pre-copy data is only a head
   * start a client may drop (libvfio-user's model: its client sample carries
   * only the stop-copy data to the destination). PRE_COPY→STOP_COPY then
   * drops unread pre-copy data and starts the stream over, its unit 0 the
   * stop-copy unit, as STOP→STOP_COPY does.
   */
  readonly fullStopCopy?: boolean;
  /** Stop acting on its own: no DMA, no interrupts, no timers. Not needed by devices that never do. */
  stop?(): void | Promise<void>;
  /** Undo `stop()`; also called when DEVICE_RESET brings the device out of ERROR. */
  start?(): void | Promise<void>;
  /** The device's state (or what changed since the last unit of the session). */
  save(unit: MigrationUnit): MigrationData | Promise<MigrationData>;
  /** Applies a unit saved by a device of the same kind, in the order they were saved. */
  load(data: Uint8Array, unit: MigrationUnit): void | Promise<void>;
}

/** What a connected client gives the device while it is attached. */
export interface DeviceAttachment {
  /** Guest memory the client declared. */
  readonly dma: DmaSpace;
}

/**
 * The attachment of the client whose request the running code serves: the
 * session runs every handler inside it, and it follows the handler through
 * awaits and into the timers it starts. A device model resolves guest memory
 * through it (PciDevice.dma does), so code that outlives its client's session
 * reaches that client's closed DmaSpace, never the next client's memory.
 */
export const requestAttachment = new AsyncLocalStorage<DeviceAttachment>();

export interface VfioUserDevice {
  /** DeviceInfoFlags (RESET, PCI). */
  readonly flags: number;
  readonly numRegions: number;
  readonly numIrqs: number;
  regionInfo(index: number): RegionDescription;
  /** ioeventfds for region `index` (a valid index); none when absent. */
  regionIoFds?(index: number): readonly RegionIoFd[];
  /** Reads `count` bytes; `offset + count` is within the region. */
  read(region: number, offset: number, count: number): Uint8Array | Promise<Uint8Array>;
  write(region: number, offset: number, data: Buffer): void | Promise<void>;
  irqInfo(index: number): Pick<IrqInfo, 'count' | 'flags'>;
  /** A validated SET_IRQS; the device owns `fds` from here on. */
  setIrqs(request: SetIrqs, fds: number[]): void;
  reset(): void | Promise<void>;
  /**
   * Regions whose reads need no device code, answered natively (PciDevice's plain-memory BARs
   * and config space); without it every read reaches `read`. The session asks; the key keeps
   * this transport detail out of the public contract.
   * @internal
   */
  [nativeRegionReads]?(maxCount: number): NativeRegionReads;
  /** A client finished negotiation. */
  attach(attachment: DeviceAttachment): void;
  /** The client is gone: drop its interrupt fds; keep device state. */
  detach(): void;
  /** Live migration; without it DEVICE_FEATURE and MIG_DATA_* answer ENOTSUP. */
  readonly migration?: DeviceMigration;
  /**
   * Where device code schedules its own work (timers, async work) under the
   * error boundary (ts/boundary.ts); the library keeps one for a device without.
   */
  readonly context?: DeviceContext;
  /** Frees the device's resources and stops its own work; `vfio-user serve` calls it on SIGTERM/SIGINT. */
  close?(): void | Promise<void>;
}

/**
 * Where a device model (PciDevice) keeps the VfioUserDevice it is served
 * through, off its public, subclassable surface. `Symbol.for`: copies of the
 * library loaded side by side agree on it.
 * @internal
 */
export const deviceContract: unique symbol = Symbol.for('vfio-user.device-contract');

/** @internal */
export const nativeRegionReads: unique symbol = Symbol.for('vfio-user.native-region-reads');

/** The contract a served device keeps: its own, or the one a device model holds under `deviceContract`. @internal */
export function contractOf(device: object): VfioUserDevice | undefined {
  const held = (device as { [deviceContract]?: VfioUserDevice })[deviceContract];
  if (held !== undefined) return held;
  return typeof (device as VfioUserDevice).regionInfo === 'function' ? (device as VfioUserDevice) : undefined;
}

/**
 * What a device module may default-export instead of a device: a function
 * that builds one. `vfio-user serve MODULE -- ARGS...` calls it with the
 * arguments after `--` (an empty array when there are none), so a module can
 * take its own options, e.g. `-- --image disk.img`.
 */
export type DeviceFactory = (args: string[]) => VfioUserDevice | PciDevice | Promise<VfioUserDevice | PciDevice>;
