/**
 * Interrupt lines: the client's eventfds per IRQ index and vector, with the
 * client's (VFIO-level) masks, as SET_IRQS wires them (§6.8). INTx, ERR and
 * REQ keep their pending state here; MSI and MSI-X are routed to their
 * capability, which owns the guest-visible mask and pending bits.
 *
 * INTx also takes an unmask eventfd (UNMASK with DATA_EVENTFD), as kernel
 * VFIO does: QEMU with KVM hands it KVM's resample eventfd, which KVM
 * signals when the guest ends the interrupt (EOI). Signalling it unmasks the
 * line, and a line still asserted fires again: level semantics without a
 * message per interrupt.
 */
import { closeFds, native } from '../native.js';
import { IrqIndex, SetIrqsFlags, type SetIrqs } from '../protocol/index.js';

/**
 * What became of one interrupt: signalled on its eventfd, held pending
 * behind a mask (delivered on unmask), or dropped (no eventfd wired, or the
 * guest left the device no way to interrupt).
 */
export type Delivery = 'sent' | 'pending' | 'dropped';

/** A capability that owns an index's masking (MSI, MSI-X). */
export interface VectorRouter {
  /** The client's loopback TRIGGER. */
  trigger(vector: number): Delivery;
  /** The client unmasked `vector`: deliver it if it is pending and nothing else masks it. */
  unmasked(vector: number): void;
}

class Vectors {
  fds: number[];
  masked: boolean[];
  pending: boolean[];
  router: VectorRouter | undefined;

  constructor(readonly count: number) {
    this.fds = new Array<number>(count).fill(-1);
    this.masked = new Array<boolean>(count).fill(false);
    this.pending = new Array<boolean>(count).fill(false);
  }
}

type Eventfd = InstanceType<typeof native.NativeEventfd>;

export class Interrupts {
  private readonly indexes: Vectors[];
  /** Signals delivered per index (for tests, tools and statistics). */
  readonly delivered: number[];
  /** INTx's unmask (resample) eventfd, watched on the loop. */
  private intxUnmask: Eventfd | undefined;

  /** `unmasked(index)` follows every unmask by eventfd: the line's owner re-fires a level still asserted. */
  constructor(
    counts: readonly number[],
    private readonly unmasked: (index: number) => void = () => {},
  ) {
    this.indexes = counts.map((n) => new Vectors(n));
    this.delivered = counts.map(() => 0);
  }

  count(index: number): number {
    return this.indexes[index]?.count ?? 0;
  }

  /** Hands an index's triggers and unmasks to the capability that owns its masking. */
  route(index: number, router: VectorRouter): void {
    this.indexes[index].router = router;
  }

  /** Whether the client wired an eventfd to this vector. */
  connected(index: number, vector: number): boolean {
    return (this.indexes[index]?.fds[vector] ?? -1) >= 0;
  }

  /** Whether the client wired an unmask (resample) eventfd to INTx. */
  get intxUnmaskConnected(): boolean {
    return this.intxUnmask !== undefined;
  }

  /** Whether the client masked this vector with SET_IRQS. */
  isMasked(index: number, vector: number): boolean {
    return this.indexes[index]?.masked[vector] ?? false;
  }

  /** INTx/ERR/REQ: fired while masked. (MSI/MSI-X pending bits live in their capability.) */
  isPending(index: number, vector: number): boolean {
    return this.indexes[index]?.pending[vector] ?? false;
  }

  /** Signals the vector's eventfd, ignoring masks: the caller has decided to deliver. */
  signal(index: number, vector: number): Delivery {
    const fd = this.indexes[index]?.fds[vector] ?? -1;
    if (fd < 0) return 'dropped';
    native.eventfdSignal(fd);
    this.delivered[index]++;
    return 'sent';
  }

  /**
   * Fires a vector of an index without a capability (INTx, ERR, REQ):
   * signals its eventfd, or holds it pending while masked. INTx masks itself
   * on delivery (AUTOMASKED), as VFIO does for a level interrupt; the client
   * unmasks it once the guest has handled it.
   */
  trigger(index: number, vector = 0): Delivery {
    const v = this.indexes[index];
    if (!v || vector >= v.count) return 'dropped';
    if (v.masked[vector]) {
      v.pending[vector] = true;
      return 'pending';
    }
    const delivery = this.signal(index, vector);
    if (delivery === 'sent' && index === IrqIndex.INTX) v.masked[vector] = true;
    return delivery;
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
    if (v.router) {
      v.router.unmasked(vector);
    } else if (v.pending[vector]) {
      v.pending[vector] = false;
      this.trigger(index, vector);
    }
  }

  /** Forgets a pending event (the condition went away before unmask). */
  clearPending(index: number, vector: number): void {
    const v = this.indexes[index];
    if (v && vector < v.count) v.pending[vector] = false;
  }

  /** A device reset: pending events are lost; eventfds and client masks are the client's and stay. */
  clearAllPending(): void {
    for (const v of this.indexes) v.pending.fill(false);
  }

  /** Applies a SET_IRQS the session has validated; owns `fds` from here on. */
  apply(req: SetIrqs, fds: number[]): void {
    const v = this.indexes[req.index];
    const data = req.flags & SetIrqsFlags.DATA_TYPE_MASK;
    const action = req.flags & SetIrqsFlags.ACTION_TYPE_MASK;
    if (req.count === 0) {
      this.release(req.index, 0, v.count);
      if (req.index === IrqIndex.INTX) this.setIntxUnmask(undefined);
      return;
    }
    if (data === SetIrqsFlags.DATA_EVENTFD && action === SetIrqsFlags.ACTION_UNMASK) {
      // Only INTx takes one (the session checks); no fd de-assigns it.
      this.setIntxUnmask(fds[0]);
      return;
    }
    if (data === SetIrqsFlags.DATA_EVENTFD) {
      this.release(req.index, req.start, req.count);
      fds.forEach((fd, i) => (v.fds[req.start + i] = fd));
      // A vector that fired while it had no eventfd is delivered now that it has one.
      if (v.router) fds.forEach((_, i) => v.router!.unmasked(req.start + i));
      return;
    }
    for (let i = 0; i < req.count; i++) {
      if (data === SetIrqsFlags.DATA_BOOL && !req.bools?.[i]) continue;
      const vector = req.start + i;
      if (action === SetIrqsFlags.ACTION_MASK) this.mask(req.index, vector);
      else if (action === SetIrqsFlags.ACTION_UNMASK) this.unmask(req.index, vector);
      else if (v.router) v.router.trigger(vector);
      else this.trigger(req.index, vector);
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

  /** Replaces INTx's unmask eventfd (closing the old one); undefined leaves none. */
  private setIntxUnmask(fd: number | undefined): void {
    this.intxUnmask?.close();
    this.intxUnmask = undefined;
    if (fd === undefined) return;
    const eventfd = native.NativeEventfd.fromFd(fd);
    // A device's interrupt line does not keep the process alive; its client connection does.
    eventfd.setKeepAlive(false);
    eventfd.watch(() => {
      // As the kernel's unmask handler: a line that is not masked has nothing to resample.
      if (!this.isMasked(IrqIndex.INTX, 0)) return;
      this.unmask(IrqIndex.INTX, 0);
      this.unmasked(IrqIndex.INTX);
    });
    this.intxUnmask = eventfd;
  }

  /** The client went away: every fd is closed, masks and pending bits cleared. */
  releaseAll(): void {
    this.setIntxUnmask(undefined);
    this.indexes.forEach((v, index) => {
      this.release(index, 0, v.count);
      v.masked.fill(false);
      v.pending.fill(false);
    });
  }
}
