/**
 * The device's side of interrupts, one vocabulary for every mode: `raise(vector)`
 * signals in whichever mode the guest enabled (MSI-X, else MSI, else the INTx
 * pin), `lower()` ends the INTx line's level, `intxRaised` says where the
 * line is; ERR and REQ go to the VMM.
 */
import { UsageError } from '../errors.js';
import { IrqIndex } from '../protocol/index.js';
import type { ConfigSpace, ConfigWrite } from './config.js';
import type { Delivery, Interrupts } from './interrupts.js';
import type { Msi } from './msi.js';
import type { Msix } from './msix.js';
import { Cfg, Command, Status } from './spec.js';

/** How the guest lets the device interrupt it right now. */
export type IrqMode = 'msix' | 'msi' | 'intx' | 'none';

export class DeviceIrq {
  private asserted = false;
  /** Stopped for migration: nothing is signalled; message vectors set pending bits, INTx is held. */
  private stopped = false;
  /** The INTx line was to be offered while stopped (or was restored high): offered on start(). */
  private heldIntx = false;
  /** The last config write gateWritten() saw. */
  private lastGateWrite: ConfigWrite | undefined;

  /** @internal */
  constructor(
    private readonly config: ConfigSpace,
    private readonly interrupts: Interrupts,
    private readonly hasPin: boolean,
    private readonly msi: Msi | undefined,
    private readonly msix: Msix | undefined,
  ) {
    // What gates INTx: Interrupt Disable, and the MSI/MSI-X enable bits (the interrupt mode).
    config.onWrite({ start: Cfg.COMMAND, end: Cfg.COMMAND + 2, apply: (write) => this.gateWritten(write) });
    for (const m of [msi, msix]) {
      if (m) config.onWrite({ start: m.control, end: m.control + 2, apply: (write) => this.gateWritten(write) });
    }
  }

  get mode(): IrqMode {
    if (this.msix?.enabled) return 'msix';
    if (this.msi?.enabled) return 'msi';
    return this.hasPin ? 'intx' : 'none';
  }

  /**
   * Raises interrupt `vector` in the guest's mode. MSI-X and MSI are edges:
   * a masked vector is held pending (PBA / pending bits) and delivered on
   * unmask; without Bus Master Enable the function cannot write the message,
   * so it is dropped. INTx is a level: the line stays raised until
   * `lower()` (typically when the guest acknowledges the cause in a device
   * register), and every vector shares it: a line left raised interrupts the
   * guest again after each end of interrupt, an interrupt storm.
   */
  raise(vector = 0): Delivery {
    const vectors = Math.max(1, this.msi?.vectors.count ?? 0, this.msix?.vectors.count ?? 0);
    if (!Number.isInteger(vector) || vector < 0 || vector >= vectors) {
      throw new UsageError(`vector ${vector} is not in 0-${vectors - 1}`);
    }
    switch (this.mode) {
      case 'msix':
        if (vector >= this.msix!.vectors.count) throw new UsageError(`vector ${vector} is past the MSI-X table (${this.msix!.vectors.count} entries)`);
        return this.busMaster ? this.msix!.fire(vector) : 'dropped';
      case 'msi':
        return this.busMaster ? this.msi!.fire(vector) : 'dropped';
      case 'intx':
        return this.raiseIntx();
      case 'none':
        return 'dropped';
    }
  }

  /**
   * Lowers the INTx line `raise()` raised in INTx mode (a no-op when it is
   * low); message interrupts are edges and need nothing.
   */
  lower(): void {
    if (this.asserted) this.lowerIntx();
  }

  /** Whether the INTx line is raised: by `raise()` in INTx mode, not yet lowered. */
  get intxRaised(): boolean {
    return this.asserted;
  }

  /**
   * Raises the INTx line (level): delivered unless INTx is disabled or
   * masked; an asserted line is offered again when the guest unmasks it.
   */
  private raiseIntx(): Delivery {
    this.config.setBits16(Cfg.STATUS, Status.INTX, true);
    // An asserted line has already been offered: the guest sees it when it unmasks.
    if (this.asserted) return 'pending';
    this.asserted = true;
    return this.intxLive ? this.offerIntx() : 'pending';
  }

  private lowerIntx(): void {
    this.asserted = false;
    this.heldIntx = false;
    this.config.setBits16(Cfg.STATUS, Status.INTX, false);
    this.interrupts.clearPending(IrqIndex.INTX, 0);
  }

