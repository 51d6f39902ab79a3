/**
 * One virtqueue as device code sees it: the registers the driver programs
 * through the common configuration, and `pop()` / `complete()` over its
 * ring. Processing is batched: on a notification the kit calls the device's
 * `onQueue`, which takes what the driver made available; completions pile up
 * and are published together, with at most one interrupt per batch.
 */
import { UsageError } from '../errors.js';
import type { DmaSpace } from '../dma/space.js';
import { VirtqueueError, type DescriptorChain } from './chain.js';
import { SPLIT_ALIGN, SplitRing } from './split.js';
import { Feature, featureBit, MAX_QUEUE_SIZE, NO_VECTOR } from './spec.js';

/** What a queue needs from its device. @internal */
export interface QueueHost {
  readonly memory: DmaSpace;
  /** The negotiated features. */
  readonly features: bigint;
  /** DRIVER_OK, not NEEDS_RESET, not stopped for migration: the device may touch the rings. */
  readonly running: boolean;
  /** The device's onQueue. */
  process(queue: Virtqueue): void;
  interrupt(queue: Virtqueue): void;
  /** The driver broke the rules (or device code threw): NEEDS_RESET. */
  fail(error: unknown): void;
}

/** Rounds of onQueue per notification before yielding to the event loop. */
const ROUNDS_PER_TURN = 4;

/** A queue's driver-programmed registers, as saved for migration. */
export interface QueueState {
  size: number;
  vector: number;
  enabled: boolean;
  desc: bigint;
  driver: bigint;
  device: bigint;
  lastAvail: number;
  usedIdx: number;
  /** Heads device code held when it was saved, oldest first (queues that hold chains). */
  held: number[];
}

export class Virtqueue {
  /** queue_size: the driver may shrink it from `maxSize` before enabling. */
  size: number;
  /** queue_msix_vector. */
  vector = NO_VECTOR;
  desc = 0n;
  driver = 0n;
  device = 0n;
  /** queue_reset reads 1 after a reset until the queue is enabled again. */
  resetDone = false;
  private ring: SplitRing | undefined;
  /** Bumped by every reset: chains of an older incarnation complete into nothing. */
  private generation = 0;
  private inFlight = 0;
  private popsThisTurn = 0;
  private processing = false;
  private flushQueued = false;
  private kickQueued = false;
  /** pop() refused for chains in flight: the next completion comes back for the rest. */
  private full = false;
  /** Heads of the chains device code holds, oldest first (only for a queue that `holds`). */
  private held: number[] = [];
  /** Held heads a migration brought: pop() hands them out again before new chains. */
  private restored: number[] = [];
  private idleWaiters: (() => void)[] = [];

  /** @internal Queues are made by their VirtioDevice. */
  constructor(
    readonly index: number,
    readonly maxSize: number,
    private readonly host: QueueHost,
    /** Device code keeps chains until something happens (receive buffers): migration carries them. */
    readonly holds = false,
  ) {
    this.size = maxSize;
  }

  get enabled(): boolean {
    return this.ring !== undefined;
  }

  /** Chains popped and not completed yet. */
  get pending(): number {
    return this.inFlight;
  }

  /**
   * The next chain the driver made available, checked (a broken one marks
   * the device NEEDS_RESET and ends the batch: undefined). Undefined when the
   * queue is empty, not running, after a queue's worth of chains in one turn
   * of the event loop, or while a queue's worth is in flight (the kit comes
   * back for the rest).
   */
  pop(): DescriptorChain | undefined {
    const ring = this.ring;
    if (!ring || !this.host.running) return undefined;
    if (this.popsThisTurn >= this.size) {
      this.kickSoon();
      return undefined;
    }
    // A driver cannot have more chains outstanding than descriptors; one re-offering heads still
    // in flight would otherwise grow the device's work without bound. Completions resume it.
    if (this.inFlight >= this.size) {
      this.full = true;
      return undefined;
    }
    try {
      ring.attach(this.host.memory);
      const restored = this.restored.shift();
      const chain = restored === undefined ? ring.pop() : ring.chainAt(restored);
      if (chain) {
        this.popsThisTurn++;
        this.inFlight++;
        if (this.holds) this.held.push(chain.head);
      }
      return chain;
    } catch (error) {
      this.host.fail(error);
      return undefined;
    }
  }

  /**
   * Returns `chain` to the driver with `written` bytes (default: what
   * `chain.writeAt` wrote). Entries completed in one turn go out together.
   * A chain from before a queue or device reset is dropped.
   */
  complete(chain: DescriptorChain, written = chain.written): void {
    if (chain.generation !== this.generation || !this.ring) return;
    if (!Number.isInteger(written) || written < 0 || written > chain.writableLength) {
      throw new UsageError(`queue ${this.index}: ${written} bytes written, but the chain has ${chain.writableLength} writable bytes`);
    }
    this.inFlight--;
    if (this.holds) this.held.splice(this.held.indexOf(chain.head), 1);
    if (this.inFlight === 0) this.wakeIdle();
    if (this.full) {
      this.full = false;
      this.kickSoon();
    }
    // A device that needs a reset answers nothing more: the driver resets it.
    if (!this.host.running) return;
    try {
      // Guest memory may be gone (the client left while the chain was held).
      this.ring.attach(this.host.memory);
      this.ring.push(chain.head, written);
    } catch (error) {
      this.host.fail(error);
      return;
    }
    if (!this.flushQueued && !this.processing) {
      this.flushQueued = true;
      queueMicrotask(() => this.flush());
    }
  }

