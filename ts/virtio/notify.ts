/**
 * Available-buffer notifications (§4.1.4.4) from the driver to the queues,
 * whatever the VMM offers, as one `DoorbellSource` whose doorbell n is queue
 * n's slot in the notification area (notify_off_multiplier 4: a 32-bit word
 * per queue, so each queue's word can be watched on its own).
 *
 * - 'mmap': the notification area is a page of the BAR the VMM may map
 *   (sparse mmap), so a guest's store lands in memory with no exit, and the
 *   source watches each enabled queue's word. A driver without
 *   NOTIFICATION_DATA stores the same value every time (its queue index),
 *   which memory cannot tell from no store: the word holds ARMED until a
 *   store changes it, and after each notification the device writes ARMED
 *   back before it reads the ring. A store that lands between the two is
 *   overwritten, but the driver made its chains available before that
 *   store, so the ring read after it finds them. A VMM that does not map
 *   the page writes with REGION_WRITE: the library stores the bytes there
 *   and the watch sees them.
 * - 'ioeventfd': each slot has an ioeventfd of any width (Linux writes 16
 *   bits, or 32 with NOTIFICATION_DATA), which a VMM with KVM signals
 *   without an exit; a write it does not wire arrives trapped and signals
 *   the same eventfd. A kick carries no value.
 * - 'trap': every notification is a REGION_WRITE.
 * - 'avail': trapped writes, and each queue's available index watched in
 *   guest memory, for a driver that never notifies (SPDK's virtio driver
 *   over vfio-user polls and expects the device to poll too). The watch
 *   reads the memory the ring was in when the queue was enabled. The device
 *   offers split rings only in this mode: a packed ring has no index to watch.
 */
import { DoorbellSource, type Ring } from '../doorbells.js';
import type { DeviceContext } from '../boundary.js';
import type { DmaSpace } from '../dma/space.js';
import type { IoEventfdDescription } from '../pci/description.js';
import type { PciBar } from '../pci/bars.js';

export type VirtioNotifyMode = 'mmap' | 'trap' | 'ioeventfd' | 'avail';

export const NOTIFY_MODES: readonly VirtioNotifyMode[] = ['mmap', 'trap', 'ioeventfd', 'avail'];

/** Bytes between two queues' notification addresses. */
export const NOTIFY_MULTIPLIER = 4;

/** A mapped slot's value while no notification waits in it: no queue index a driver writes (vqn 0xffff does not exist). */
export const ARMED = 0xffffffff;

/** The BAR description's part for `mode`: the mappable notification page, or ioeventfds for `queues` slots. */
export function notifyBarParts(mode: VirtioNotifyMode, notifyAt: number, queues: number):
  { shared?: true; mmap?: { offset: number; size: number }[]; ioeventfds?: IoEventfdDescription[] } {
  if (mode === 'mmap') return { shared: true, mmap: [{ offset: notifyAt, size: 0x1000 }] };
  if (mode === 'ioeventfd') return { ioeventfds: Array.from({ length: queues }, (_, q) => ({ offset: notifyAt + q * NOTIFY_MULTIPLIER, size: 0 as const })) };
  return {};
}

export class Notifications {
  private readonly source: DoorbellSource;
  /** The mapped slots as words ('mmap'). */
  private readonly slots: Uint32Array | undefined;

  constructor(
    readonly mode: VirtioNotifyMode,
    private readonly bar: PciBar,
    private readonly notifyAt: number,
    queues: number,
    context: DeviceContext,
    /**
     * Queue `queue` was notified; `value` is what the driver wrote (undefined
     * for an ioeventfd's kick); `seenAt` when it was found in watched memory
     * (performance.now() time; NaN for a trapped write or a kick).
     */
    notified: (queue: number, value: number | undefined, seenAt: number) => void,
  ) {
    this.source = new DoorbellSource({ count: queues, context });
    if (mode === 'mmap') {
      const bytes = bar.bytes!;
      this.slots = new Uint32Array(bytes.buffer, bytes.byteOffset + notifyAt, queues);
    }
    bar.ioeventfds.forEach((kick, q) => this.source.ringOnSignal(q, kick));
    this.source.on('ring', (rings: readonly Ring[]) => {
      // Every slot is re-armed before any queue reads its ring.
      if (this.slots) for (const { doorbell } of rings) if (this.source.isWatched(doorbell)) this.rearm(doorbell);
      const seenAt = this.source.lastBatchSeenAt;
      // A watched available index rings with what memory holds, not with what the driver wrote.
      for (const { doorbell, value } of rings) notified(doorbell, mode === 'avail' ? undefined : value, seenAt);
    });
  }

  /**
   * Queue `queue` is enabled: its mapped slot is armed and watched ('mmap'),
   * or the available index of its split ring at `driver` in `dma` ('avail';
   * throws a DMA error when that is not guest memory shared by fd).
   */
  enable(queue: number, split?: { dma: DmaSpace; driver: bigint }): void {
    if (this.slots) {
      this.arm(queue);
      this.source.watchShared(queue, this.bar.shared!, this.notifyAt + queue * NOTIFY_MULTIPLIER, ARMED);
    }
    // idx is the u16 at driver + 2 (2-byte aligned): the aligned word holding it.
    if (this.mode === 'avail' && split) this.source.watchGuest(queue, split.dma, (split.driver + 2n) & ~3n);
  }

  /** Queue `queue` is reset: nothing watches its slot. */
  disable(queue: number): void {
    if (this.source.isWatched(queue)) this.source.unwatch(queue);
  }

  /** A trapped write of `value` to queue `queue`'s slot ('trap', or a write an ioeventfd did not match). */
  write(queue: number, value: number): void {
    this.source.write(queue, value);
  }

  /** The device just published used entries: the driver's next notifications follow soon. */
  expect(): void {
    this.source.poke();
  }

  close(): void {
    this.source.close();
  }

  /** Stores ARMED in `queue`'s mapped slot. */
  private arm(queue: number): void {
    // Sequentially consistent: the store is visible before the queue loads the available index.
    Atomics.store(this.slots!, queue, ARMED);
  }

  /** Arms a watched slot after a notification: the watch takes ARMED as the slot's value, so only the driver's next store rings. */
  private rearm(queue: number): void {
    this.arm(queue);
    this.source.rebase(queue, ARMED);
  }
}