  /** Reports an error to the client (ERR index, e.g. for AER). */
  signalError(): Delivery {
    return this.interrupts.trigger(IrqIndex.ERR);
  }

  /** Asks the client to release the device (REQ index). */
  requestRelease(): Delivery {
    return this.interrupts.trigger(IrqIndex.REQ);
  }

  /**
   * After a SET_IRQS: an INTx line unmasked while still high fires again
   * (level), but only in INTx mode: with MSI or MSI-X enabled the function
   * does not use INTx (PCI 3.0 §6.8.1.3, MSI-X Enable), whatever the line does.
   * @internal
   */
  clientChanged(index: number): void {
    if (index === IrqIndex.INTX && this.asserted && this.intxLive && !this.interrupts.isMasked(IrqIndex.INTX, 0)) {
      this.offerIntx();
    }
  }

  /** Whether the device is stopped for migration (interrupts are held, not signalled). @internal */
  get held(): boolean {
    return this.stopped;
  }

  /**
   * Migration stop: from here on no interrupt reaches the client. MSI/MSI-X
   * fires set their pending bits (PBA, MSI pending) and an INTx assertion is
   * held, so the state saved in STOP_COPY has them and nothing is lost.
   * ERR and REQ go to the VMM, not the guest, and are not held.
   * @internal
   */
  stop(): void {
    this.stopped = true;
    for (const m of [this.msi, this.msix]) if (m) m.vectors.held = true;
  }

  /** Undoes stop(): pending vectors no mask holds are delivered, a held INTx line is offered. @internal */
  start(): void {
    this.stopped = false;
    for (const m of [this.msi, this.msix]) {
      if (!m) continue;
      m.vectors.held = false;
      m.vectors.release();
    }
    if (this.heldIntx) {
      this.heldIntx = false;
      if (this.asserted && this.intxLive) this.interrupts.trigger(IrqIndex.INTX);
    }
  }

  /**
   * Migration load: the INTx line as the source left it; `held` has start()
   * offer it (a destination's client has never seen the line go high).
   * @internal
   */
  restoreIntx(asserted: boolean, held: boolean): void {
    this.asserted = asserted;
    this.heldIntx = asserted && held;
  }

  /** An asserted INTx line not yet offered to the client because the device was stopped. @internal */
  get intxHeld(): boolean {
    return this.heldIntx;
  }

  /** Device reset: the line drops and every pending event is forgotten. @internal */
  reset(): void {
    this.lowerIntx();
    this.msi?.reset();
    this.msix?.reset();
    this.interrupts.clearAllPending();
  }

  private get busMaster(): boolean {
    return (this.config.u16(Cfg.COMMAND) & Command.BUS_MASTER) !== 0;
  }

  private get intxDisabled(): boolean {
    return (this.config.u16(Cfg.COMMAND) & Command.INTX_DISABLE) !== 0;
  }

  /**
   * Whether INTx reaches the client: INTx mode (a pin, MSI and MSI-X
   * disabled) and Interrupt Disable clear.
   */
  private get intxLive(): boolean {
    return this.mode === 'intx' && !this.intxDisabled;
  }

  /** intxLive as it was before `write`. */
  private intxLiveBefore(write: ConfigWrite): boolean {
    if (!this.hasPin) return false;
    if (this.msix?.enabledBefore(write) || this.msi?.enabledBefore(write)) return false;
    return (write.previous(Cfg.COMMAND, 2) & Command.INTX_DISABLE) === 0;
  }

  /**
   * A write to Command or an MSI/MSI-X control register. When INTx stops
   * reaching the client (Interrupt Disable set, MSI or MSI-X enabled) an
   * offer the client holds pending behind its mask is withdrawn, as a
   * function deasserts its INTx message; when it starts again (Interrupt
   * Disable cleared, MSI and MSI-X both disabled) a line still asserted is
   * offered anew.
   */
  private gateWritten(write: ConfigWrite): void {
    // A write spanning two of the hooked registers runs this once per hook.
    if (write === this.lastGateWrite) return;
    this.lastGateWrite = write;
    const before = this.intxLiveBefore(write);
    const now = this.intxLive;
    if (before === now || !this.asserted) return;
    if (now) {
      this.offerIntx();
    } else {
      this.heldIntx = false;
      this.interrupts.clearPending(IrqIndex.INTX, 0);
    }
  }

  /** Signals the INTx line, or holds it for start() while stopped. */
  private offerIntx(): Delivery {
    if (!this.stopped) return this.interrupts.trigger(IrqIndex.INTX);
    this.heldIntx = true;
    return 'pending';
  }
}
