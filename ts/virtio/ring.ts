/**
 * What a `Virtqueue` needs from its ring layout, split (§2.7) or packed
 * (§2.8): the driver's negotiation picks one per device, device code sees
 * neither.
 */
import type { DmaSpace } from '../dma/space.js';
import { DmaAccessError, DmaViewError } from '../dma/errors.js';
import { VirtqueueError, type DescriptorChain, type SavedChain } from './chain.js';

/** Where a driver put a queue, and how it was negotiated. */
export interface RingLayout {
  queue: number;
  size: number;
  desc: bigint;
  driver: bigint;
  device: bigint;
  eventIdx: boolean;
  indirect: boolean;
  /** The queue incarnation its chains belong to. */
  generation: number;
}

/** The ring a `Virtqueue` drives (not exported from the package). */
export interface Ring {
  /** Where the next chain is taken and the next used entry written, as migration saves them. */
  readonly availPosition: number;
  readonly usedPosition: number;
  /**
   * Views of the ring in `memory`, made again when the client changed or
   * unmapped the window under them.
   */
  attach(memory: DmaSpace): void;
  /** The next available chain, walked and checked; undefined when the ring is empty. */
  pop(): DescriptorChain | undefined;
  /** Writes the used entry of `chain`; the driver is told at the next `publish()`. */
  push(chain: DescriptorChain, written: number): void;
  /** Makes pushed entries visible; returns whether the driver asked to be interrupted for them. */
  publish(): boolean;
  /**
   * Asks the driver not to notify while the device is taking chains anyway
   * (`quiet`), or to notify for the next chain. Returns whether chains arrived
   * that the driver may not have notified for: take them before sleeping.
   */
  notifications(quiet: boolean): boolean;
  /** Continues from saved positions with `held` chains in flight (a queue enabled by a migration). */
  restore(availPosition: number, usedPosition: number, held: readonly SavedChain[]): void;
  /** A chain migration carried, checked against guest memory again. */
  revive(saved: SavedChain): DescriptorChain;
}

/** A zero-copy view of one part of a ring; it must lie in one shared, writable window. @internal */
export function ringView(memory: DmaSpace, queue: number, iova: bigint, length: number, what: string): Uint8Array {
  try {
    return memory.view(iova, length);
  } catch (error) {
    if (error instanceof DmaViewError || error instanceof DmaAccessError) {
      throw new VirtqueueError(queue, `the ${what} (${length} bytes at 0x${iova.toString(16)}) is not in one shared, writable window of guest memory: ${error.message}`);
    }
    throw error;
  }
}
