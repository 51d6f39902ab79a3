/**
 * One virtqueue as device code sees it: the registers the driver programs
 * through the common configuration, and `pop()` / `complete()` over its
 * ring. Processing is batched: on a notification the kit calls the device's
 * `onQueue`, which takes what the driver made available; completions pile up
 * and are published together, with at most one interrupt per batch.
 */
import { UsageError } from '../errors.js';
import type { DmaSpace } from '../dma/space.js';
import { checkSavedChain, saveChain, VirtqueueError, type DescriptorChain, type SavedChain } from './chain.js';
import type { Ring } from './ring.js';
import { SPLIT_ALIGN, SplitRing } from './split.js';
import { PACKED_ALIGN, PackedRing } from './packed.js';
import { EventSuppress, Feature, featureBit, MAX_QUEUE_SIZE, NO_VECTOR } from './spec.js';

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
  /** Where the device takes the next chain: the available ring's index (split), or the ring index with the wrap counter in bit 15 (packed). */
  lastAvail: number;
  /** Where the device writes the next used entry, in the same form. */
  usedIdx: number;
  /** Chains device code held when it was saved, oldest first (queues that hold chains). */
  held: SavedChain[];
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
  private ring: Ring | undefined;
  /** Bumped by every reset: chains of an older incarnation complete into nothing. */
  private generation = 0;
  private inFlight = 0;
  private popsThisTurn = 0;
  private processing = false;
  private flushQueued = false;
  private kickQueued = false;
  /** pop() refused for chains in flight: the next completion comes back for the rest. */
  private full = false;
  /** The chains device code holds, oldest first (only for a queue that `holds`). */
  private held: DescriptorChain[] = [];
  /** Held chains a migration brought: pop() hands them out again before new chains. */
  private restored: SavedChain[] = [];
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
      // kick() attached the views for this synchronous turn (remaps arrive as messages, between turns).
      if (!this.processing) ring.attach(this.host.memory);
      const restored = this.restored.shift();
      const chain = restored === undefined ? ring.pop() : ring.revive(restored);
      if (chain) {
        this.popsThisTurn++;
        this.inFlight++;
        if (this.holds) this.held.push(chain);
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
    if (this.holds) this.held.splice(this.held.indexOf(chain), 1);
    if (this.inFlight === 0) this.wakeIdle();
    if (this.full) {
      this.full = false;
      this.kickSoon();
    }
    // A device that needs a reset answers nothing more: the driver resets it.
    if (!this.host.running) return;
    try {
      // Guest memory may be gone (the client left while the chain was held).
      if (!this.processing) this.ring.attach(this.host.memory);
      this.ring.push(chain, written);
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

  /** queue_enable = 1: checks the layout the driver programmed, in the ring format negotiated. @internal */
  enable(): void {
    if (this.ring) return;
    const features = this.host.features;
    const packed = (features & featureBit(Feature.RING_PACKED)) !== 0n;
    const problem = checkLayout(this, this.maxSize, packed);
    if (problem) return this.host.fail(new VirtqueueError(this.index, problem));
    const layout = {
      queue: this.index, size: this.size, desc: this.desc, driver: this.driver, device: this.device,
      eventIdx: (features & featureBit(Feature.RING_EVENT_IDX)) !== 0n,
      indirect: (features & featureBit(Feature.RING_INDIRECT_DESC)) !== 0n,
      generation: this.generation,
    };
    this.ring = packed ? new PackedRing(layout) : new SplitRing(layout);
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
      lastAvail: this.ring?.availPosition ?? 0, usedIdx: this.ring?.usedPosition ?? 0, held: [...this.restored, ...this.held.map(saveChain)],
    };
  }

  /** Applies a state `checkQueueState` accepted. @internal */
  load(state: QueueState): void {
    this.reset();
    Object.assign(this, { size: state.size, vector: state.vector, desc: state.desc, driver: state.driver, device: state.device });
    if (!state.enabled) return;
    this.enable();
    this.ring!.restore(state.lastAvail, state.usedIdx, state.held);
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

/** Why the driver's layout cannot be a ring of the negotiated format (undefined when it can). */
function checkLayout(q: { size: number; desc: bigint; driver: bigint; device: bigint }, maxSize: number, packed: boolean): string | undefined {
  // A packed ring may have any size (§2.8.10.1); a split one's is a power of two (§2.7).
  if (q.size === 0 || q.size > maxSize || (!packed && (q.size & (q.size - 1)) !== 0)) {
    return packed ? `queue_size ${q.size} is not 1-${maxSize}` : `queue_size ${q.size} is not a power of two up to ${maxSize}`;
  }
  const align = packed ? PACKED_ALIGN : SPLIT_ALIGN;
  for (const part of ['desc', 'driver', 'device'] as const) {
    if (q[part] % align[part] !== 0n) return `the ${part} area at 0x${q[part].toString(16)} is not ${align[part]}-byte aligned`;
  }
  return undefined;
}

/** Why `state` cannot be a queue of up to `maxSize` entries in the negotiated ring format (undefined when it can). */
export function checkQueueState(state: QueueState, maxSize: number, vectors: number, holds: boolean, packed: boolean): string | undefined {
  const { size } = state;
  if (!Array.isArray(state.held) || (!holds && state.held.length > 0)) return 'held chains do not fit this queue';
  if (!Number.isInteger(size) || size < 0 || size > Math.min(maxSize, MAX_QUEUE_SIZE)) return `size ${size} exceeds ${maxSize}`;
  if (state.vector !== NO_VECTOR && state.vector >= vectors) return `vector ${state.vector} is past the ${vectors} MSI-X vectors`;
  if (!state.enabled) return state.held.length > 0 ? 'a disabled queue holds chains' : undefined;
  const layout = checkLayout(state, maxSize, packed);
  if (layout) return layout;
  for (const chain of state.held) {
    const problem = checkSavedChain(chain, size);
    if (problem) return problem;
  }
  if (!packed) {
    const inFlight = (state.lastAvail - state.usedIdx) & 0xffff;
    return inFlight === state.held.length ? undefined : `${inFlight} chains were in flight when it was saved, ${state.held.length} of them held`;
  }
  // Packed: positions inside the ring; the entries between them are exactly the held chains' (distinct IDs).
  const index = (p: number) => p & ~EventSuppress.WRAP;
  if (index(state.lastAvail) >= size || index(state.usedIdx) >= size) return `a ring position is past the queue size ${size}`;
  const lap = (p: number) => index(p) + (p & EventSuppress.WRAP ? 0 : size);
  const between = (lap(state.lastAvail) - lap(state.usedIdx) + 2 * size) % (2 * size);
  const slots = state.held.reduce((sum, c) => sum + c.slots, 0);
  if (between !== slots) return `${between} ring entries were in flight when it was saved, the held chains took ${slots}`;
  if (new Set(state.held.map((c) => c.id)).size !== state.held.length) return 'two held chains have one buffer id';
  return undefined;
}
