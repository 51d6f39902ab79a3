/**
 * `SharedMemory`: device memory that the client may mmap (a memfd), seen by
 * the device as a typed array. Exposed as a region, its info reply carries
 * the fd, the MMAP flag and a sparse-mmap capability listing only the areas
 * the client may map; everything else stays trapped (REGION_READ/WRITE). The
 * classic use: an NVMe BAR whose doorbell page the guest writes directly
 * while the register page still reaches device code.
 */
import { mapNewMemfd, native, type NativeMapping, type NativeRegionReads } from '../native.js';
import { brand } from '../brand.js';
import { UsageError } from '../errors.js';
import { RegionCapId, RegionInfoFlags, type SparseMmapArea } from '../protocol/index.js';
import type { RegionDescription } from '../device.js';

/** Mappable areas must be whole pages of the client's mmap. */
export const MMAP_PAGE_SIZE = 4096;

export interface SharedRegionOptions {
  /** Areas the client may mmap, relative to the region start; the whole region by default. */
  mmap?: readonly SparseMmapArea[];
  /** RegionInfoFlags.READ | WRITE by default. */
  access?: number;
}

export class SharedMemory {
  // A device built with another copy of the library passes its own SharedMemory.
  static {
    brand(this, 'SharedMemory');
  }

  /** The memfd; owned by this object until close(). Regions hand clients dups. */
  readonly fd: number;
  readonly size: number;
  /** The device's view of the memory (detached by close()). */
  readonly bytes: Uint8Array;
  private readonly mapping: NativeMapping;

  constructor(size: number, name = 'vfio-user-shared') {
    if (!Number.isSafeInteger(size) || size <= 0 || size % MMAP_PAGE_SIZE !== 0) {
      throw new UsageError(`shared memory size ${size} must be a positive multiple of ${MMAP_PAGE_SIZE}`);
    }
    // Sealed: the client maps it, and a fixed size means its mapping can never fault.
    ({ fd: this.fd, mapping: this.mapping } = mapNewMemfd(name, size, true));
    try {
      this.bytes = new Uint8Array(this.mapping.view(0, size));
    } catch (error) {
      this.mapping.unmap();
      native.closeFd(this.fd);
      throw error;
    }
    this.size = size;
  }

  get closed(): boolean {
    return !this.mapping.mapped;
  }

  /** The region description a VfioUserDevice returns from regionInfo(). */
  region(options: SharedRegionOptions = {}): RegionDescription {
    if (this.closed) throw new UsageError('the shared memory is closed');
    const areas = options.mmap ?? [{ offset: 0n, size: BigInt(this.size) }];
    const page = BigInt(MMAP_PAGE_SIZE);
    for (const a of areas) {
      if (a.offset % page !== 0n || a.size % page !== 0n || a.size === 0n || a.offset + a.size > BigInt(this.size)) {
        throw new UsageError(`mmap area of ${a.size} bytes at ${a.offset} must be whole pages inside the ${this.size}-byte memory`);
      }
    }
    const access = options.access ?? (RegionInfoFlags.READ | RegionInfoFlags.WRITE);
    return {
      size: BigInt(this.size),
      flags: access | RegionInfoFlags.MMAP,
      fd: this.fd,
      offset: 0n,
      caps: [{ id: RegionCapId.SPARSE_MMAP, areas: areas.map((a) => ({ ...a })) }],
    };
  }

  /** The native mapping, for native readers of this memory (doorbell watching). @internal */
  nativeMapping(): NativeMapping {
    if (this.closed) throw new UsageError('the shared memory is closed');
    return this.mapping;
  }

  /**
   * Serves REGION_READs of `region` from this memory natively (offset 0 is the
   * region's start) for as long as it is mapped: after close() they reach the
   * device's handlers instead, never the unmapped memory.
   * @internal
   */
  serveNativeReads(reads: NativeRegionReads, region: number): void {
    reads.setMapping(region, this.mapping);
  }

  /**
   * Unmaps (detaching `bytes` and any other view) and closes the fd. Clients
   * keep their own mappings; an attached client's reads of a BAR over this
   * memory are then answered EIO by the device model.
   */
  close(): void {
    if (this.closed) return;
    this.mapping.unmap();
    native.closeFd(this.fd);
  }
}
