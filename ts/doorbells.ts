/**
 * `DoorbellSource`: a device's doorbells, whatever the VMM offers, as one
 * stream of batches. A doorbell is a number (0 to `count - 1`, the device's
 * own numbering: NVMe's SQ/CQ doorbells, virtio's queues) whose value arrives
 * one of three ways:
 *
 * - written to a trapped register (REGION_WRITE): the device's BAR handler
 *   passes it on with `write(doorbell, value)`;
 * - signalled through an ioeventfd, which carries no value: `kick(doorbell)`,
 *   or `ringOnSignal(doorbell, ioeventfd)` to wire it;
 * - stored to memory the device watches: a mapped BAR page the guest writes
 *   with no exit (`watchShared`), or a page of guest memory (`watchGuest`,
 *   shadow doorbells). A store signals nothing, so the words are read, by
 *   native code on this thread's own event loop: on every turn of the loop
 *   for a while after activity (a ring found, or `poke()`, which a device
 *   calls when it expects doorbells: it just posted completions), during
 *   which the loop does not block; then after sleeps that start at 10 µs
 *   and double up to `maxSleepMicros`; not at all while nothing is watched.
 *   The spin adapts to the driver: it lasts 1.5x the driver's last wait from
 *   activity to ring, or the longer of its last two when they were alike
 *   (neither twice the other), at least 20 µs, when that was within
 *   `spinMicros`, else 20 µs: a host that polls costs a short spin, an
 *   emulated guest answering in hundreds of µs is still caught spinning,
 *   after its slower answers too.
 *   No other thread is involved: a ring found is handled in the same turn
 *   of the loop. The time it takes is in `stats()`. Spins follow trapped
 *   writes and kicks too (timed the same way): with nothing watched, a spin
 *   keeps the loop from blocking, so the next message or ioeventfd is read
 *   without waking the thread; then it spins only for a driver that
 *   answered within 50 µs (a guest under TCG answers in hundreds, and its
 *   VMM needs the core meanwhile). A spin that has run 50 µs (past any
 *   polling host's answer) yields the core on each turn, so a VMM thread
 *   woken on it runs at once.
 *
 * A doorbell watched in memory takes its value from memory: a trapped write
 * or a kick of it only says "look now" (as with NVMe shadow doorbells or a
 * virtio event index). Every way ends in `'ring'` events on this thread, one
 * per batch, each doorbell once with its latest value. A ring may repeat a
 * value the device has already acted on (a kick, or a value the device read
 * from memory itself first): device code treats a ring as "this doorbell
 * now reads `value`", never as "one more". Values come from the guest:
 * validate them.
 */
import { EventEmitter } from 'node:events';
import { native, type NativeDoorbellWatcher } from './native.js';
import { UsageError } from './errors.js';
import type { SharedMemory } from './dma/shared-memory.js';
import type { DmaSpace } from './dma/space.js';
import { AsyncDmaRequiredError, DmaAccessError } from './dma/errors.js';
import { Errno } from './protocol/index.js';
import type { IoEventfd } from './pci/ioeventfds.js';
import type { DeviceContext } from './boundary.js';

export interface Ring {
  readonly doorbell: number;
  /** The doorbell's value; undefined for a kick of a doorbell with no value anywhere (an ioeventfd of an unwatched doorbell). */
  readonly value: number | undefined;
}

export interface DoorbellTiming {
  /** How late after activity a spin may still run, in microseconds (default 500; spins adapt within it): bounds the CPU one activity costs. */
  spinMicros?: number;
  /** The longest sleep between scans once idle, in microseconds (default 4000): the worst delay after a quiet spell. */
  maxSleepMicros?: number;
}

export interface DoorbellSourceOptions extends DoorbellTiming {
  /** How many doorbells the device has (numbered from 0). */
  count: number;
  /**
   * The device's error boundary (`device.context`): `'ring'` listeners run
   * under it, so one that throws fails the device, not the process.
   */
  context?: DeviceContext;
}

export interface DoorbellStats {
  /** Batches delivered as `'ring'` events. */
  batches: number;
  /** Rings delivered. */
  rings: number;
  /** Batches found in watched memory (or put there by kicks of watched doorbells). */
  wakes: number;
  /** Spin phases begun. */
  spins: number;
  /** Scans of the watched words. */
  scans: number;
  /** Sleeps between scans (each ends in a wake-up of the loop). */
  sleeps: number;
  /** Time watching took on this thread, in microseconds: whole spin phases (the loop does not block in them) and the scans after sleeps. */
  cpuMicros: number;
}

export interface DoorbellSourceEvents {
  ring: [rings: readonly Ring[]];
}

const DEFAULT_SPIN_MICROS = 500;
const DEFAULT_MAX_SLEEP_MICROS = 4000;

