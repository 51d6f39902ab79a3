/**
 * Interrupt lines: the client's eventfds per IRQ index and vector, with
 * masking and pending state, as SET_IRQS wires them (§6.8).
 */
import { closeFds, native } from '../native.js';
import { IrqIndex, SetIrqsFlags, type SetIrqs } from '../protocol/index.js';

class Vectors {
  fds: number[];
  masked: boolean[];
  pending: boolean[];

  constructor(readonly count: number) {
    this.fds = new Array<number>(count).fill(-1);
    this.masked = new Array<boolean>(count).fill(false);
    this.pending = new Array<boolean>(count).fill(false);
  }
}

export class Interrupts {
  private readonly indexes: Vectors[];
  /** Signals delivered per index (for tests, tools and statistics). */
  readonly delivered: number[];

  constructor(counts: readonly number[]) {
    this.indexes = counts.map((n) => new Vectors(n));
    this.delivered = counts.map(() => 0);
  }

  count(index: number): number {
    return this.indexes[index]?.count ?? 0;
  }

  /** Whether the client wired an eventfd to this vector. */
  connected(index: number, vector: number): boolean {
    return (this.indexes[index]?.fds[vector] ?? -1) >= 0;
  }

  isMasked(index: number, vector: number): boolean {
    return this.indexes[index]?.masked[vector] ?? false;
  }

  isPending(index: number, vector: number): boolean {
    return this.indexes[index]?.pending[vector] ?? false;
  }

  /**
   * Fires a vector: signals its eventfd, or holds it pending while masked.
   * INTx masks itself on delivery (AUTOMASKED), as VFIO does for a level
   * interrupt; the client unmasks it once the guest has handled it.
   */
  trigger(index: number, vector = 0): boolean {
    const v = this.indexes[index];
    if (!v || vector >= v.count) return false;
    if (v.masked[vector]) {
      v.pending[vector] = true;
      return false;
    }
    if (v.fds[vector] < 0) return false;
    native.eventfdSignal(v.fds[vector]);
    this.delivered[index]++;
    if (index === IrqIndex.INTX) v.masked[vector] = true;
    return true;
  }

  mask(index: number, vector: number): void {
    const v = this.indexes[index];
    if (v && vector < v.count) v.masked[vector] = true;
  }

  /** Unmasks; a vector that fired while masked is delivered now. */
  unmask(index: number, vector: number): void {
    const v = this.indexes[index];
    if (!v || vector >= v.count) return;
    v.masked[vector] = false;
    if (v.pending[vector]) {
      v.pending[vector] = false;
      this.trigger(index, vector);
    }
  }

  /** Forgets a pending event (the condition went away before unmask). */
  clearPending(index: number, vector: number): void {
    const v = this.indexes[index];
    if (v && vector < v.count) v.pending[vector] = false;
  }

  /**
   * Applies a SET_IRQS the session has validated; owns `fds` from here on.
   * `fire` lets the device route loopback triggers (INTx level, MSI masks).
   */
  apply(req: SetIrqs, fds: number[], fire: (index: number, vector: number) => void): void {
    const v = this.indexes[req.index];
    const data = req.flags & SetIrqsFlags.DATA_TYPE_MASK;
    const action = req.flags & SetIrqsFlags.ACTION_TYPE_MASK;
    if (req.count === 0) {
      this.release(req.index, 0, v.count);
      return;
    }
    const vectors = Array.from({ length: req.count }, (_, i) => req.start + i);
    if (data === SetIrqsFlags.DATA_EVENTFD) {
      this.release(req.index, req.start, req.count);
      fds.forEach((fd, i) => (v.fds[req.start + i] = fd));
      return;
    }
    const selected = vectors.filter((_, i) => data !== SetIrqsFlags.DATA_BOOL || req.bools?.[i]);
    for (const vector of selected) {
      if (action === SetIrqsFlags.ACTION_MASK) this.mask(req.index, vector);
      else if (action === SetIrqsFlags.ACTION_UNMASK) this.unmask(req.index, vector);
      else fire(req.index, vector);
    }
  }

  /** Closes the fds of vectors [start, start + count). */
  release(index: number, start: number, count: number): void {
    const v = this.indexes[index];
    for (let i = start; i < start + count && i < v.count; i++) {
      if (v.fds[i] >= 0) closeFds([v.fds[i]]);
      v.fds[i] = -1;
    }
  }

  /** The client went away: every fd is closed, masks and pending bits cleared. */
  releaseAll(): void {
    this.indexes.forEach((v, index) => {
      this.release(index, 0, v.count);
      v.masked.fill(false);
      v.pending.fill(false);
    });
  }
}
