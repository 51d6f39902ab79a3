/**
 * Delivery for message-signalled interrupts (MSI, MSI-X). A vector is masked
 * when the guest masks it (capability or table bits) or the client does
 * (SET_IRQS MASK); one that fires while masked sets its pending bit, and is
 * delivered, clearing the bit, as soon as neither masks it any more.
 */
import type { Delivery, Interrupts, VectorRouter } from './interrupts.js';

/** Little-endian bit array over bytes: the layout of MSI mask/pending registers and of the PBA. */
export class BitArray {
  constructor(readonly bytes: Buffer) {}

  get(bit: number): boolean {
    return (this.bytes[bit >> 3] & (1 << (bit & 7))) !== 0;
  }

  set(bit: number, on: boolean): void {
    if (on) this.bytes[bit >> 3] |= 1 << (bit & 7);
    else this.bytes[bit >> 3] &= ~(1 << (bit & 7));
  }
}

export class MessageVectors implements VectorRouter {
  /**
   * Set while the device is stopped for migration: every vector counts as
   * masked, so a fire sets its pending bit (saved with the device state) and
   * nothing is signalled until `held` is cleared and `release()` runs.
   */
  held = false;

  constructor(
    private readonly index: number,
    readonly count: number,
    private readonly interrupts: Interrupts,
    /** Where pending bits live: guest-visible bytes, kept current on every change. */
    private readonly pending: BitArray,
    private readonly guestMasked: (vector: number) => boolean,
  ) {}

  masked(vector: number): boolean {
    return this.held || this.guestMasked(vector) || this.interrupts.isMasked(this.index, vector);
  }

  isPending(vector: number): boolean {
    return this.pending.get(vector);
  }

  /**
   * A vector with no eventfd yet is held pending too: QEMU takes every
   * vector's eventfd away and gives them back (two SET_IRQS) each time the
   * guest starts using one more, and a device that sees doorbells outside
   * the socket (a mapped page, an ioeventfd) can complete a command in
   * between. Dropping that interrupt lost a guest's admin command.
   */
  fire(vector: number): Delivery {
    if (this.masked(vector) || !this.interrupts.connected(this.index, vector)) {
      this.pending.set(vector, true);
      return 'pending';
    }
    return this.interrupts.signal(this.index, vector);
  }

  /**
   * Delivers every vector in [from, to) that is pending and no longer masked.
   * One without an eventfd stays pending (its PBA bit set) until the client
   * wires one: QEMU forwards the guest's unmask before it sends SET_IRQS.
   */
  release(from = 0, to = this.count): void {
    for (let v = from; v < to; v++) {
      if (this.pending.get(v) && !this.masked(v) && this.interrupts.connected(this.index, v)) {
        this.pending.set(v, false);
        this.interrupts.signal(this.index, v);
      }
    }
  }

  clear(): void {
    for (let v = 0; v < this.count; v++) this.pending.set(v, false);
  }

  // ---- VectorRouter: the client's SET_IRQS ----

  trigger(vector: number): Delivery {
    return this.fire(vector);
  }

  unmasked(vector: number): void {
    this.release(vector, vector + 1);
  }
}
