/**
 * Guest memory on the client side: a memfd the client maps and can share
 * with the server by fd (DMA_MAP), or serve through DMA_READ/DMA_WRITE.
 */
import { native, type NativeMapping } from '../native.js';
import { UsageError } from '../errors.js';

export class GuestMemory {
  /** The memfd; owned by this object until close(). */
  readonly fd: number;
  readonly size: number;
  private readonly mapping: NativeMapping;

  constructor(size: number, name = 'vfio-user-guest') {
    if (!Number.isSafeInteger(size) || size <= 0) throw new UsageError(`guest memory size ${size} must be a positive integer`);
    this.fd = native.memfdCreate(name, BigInt(size));
    try {
      this.mapping = new native.NativeMapping(this.fd, 0n, BigInt(size), true, true);
    } catch (error) {
      native.closeFd(this.fd);
      throw error;
    }
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
