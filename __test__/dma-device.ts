/**
 * A small device for the DMA tests, implementing VfioUserDevice directly:
 * one 8 KiB BAR in SharedMemory whose first page (registers) is trapped and
 * whose second page (doorbells) the client may mmap. Trapped writes go to
 * `onWrite`, which tests set to whatever DMA behaviour they exercise.
 */
import { closeFds } from '../ts/native.js';
import { native, SharedMemory, type DeviceAttachment, type DmaSpace, type RegionIoFd, type VfioUserDevice } from '../ts/index.js';

export const PAGE = 4096;

export class DmaTestDevice implements VfioUserDevice {
  readonly flags = 0;
  readonly numRegions = 1;
  readonly numIrqs = 0;
  readonly bar = new SharedMemory(2 * PAGE);
  onWrite: (offset: number, data: Buffer, dma: DmaSpace) => void | Promise<void> = () => {};
  ioFds: RegionIoFd[] = [];
  private attachment: DeviceAttachment | undefined;

  get dma(): DmaSpace {
    if (!this.attachment) throw new Error('no client');
    return this.attachment.dma;
  }

  regionInfo() {
    return this.bar.region({ mmap: [{ offset: BigInt(PAGE), size: BigInt(PAGE) }] });
  }

  regionIoFds(): readonly RegionIoFd[] {
    return this.ioFds;
  }

  read(_region: number, offset: number, count: number): Uint8Array {
    return this.bar.bytes.subarray(offset, offset + count);
  }

  write(_region: number, offset: number, data: Buffer): void | Promise<void> {
    if (offset >= PAGE) {
      this.bar.bytes.set(data, offset);
      return;
    }
    return this.onWrite(offset, data, this.dma);
  }

  irqInfo() {
    return { count: 0, flags: 0 };
  }

  setIrqs(_request: unknown, fds: number[]): void {
    closeFds(fds);
  }

  reset(): void {}

  nativeReads(maxCount: number) {
    return new native.NativeRegionReads(maxCount);
  }

  attach(attachment: DeviceAttachment): void {
    this.attachment = attachment;
  }

  detach(): void {
    this.attachment = undefined;
  }
}
