/**
 * Where the controller's doorbell values come from, as one DoorbellSource
 * (the library's): doorbell `index` is SQ y's tail for 2y and CQ y's head
 * for 2y + 1 (CAP.DSTRD 0), a word of BAR0's doorbell page at 0x1000 + 4 * index.
 *
 * - 'mmap': the page is shared memory the VMM maps for its guest, so the
 *   guest rings with plain stores and no exit; the source watches each
 *   queue's word. A VMM that does not map it writes the same bytes with
 *   REGION_WRITE (the library stores them in the page), so both end the same way.
 * - 'trap': each doorbell write is a REGION_WRITE the controller passes on.
 * - 'ioeventfd': each I/O queue doorbell has an ioeventfd (a kick with no
 *   value): the value comes from the shadow doorbells, and a kick before
 *   Doorbell Buffer Config has nothing to act on.
 * With shadow doorbells (any mode), an I/O queue's value lives in the
 * shadow page of guest memory: the source also watches that word (as
 * doorbell SHADOW + index, so the register's own word still rings), and
 * every ring of a shadowed doorbell only says "look now": the controller
 * reads the value through its own view of the page, which follows the
 * client's remaps (a watch keeps the memory it started on).
 *
 * In 'mmap' mode an I/O CQ's head is read on demand (`latest`), not
 * watched: the host stores it after taking each interrupt's completions,
 * which asks nothing of the controller unless it waits for room in that CQ
 * (or holds an INTx level up for it). Watching it ran the controller once
 * more per interrupt for nothing, and a TCG guest's QD1 paid for it. The
 * controller watches such a head only while it waits on it (`awaitHead`).
 */
import { DoorbellSource, type DeviceContext, type DmaSpace, type PciBar, type Ring } from 'vfio-user';
import type { ShadowDoorbells } from './shadow.js';

export type DoorbellMode = 'mmap' | 'trap' | 'ioeventfd';

/** Offset of the doorbell page in BAR0. */
export const DOORBELLS = 0x1000;
/** Doorbells the page holds (a dword each). */
export const DOORBELL_COUNT = 0x1000 / 4;
/** Doorbell `SHADOW + index` is `index`'s word in the shadow page. */
export const SHADOW = DOORBELL_COUNT;

export class Doorbells {
  readonly source: DoorbellSource;
  private shadow: ShadowDoorbells | undefined;
  /** On-demand doorbells watched while the controller waits on them (`awaitHead`). */
  private readonly awaited = new Set<number>();

  constructor(
    readonly mode: DoorbellMode,
    private readonly bar: PciBar,
    /** The device's error boundary: the controller's handling of a batch runs under it. */
    context: DeviceContext,
  ) {
    this.source = new DoorbellSource({ count: 2 * DOORBELL_COUNT, context });
    // Ioeventfd i is doorbell 2 + i (queue 1's SQ tail first).
    bar.ioeventfds.forEach((kick, i) => this.source.ringOnSignal(i + 2, kick));
  }

  /** Calls `ring` with each batch of doorbells that changed. */
  onRing(ring: (rings: readonly Ring[]) => void): void {
    this.source.on('ring', ring);
  }

  /** A trapped write of doorbell `index` ('trap' mode; or any write the VMM forwards). */
  write(index: number, value: number): void {
    this.source.write(index, value);
  }

  /**
   * Watches queue doorbells where the host stores them: the mapped page
   * ('mmap'; nothing to watch for trapped writes and kicks), and an I/O
   * queue's shadow word once there is a shadow page. `values` are what the
   * controller holds for each: a doorbell rings once its value differs.
   * Throws a DMA error when the shadow page is not guest memory with an fd.
   */
  watch(values: ReadonlyMap<number, number>, dma: DmaSpace, shadow = this.shadow): void {
    for (const [index, value] of values) {
      if (this.readsOnDemand(index) && !this.awaited.has(index)) {
        this.unwatch(index);
        continue;
      }
      if (this.mode === 'mmap') this.source.watchShared(index, this.bar.shared!, DOORBELLS + 4 * index, value);
      // Only in 'mmap' mode: elsewhere the host rings (a trap, a kick) whenever EventIdx asks,
      // and watching would only cost CPU for doorbells that ring anyway.
      if (shadow && index >= 2 && this.mode === 'mmap') this.source.watchGuest(SHADOW + index, dma, shadow.shadow + BigInt(4 * index), value);
      else if (this.source.isWatched(SHADOW + index)) this.source.unwatch(SHADOW + index);
    }
  }

  /** A new queue's doorbell reads 0: a value left from an earlier queue with its ID must not read as new entries. */
  added(index: number, dma: DmaSpace): void {
    if (this.shadow && index >= 2) this.shadow.reset(index, 0);
    if (this.mode === 'mmap') this.page()[index] = 0;
    this.watch(new Map([[index, 0]]), dma);
  }

  removed(index: number): void {
    this.awaited.delete(index);
    this.unwatch(index);
  }

  /** Whether doorbell `index` is an I/O CQ head read on demand ('mmap' mode). */
  readsOnDemand(index: number): boolean {
    return this.mode === 'mmap' && index > 2 && (index & 1) === 1;
  }

  /**
   * The host's latest value of on-demand doorbell `index`: its shadow word
   * (a DMA error when that page is no longer guest memory), else its word
   * of the mapped page.
   */
  latest(index: number): number {
    return this.shadow ? this.shadow.value(index) : this.page()[index]!;
  }

  /**
   * Watches on-demand doorbell `index`, which the controller holds at
   * `value`, until `ignoreHead`: it rings when the host moves it. Throws a DMA
   * error when the shadow page is not guest memory with an fd.
   */
  awaitHead(index: number, value: number, dma: DmaSpace): void {
    if (this.awaited.has(index)) return;
    this.awaited.add(index);
    try {
      this.watch(new Map([[index, value]]), dma);
    } catch (error) {
      this.awaited.delete(index);
      throw error;
    }
  }

  /** Stops watching on-demand doorbell `index` (`awaitHead`). */
  ignoreHead(index: number): void {
    if (this.awaited.delete(index)) this.unwatch(index);
  }

  /**
   * Doorbell Buffer Config (or migration): I/O queue doorbells are watched
   * in `shadow` from now on. On a DMA error nothing changes.
   */
  useShadow(shadow: ShadowDoorbells | undefined, dma: DmaSpace, values: ReadonlyMap<number, number>): void {
    try {
      this.watch(values, dma, shadow);
    } catch (error) {
      this.watch(values, dma);
      throw error;
    }
    this.shadow = shadow;
  }

  /** Stops watching doorbell `index` wherever it is watched. */
  private unwatch(index: number): void {
    for (const doorbell of [index, SHADOW + index]) if (this.source.isWatched(doorbell)) this.source.unwatch(doorbell);
  }

  /** A controller reset: no queue is left, the page reads 0, no shadow pages. */
  reset(): void {
    for (let index = 0; index < DOORBELL_COUNT; index++) this.removed(index);
    if (this.mode === 'mmap') this.page().fill(0);
    this.shadow = undefined;
    for (const kick of this.bar.ioeventfds) kick.take();
  }

  /** The device expects doorbells soon (it just posted completions). */
  expect(): void {
    this.source.poke();
  }

  close(): void {
    this.source.close();
  }

  private page(): Uint32Array {
    const bytes = this.bar.bytes!;
    return new Uint32Array(bytes.buffer, bytes.byteOffset + DOORBELLS, DOORBELL_COUNT);
  }
}