  /** The driver notified (or the kit re-checks): run onQueue until the ring is quiet. @internal */
  kick(): void {
    const ring = this.ring;
    if (!ring || !this.host.running || this.processing) return;
    this.processing = true;
    this.popsThisTurn = 0;
    try {
      ring.attach(this.host.memory);
      for (let round = 0; ; round++) {
        if (round === ROUNDS_PER_TURN) {
          this.kickSoon();
          break;
        }
        ring.notifications(true);
        this.host.process(this);
        if (!this.ring || !this.host.running) break;
        if (!ring.notifications(false)) break;
      }
    } catch (error) {
      this.host.fail(error);
    } finally {
      this.processing = false;
      this.flush();
    }
  }

  /** Publishes completed entries and interrupts if the driver wants it. */
  flush(): void {
    this.flushQueued = false;
    if (!this.ring || !this.host.running) return;
    try {
      if (this.ring.publish()) this.host.interrupt(this);
    } catch (error) {
      this.host.fail(error);
    }
  }

  /** Resolves once every chain popped so far is completed (or forgotten by a reset). */
  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private wakeIdle(): void {
    for (const wake of this.idleWaiters.splice(0)) wake();
  }

  /** queue_enable = 1: checks the layout the driver programmed. @internal */
  enable(): void {
    if (this.ring) return;
    const fail = (reason: string) => this.host.fail(new VirtqueueError(this.index, reason));
    if (this.size === 0 || this.size > this.maxSize || (this.size & (this.size - 1)) !== 0) return fail(`queue_size ${this.size} is not a power of two up to ${this.maxSize}`);
    for (const part of ['desc', 'driver', 'device'] as const) {
      if (this[part] % SPLIT_ALIGN[part] !== 0n) return fail(`the ${part} area at 0x${this[part].toString(16)} is not ${SPLIT_ALIGN[part]}-byte aligned`);
    }
    const features = this.host.features;
    this.ring = new SplitRing({
      queue: this.index, size: this.size, desc: this.desc, driver: this.driver, device: this.device,
      eventIdx: (features & featureBit(Feature.RING_EVENT_IDX)) !== 0n,
      indirect: (features & featureBit(Feature.RING_INDIRECT_DESC)) !== 0n,
    });
    this.ring.restore(0, 0, this.generation);
    this.resetDone = false;
  }

  /** Device reset or queue_reset: back to power-on values; chains in flight are forgotten. @internal */
  reset(): void {
    this.ring = undefined;
    this.generation++;
    this.inFlight = 0;
    this.full = false;
    this.held = [];
    this.restored = [];
    this.wakeIdle();
    this.size = this.maxSize;
    this.vector = NO_VECTOR;
    this.desc = this.driver = this.device = 0n;
  }

  /** @internal */
  save(): QueueState {
    return {
      size: this.size, vector: this.vector, enabled: this.enabled, desc: this.desc, driver: this.driver, device: this.device,
      lastAvail: this.ring?.lastAvail ?? 0, usedIdx: this.ring?.usedIdx ?? 0, held: [...this.restored, ...this.held],
    };
  }

  /** Applies a state `checkQueueState` accepted. @internal */
  load(state: QueueState): void {
    this.reset();
    Object.assign(this, { size: state.size, vector: state.vector, desc: state.desc, driver: state.driver, device: state.device });
    if (!state.enabled) return;
    this.enable();
    this.ring!.restore(state.lastAvail, state.usedIdx, this.generation);
    this.restored = [...state.held];
  }

  private kickSoon(): void {
    if (this.kickQueued) return;
    this.kickQueued = true;
    setImmediate(() => {
      this.kickQueued = false;
      this.kick();
    });
  }
}

/** Why `state` cannot be a queue of up to `maxSize` entries (undefined when it can). */
export function checkQueueState(state: QueueState, maxSize: number, vectors: number, holds: boolean): string | undefined {
  const { size } = state;
  if (!Array.isArray(state.held) || (!holds && state.held.length > 0)) return 'held chains do not fit this queue';
  if (!Number.isInteger(size) || size < 0 || size > Math.min(maxSize, MAX_QUEUE_SIZE)) return `size ${size} exceeds ${maxSize}`;
  if (state.vector !== NO_VECTOR && state.vector >= vectors) return `vector ${state.vector} is past the ${vectors} MSI-X vectors`;
  if (!state.enabled) return undefined;
  if (size === 0 || (size & (size - 1)) !== 0) return `size ${size} is not a power of two`;
  for (const part of ['desc', 'driver', 'device'] as const) {
    if (state[part] % SPLIT_ALIGN[part] !== 0n) return `the ${part} area is not ${SPLIT_ALIGN[part]}-byte aligned`;
  }
  const inFlight = (state.lastAvail - state.usedIdx) & 0xffff;
  if (inFlight !== state.held.length) return `${inFlight} chains were in flight when it was saved, ${state.held.length} of them held`;
  if (state.held.some((head) => !Number.isInteger(head) || head < 0 || head >= size)) return `a held head is past the queue size ${size}`;
  return undefined;
}
