/**
 * The parts of a VfioUserDevice that test devices written without the PCI
 * model share: no interrupts, nothing answered natively, and the attached
 * client's guest memory. Subclasses describe their regions and accesses.
 */
import { closeFds } from '../ts/native.js';
import { type DeviceAttachment, type DmaSpace, type RegionDescription, type VfioUserDevice } from '../ts/index.js';

export abstract class BareDevice implements VfioUserDevice {
  readonly flags: number = 0;
  abstract readonly numRegions: number;
  readonly numIrqs: number = 0;
  private attachment: DeviceAttachment | undefined;

  abstract regionInfo(index: number): RegionDescription;
  abstract read(region: number, offset: number, count: number): Uint8Array;
  abstract write(region: number, offset: number, data: Buffer): void | Promise<void>;

  /** Guest memory of the attached client. */
  get dma(): DmaSpace {
    if (!this.attachment) throw new Error('no client');
    return this.attachment.dma;
  }

  irqInfo(_index: number) {
    return { count: 0, flags: 0 };
  }

  setIrqs(_request: unknown, fds: number[]): void {
    closeFds(fds);
  }

  reset(): void {}

  attach(attachment: DeviceAttachment): void {
    this.attachment = attachment;
  }

  detach(): void {
    this.attachment = undefined;
  }
}