export class DoorbellSource extends EventEmitter<DoorbellSourceEvents> {
  readonly count: number;
  private readonly watcher: NativeDoorbellWatcher;
  private readonly watched = new Set<number>();
  /** Rings of unwatched doorbells (trapped writes, kicks) waiting for the flush. */
  private readonly written = new Map<number, number | undefined>();
  private readonly takenDoorbells: Uint32Array;
  private readonly takenValues: Uint32Array;
  private readonly signals = new Map<IoEventfd, () => void>();
  private timing: Required<DoorbellTiming>;
  private readonly context: DeviceContext | undefined;
  private flushQueued = false;
  private closed = false;
  private seenAt = Number.NaN;
  private batches = 0;
  private rings = 0;

  constructor(options: DoorbellSourceOptions) {
    super();
    if (!Number.isSafeInteger(options.count) || options.count < 1 || options.count > 0x10000) {
      throw new UsageError(`count ${String(options.count)} must be an integer from 1 to 65536`);
    }
    this.count = options.count;
    this.context = options.context;
    this.timing = { spinMicros: DEFAULT_SPIN_MICROS, maxSleepMicros: DEFAULT_MAX_SLEEP_MICROS };
    this.timing = this.checkTiming(options);
    this.watcher = new native.NativeDoorbellWatcher(this.timing);
    this.takenDoorbells = new Uint32Array(this.count);
    this.takenValues = new Uint32Array(this.count);
    this.watcher.listen(() => this.flush());
  }

  /** Changes how watched memory is scanned. */
  configure(timing: DoorbellTiming): void {
    this.open();
    this.timing = this.checkTiming(timing);
    this.watcher.configure(this.timing);
  }

