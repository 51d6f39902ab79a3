/**
 * Shadow doorbells and EventIdx (Doorbell Buffer Config, NVMe 1.4 §5.7):
 * two pages of guest memory laid out as the doorbell registers are (SQ y
 * tail at 8y, CQ y head at 8y + 4). The host stores each new doorbell value
 * in the shadow page, and writes the real register only when the value
 * passes the EventIdx the controller last published for it, as virtio's
 * event index works. So the controller reads values from the shadow page
 * (an MMIO write or an ioeventfd only says "look"), and publishes in the
 * EventIdx page how far it has looked. Linux shadows its I/O queues only,
 * never the admin queue, so this controller does the same.
 *
 * Both pages are read and written through zero-copy views of guest memory,
 * taken again when the window under them was remapped or another client
 * attached. Atomics: the
 * controller's store to EventIdx must reach memory before it reads the
 * shadow value again (a full fence), or a host that stored a tail and read
 * the old EventIdx in between would never ring.
 */
import type { DmaSpace } from 'vfio-user';
import { PAGE_SIZE } from './command.js';

/** Doorbells a page holds (CAP.DSTRD 0: a dword each). */
const DOORBELLS = PAGE_SIZE / 4;

export class ShadowDoorbells {
  private shadowView: Uint32Array | undefined;
  private eventIdxView: Uint32Array | undefined;

  constructor(
    /** The attached client's guest memory (each client has its own). */
    private readonly dma: () => DmaSpace,
    /** Guest address of the shadow doorbell page (PRP1 of the command). */
    readonly shadow: bigint,
    /** Guest address of the EventIdx page (PRP2). */
    readonly eventIdx: bigint,
  ) {}

  /** The value the host last stored for doorbell `index`. Throws a DMA error when the page is no longer guest memory. */
  value(index: number): number {
    return Atomics.load(this.views()[0], index);
  }

  /** Tells the host to ring doorbell `index` once its value moves past `value`; a full fence. */
  publish(index: number, value: number): void {
    Atomics.store(this.views()[1], index, value);
  }

  /** A new queue's doorbell: both pages at `value`, as if the host had just rung it. */
  reset(index: number, value: number): void {
    const [shadow, eventIdx] = this.views();
    Atomics.store(shadow, index, value);
    Atomics.store(eventIdx, index, value);
  }

  /** Views of both pages, taken again after an unmap detached them (length 0). */
  private views(): [Uint32Array, Uint32Array] {
    if (!this.shadowView?.length || !this.eventIdxView?.length) {
      this.shadowView = this.wordsAt(this.shadow);
      this.eventIdxView = this.wordsAt(this.eventIdx);
    }
    return [this.shadowView, this.eventIdxView];
  }

  private wordsAt(iova: bigint): Uint32Array {
    const bytes = this.dma().view(iova, 4 * DOORBELLS);
    return new Uint32Array(bytes.buffer, bytes.byteOffset, DOORBELLS);
  }
}
