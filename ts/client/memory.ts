/**
 * Guest memory on the client side: a memfd the client maps and can share
 * with the server by fd (DMA_MAP), or serve through DMA_READ/DMA_WRITE.
 */
import { mapNewMemfd, native, type NativeMapping } from '../native.js';
import { UsageError } from '../errors.js';

export interface GuestMemoryOptions {
  /** The memfd's name (shown in /proc/PID/fd). */
  name?: string;
  /**
   * Seal the size (F_SEAL_SHRINK | F_SEAL_GROW), as QEMU does for guest RAM:
   * the server can then touch it with plain loads and stores, since no page
   * can disappear. Default true.
   */
  sealSize?: boolean;
}

export class GuestMemory {
  /** The memfd; owned by this object until close(). */
  readonly fd: number;
  readonly size: number;
  private readonly mapping: NativeMapping;

  constructor(size: number, options: GuestMemoryOptions = {}) {
    if (!Number.isSafeInteger(size) || size <= 0) throw new UsageError(`guest memory size ${size} must be a positive integer`);
    ({ fd: this.fd, mapping: this.mapping } = mapNewMemfd(options.name ?? 'vfio-user-guest', size, options.sealSize ?? true));
    this.size = size;
  }

  get closed(): boolean {
    return !this.mapping.mapped;
  }

  read(offset: number, length: number): Buffer {
    return this.mapping.read(offset, length);
  }

  write(offset: number, data: Uint8Array): void {
    this.mapping.write(offset, data);
  }

  /** A zero-copy view; detached when this memory is closed. */
  view(offset = 0, length = this.size - offset): Uint8Array {
    return new Uint8Array(this.mapping.view(offset, length));
  }

  close(): void {
    if (this.closed) return;
    this.mapping.unmap();
    native.closeFd(this.fd);
  }
}