  /**
   * Watches `doorbell`'s value in the 32-bit word at `offset` of `memory`
   * (a shared BAR's memory, which the guest maps). Rings start with the
   * first value that differs from `baseline` (default: the word now).
   * Replaces an earlier watch of the doorbell and any ring of it not yet delivered.
   */
  watchShared(doorbell: number, memory: SharedMemory, offset: number, baseline?: number): void {
    this.open();
    this.check(doorbell);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset % 4 !== 0 || offset + 4 > memory.size) {
      throw new UsageError(`offset ${String(offset)} is not an aligned word inside the ${memory.size}-byte memory`);
    }
    this.watchWord(doorbell, () => this.watcher.watch(doorbell, memory.nativeMapping(), offset, checkedBaseline(baseline)));
  }

  /**
   * Watches `doorbell`'s value in the 32-bit word at `iova` of guest memory
   * (shadow doorbells). The window must be mapped with an fd; the watch
   * keeps reading the memory it found until `unwatch`, even after the
   * client unmaps it, so unwatch when the device stops using the page.
   * Throws `DmaAccessError` (EFAULT) where no window covers the word and
   * `AsyncDmaRequiredError` for a window without an fd.
   */
  watchGuest(doorbell: number, dma: DmaSpace, iova: bigint, baseline?: number): void {
    this.open();
    this.check(doorbell);
    if (iova % 4n !== 0n) throw new UsageError(`guest address 0x${iova.toString(16)} is not 4-byte aligned`);
    const window = dma.list().find((w) => iova >= w.iova && iova + 4n <= w.end);
    if (!window) throw new DmaAccessError(Errno.EFAULT, iova, 4, 'no DMA window covers it');
    if (!window.mapping) throw new AsyncDmaRequiredError(iova);
    const mapping = window.mapping;
    this.watchWord(doorbell, () => this.watcher.watch(doorbell, mapping, Number(iova - window.iova), checkedBaseline(baseline)));
  }

  /**
   * The device stored `value` into watched `doorbell`'s word itself (a
   * re-arm): only a later store of another value rings. Drops a ring of
   * it not yet delivered; unlike `watchShared`, it is not activity (no spin).
   */
  rebase(doorbell: number, value: number): void {
    this.open();
    this.check(doorbell);
    if (!this.watched.has(doorbell)) throw new UsageError(`doorbell ${doorbell} is not watched in memory`);
    this.watcher.rebase(doorbell, value >>> 0);
  }

  /** Stops watching `doorbell` in memory, dropping a ring of it not yet delivered. */
  unwatch(doorbell: number): void {
    this.open();
    this.check(doorbell);
    this.watcher.unwatch(doorbell);
    this.watched.delete(doorbell);
  }

  /** Whether `doorbell`'s value is watched in memory. */
  isWatched(doorbell: number): boolean {
    return this.watched.has(doorbell);
  }

  /** A trapped write of `value` to `doorbell`'s register (for a watched doorbell: look at its memory now). */
  write(doorbell: number, value: number): void {
    this.open();
    this.check(doorbell);
    if (this.watched.has(doorbell)) this.watcher.look(doorbell);
    else {
      this.written.set(doorbell, value >>> 0);
      this.watcher.rung();
    }
    this.queueFlush();
  }

  /** A signal with no value (an ioeventfd fired): a watched doorbell rings with its memory's value, another with none. */
  kick(doorbell: number): void {
    this.open();
    this.check(doorbell);
    if (this.watched.has(doorbell)) this.watcher.look(doorbell);
    else {
      if (!this.written.has(doorbell)) this.written.set(doorbell, undefined);
      this.watcher.rung();
    }
    this.queueFlush();
  }

  /** Kicks `doorbell` whenever `ioeventfd` is signalled, until `close()` (or another doorbell takes it). */
  ringOnSignal(doorbell: number, ioeventfd: IoEventfd): void {
    this.open();
    this.check(doorbell);
    const previous = this.signals.get(ioeventfd);
    if (previous) ioeventfd.off('signal', previous);
    const listener = () => {
      if (!this.closed) this.kick(doorbell);
    };
    this.signals.set(ioeventfd, listener);
    ioeventfd.on('signal', listener);
  }

  /**
   * The device expects doorbells soon (it just posted completions, so the
   * guest will answer): the loop spins again around when the driver
   * answered last time (within `spinMicros`), scanning watched memory on
   * every turn. With nothing watched the spin still keeps the loop from
   * blocking, so a doorbell that comes as a trapped write or an ioeventfd is
   * read without waking the thread. Without pokes, watching only sleeps
   * between scans.
   */
  poke(): void {
    if (!this.closed) this.watcher.poke();
  }

  stats(): DoorbellStats {
    this.open();
    return { batches: this.batches, rings: this.rings, ...this.watcher.stats() };
  }

  /**
   * When the batch being delivered (or last delivered) was first seen, in
   * `performance.now()` time: the moment native code found its first ring
   * in watched memory, before JS ran. NaN for a batch of trapped writes and
   * kicks only, which are seen as they are delivered. Read it in a `'ring'`
   * listener to time a doorbell's way to the device.
   */
  get lastBatchSeenAt(): number {
    return this.seenAt;
  }

  /** Stops watching (watched memory is released) and listening to ioeventfds; idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const [ioeventfd, listener] of this.signals) ioeventfd.off('signal', listener);
    this.signals.clear();
    this.watched.clear();
    this.written.clear();
    this.watcher.close();
  }

  private watchWord(doorbell: number, watch: () => void): void {
    watch();
    this.watched.add(doorbell);
    this.written.delete(doorbell);
  }

  private queueFlush(): void {
    if (this.flushQueued) return;
    this.flushQueued = true;
    // Writes that arrive together (one read of the socket) make one batch.
    queueMicrotask(() => {
      this.flushQueued = false;
      this.flush();
    });
  }

  private flush(): void {
    if (this.closed) return;
    const n = this.watcher.take(this.takenDoorbells, this.takenValues);
    if (n === 0 && this.written.size === 0) return;
    const age = n > 0 ? this.watcher.takenAgeMicros() : -1;
    this.seenAt = age >= 0 ? performance.now() - age / 1000 : Number.NaN;
    const rings: Ring[] = [];
    for (let i = 0; i < n; i++) rings.push({ doorbell: this.takenDoorbells[i], value: this.takenValues[i] });
    for (const [doorbell, value] of this.written) rings.push({ doorbell, value });
    this.written.clear();
    this.batches++;
    this.rings += rings.length;
    if (this.context) this.context.run(() => this.emit('ring', rings));
    else this.emit('ring', rings);
  }

  private check(doorbell: number): void {
    if (!Number.isInteger(doorbell) || doorbell < 0 || doorbell >= this.count) {
      throw new UsageError(`doorbell ${String(doorbell)} is not one of 0 to ${this.count - 1}`);
    }
  }

  private checkTiming(timing: DoorbellTiming): Required<DoorbellTiming> {
    const next = { ...this.timing, ...definedOnly(timing) };
    const micros = (value: number, name: string, min: number) => {
      if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > 60e6) {
        throw new UsageError(`${name} ${String(value)} must be a number of microseconds from ${min} to 60000000`);
      }
    };
    micros(next.spinMicros, 'spinMicros', 0);
    micros(next.maxSleepMicros, 'maxSleepMicros', 1);
    return next;
  }

  private open(): void {
    if (this.closed) throw new UsageError('the doorbell source is closed');
  }
}

function checkedBaseline(baseline: number | undefined): number | undefined {
  if (baseline === undefined) return undefined;
  if (!Number.isInteger(baseline) || baseline < 0 || baseline > 0xffffffff) throw new UsageError(`baseline ${baseline} is not a 32-bit unsigned value`);
  return baseline;
}

function definedOnly(timing: DoorbellTiming): DoorbellTiming {
  const out: DoorbellTiming = {};
  if (timing.spinMicros !== undefined) out.spinMicros = timing.spinMicros;
  if (timing.maxSleepMicros !== undefined) out.maxSleepMicros = timing.maxSleepMicros;
  return out;
}
