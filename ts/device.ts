/**
 * The contract between a server session and the device it serves. The PCI
 * model (ts/pci) implements it; a session validates every request against
 * what the device declares before calling it, so implementations see only
 * well-formed, in-bounds accesses.
 */
import type { NativeRegionReads } from './native.js';
import type { DmaSpace } from './dma/space.js';
import type { IrqInfo, RegionCap, SetIrqs } from './protocol/index.js';

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

/** What a connected client gives the device while it is attached. */
export interface DeviceAttachment {
  /** Guest memory the client declared. */
  readonly dma: DmaSpace;
}

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
  /** Regions whose reads need no device code, answered natively. */
  nativeReads(maxCount: number): NativeRegionReads;
  /** A client finished negotiation. */
  attach(attachment: DeviceAttachment): void;
  /** The client is gone: drop its interrupt fds; keep device state. */
  detach(): void;
}
