/**
 * A small device for the DMA tests, implementing VfioUserDevice directly:
 * one 8 KiB BAR in SharedMemory whose first page (registers) is trapped and
 * whose second page (doorbells) the client may mmap. Trapped writes go to
 * `onWrite`, which tests set to whatever DMA behaviour they exercise.
 */
import { SharedMemory, type DmaSpace, type RegionIoFd } from '../ts/index.js';
import { BareDevice } from './bare-device.js';

export const PAGE = 4096;

export class DmaTestDevice extends BareDevice {
  readonly numRegions = 1;
  readonly bar = new SharedMemory(2 * PAGE);
  onWrite: (offset: number, data: Buffer, dma: DmaSpace) => void | Promise<void> = () => {};
  ioFds: RegionIoFd[] = [];

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
}
