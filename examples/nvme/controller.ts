/**
 * The NVMe controller as a PCI function: BAR0's registers (§3.1), the
 * enable, disable and shutdown handshakes, resets, doorbells, interrupts and
 * migration. Commands are run as they are fetched (admin.ts, io.ts); one
 * that waits for the store completes when the store is done, its CQ entry
 * held for it meanwhile.
 *
 * BAR0, 16 KiB, 64-bit:
 *   0x0000 controller registers, trapped
 *   0x1000 doorbells: SQ y tail at 0x1000 + 8y, CQ y head at 0x1000 + 8y + 4 (CAP.DSTRD 0)
 *   0x2000 MSI-X table (32 vectors), 0x3000 PBA, trapped and emulated by the library
 *
 * Doorbells reach the controller as batches from one source, whatever the
 * VMM offers: a mapped page, trapped writes, ioeventfds, shadow doorbells
 * (doorbells.ts). Each batch is acted on in one go: CQ heads first, then
 * the SQs it names, with one interrupt per completion queue at the end.
 * In every mode a host may set up shadow doorbells (Doorbell Buffer Config,
 * shadow.ts), as Linux does: I/O queues' values are then read from the
 * shadow page, and the host writes the register only when EventIdx asks.
 * With mapped doorbells an I/O CQ's head is read when the controller needs
 * it (`refreshHead`: its CQ looks short of room, the state a migration
 * saves, Doorbell Buffer Config, an MSI unmask) and watched only while the
 * controller waits on it (`followHead`).
 */
import { randomBytes } from 'node:crypto';
import { BlockIoError, Errno, PciDevice, UsageError, type DoorbellStats, type Ring } from 'vfio-user';
import { AsyncEvent, AsyncEvents, executeAdmin, Feature, Features, LogPage, MAX_IO_QUEUES, MAX_QUEUE_ENTRIES, VECTORS, VENDOR_ID, type ErrorEntry } from './admin.js';
import { InterruptCoalescing } from './coalescing.js';
import { Command, CommandError, DEFERRED, isDmaError, SQ_ENTRY, Status } from './command.js';
import { BLOCK_SIZE, countTransfer, executeIo, type Outcome, type StoreWork } from './io.js';
import { DOORBELLS, Doorbells, SHADOW, type DoorbellMode } from './doorbells.js';
import { BATCH, CompletionQueue, SubmissionQueue } from './queues.js';
import { ShadowDoorbells } from './shadow.js';
import { CommandTrace } from './trace.js';
import { parseState, STATE_VERSION, type SavedState } from './state.js';
import type { BackingStore } from './store.js';

export const Register = {
  CAP: 0x00,
  VS: 0x08,
  INTMS: 0x0c,
  INTMC: 0x10,
  CC: 0x14,
  CSTS: 0x1c,
  NSSR: 0x20,
  AQA: 0x24,
  ASQ: 0x28,
  ACQ: 0x30,
} as const;

export const Cc = { EN: 1, SHN_MASK: 3 << 14, IOSQES_SHIFT: 16, IOCQES_SHIFT: 20 } as const;
export const Csts = { RDY: 1, CFS: 2, SHST_OCCURRING: 1 << 2, SHST_COMPLETE: 2 << 2, SHST_MASK: 3 << 2, NSSRO: 1 << 4 } as const;
/** "NVMe": the value that starts an NVM subsystem reset. */
export const NSSR_RESET = 0x4e564d65;

export const BAR_SIZE = 0x4000;
export { DOORBELLS, type DoorbellMode };
export const MSIX_TABLE = 0x2000;
export const MSIX_PBA = 0x3000;
const REGISTER_BYTES = 0x40;
/** CC bits the host may set: EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES. */
const CC_WRITABLE = 0x00fffff1;
/** CSTS bits the controller sets: RDY, CFS, SHST, NSSRO. */
const CSTS_BITS = 0x1f;
/**
 * CAP: MQES, CQR (contiguous queues), TO 1 s, DSTRD 0, NSSRS, CSS NVM,
 * MPSMIN = MPSMAX = 4 KiB.
 */
const CAP = BigInt(MAX_QUEUE_ENTRIES - 1) | (1n << 16n) | (2n << 24n) | (1n << 36n) | (1n << 37n);
/** Error Information entries kept (the log shows the newest 16). */
const ERRORS_KEPT = 64;

export interface NvmeOptions {
  store: BackingStore;
  /** Where doorbell values come from (default `mmap`: a page the VMM maps, trapped writes where it does not). */
  doorbells?: DoorbellMode;
  /**
   * Whether Doorbell Buffer Config is offered (OACS bit 8; default true):
   * false makes Linux write every doorbell to the register, for comparison.
   * 'ioeventfd' mode needs it.
   */
  shadowDoorbells?: boolean;
  /** Identify's serial number (20 ASCII characters at most). */
  serial?: string;
}

export class NvmeController extends PciDevice {
  readonly store: BackingStore;
  readonly blocks: number;
  readonly doorbellMode: DoorbellMode;
  readonly offersShadowDoorbells: boolean;
  readonly serial: string;
  readonly nguid: Buffer;

  features = new Features();
  events = new AsyncEvents();
  sqs: (SubmissionQueue | undefined)[] = [];
  cqs: (CompletionQueue | undefined)[] = [];
  errors: ErrorEntry[] = [];
  smart = { blocksRead: 0, blocksWritten: 0, readCommands: 0, writeCommands: 0 };
  /** Shadow doorbells and EventIdx (Doorbell Buffer Config), for the I/O queues. */
  shadow: ShadowDoorbells | undefined;
  /** Per-command stage timings (DEBUG=vfio-user:nvme prints them; the bench sets one to collect them). */
  trace: CommandTrace | undefined = CommandTrace.fromEnvironment();

  private cc = 0;
  private csts = 0;
  private aqa = 0;
  private asq = 0n;
  private acq = 0n;
  private intms = 0;
  private errorCount = 0;
  private readonly command = new Command();
  private readonly doorbells: Doorbells;
  /** Queues that used up their batch, to go on at the next turn of the event loop. */
  private readonly resumable = new Set<SubmissionQueue>();
  /** CQs whose completions came in while no client was attached: posted with the next batch once one is. */
  private readonly held = new Set<CompletionQueue>();
  /** While a batch of doorbells is acted on: CQs owed an interrupt at its end. */
  private owed: Set<CompletionQueue> | undefined;
  private storeClosed = false;
  /** Commands waiting for the store; no more than `store.queueDepth` are started. */
  private inFlight = 0;
  /** Called once nothing waits for the store (migration's stop, shutdown, resets). */
  private idleWaiters: (() => void)[] = [];
  /** CQs that got completions from the store in this batch, posted and interrupted together once it is in. */
  private readonly finished = new Set<CompletionQueue>();
  /** Commands waiting for the store, and spare ones to reuse (no allocation per command). */
  private readonly spareWaits: StoreWait[] = [];
  private readonly coalescing: InterruptCoalescing;
  /** Per vector, completions posted in the batch being signalled. */
  private readonly postedPerVector = new Uint16Array(VECTORS);
  /** Runs once the store's completions that arrived together are in. */
  private readonly postFinishedLater = (): void => this.context.run(() => this.postFinished());

  constructor(options: NvmeOptions) {
    const mode = options.doorbells ?? 'mmap';
    const offersShadowDoorbells = options.shadowDoorbells ?? true;
    if (mode === 'ioeventfd' && !offersShadowDoorbells) throw new UsageError('ioeventfd doorbells need shadow doorbells: an ioeventfd carries no value');
    super({
      vendorId: VENDOR_ID,
      // An unused ID beside the queue card's; stock drivers bind by the class code.
      deviceId: 0x10f2,
      subsystemVendorId: 0x1b36,
      subsystemId: 0x0001,
      classCode: 0x010802, // mass storage, non-volatile memory, NVM Express
      intx: 'A',
      bars: {
        0: {
          kind: 'memory',
          size: BAR_SIZE,
          width: 64,
          ...(mode === 'mmap' ? { shared: true, mmap: [{ offset: DOORBELLS, size: 0x1000 }] } : {}),
          // Queue 1's SQ tail and CQ head first: a client taking few fds gets the first queues' (the rest trap into the same eventfds).
          ...(mode === 'ioeventfd' ? { ioeventfds: Array.from({ length: 2 * MAX_IO_QUEUES }, (_, i) => ({ offset: DOORBELLS + 4 * (i + 2), size: 4 as const })) } : {}),
          read: (offset, size) => this.readRegisters(offset, size),
          write: (offset, data) => this.writeBar(offset, data),
        },
      },
      capabilities: [
        { kind: 'pm' },
        { kind: 'msix', vectors: VECTORS, table: { bar: 0, offset: MSIX_TABLE }, pba: { bar: 0, offset: MSIX_PBA } },
        { kind: 'pcie', type: 'endpoint', flr: true },
      ],
      onReset: () => this.powerOnReset(),
      migration: {
        saveState: () => this.saveState(),
        loadState: (data) => this.loadState(data),
        // Commands already running finish (and post) before the state is saved.
        stop: async () => {
          await this.idle();
          // The last completions are posted now and no interrupt stays held: the saved state has them all.
          this.postFinished();
          this.coalescing.releaseAll();
        },
        // Doorbells are watched again (a destination starts with none), and held ones picked up once the library lets interrupts through again.
        start: () => void this.context.setImmediate(() => {
          if (this.attached) this.shadowAccess(() => this.doorbells.useShadow(this.shadow, this.dma, this.queueDoorbells()));
          this.serviceAll();
        }),
      },
    });
    this.store = options.store;
    this.blocks = Math.floor(options.store.size / BLOCK_SIZE);
    this.doorbellMode = mode;
    this.offersShadowDoorbells = offersShadowDoorbells;
    this.doorbells = new Doorbells(mode, this.bar(0), this.context);
    this.doorbells.onRing((rings) => this.rang(rings));
    this.coalescing = new InterruptCoalescing(this.context, (vector) => this.signal(vector));
    this.serial = (options.serial ?? randomBytes(6).toString('hex')).slice(0, 20);
    this.nguid = Buffer.concat([Buffer.from('vfio-user'), Buffer.from(this.serial.padEnd(7, ' ').slice(0, 7))]);
  }

  // ---- registers ----

  private registerFile(): Buffer {
    const r = Buffer.alloc(REGISTER_BYTES);
    r.writeBigUInt64LE(CAP, Register.CAP);
    r.writeUInt32LE(0x00010400, Register.VS);
    r.writeUInt32LE(this.intms, Register.INTMS);
    r.writeUInt32LE(this.intms, Register.INTMC);
    r.writeUInt32LE(this.cc, Register.CC);
    r.writeUInt32LE(this.csts, Register.CSTS);
    r.writeUInt32LE(this.aqa, Register.AQA);
    r.writeBigUInt64LE(this.asq, Register.ASQ);
    r.writeBigUInt64LE(this.acq, Register.ACQ);
    return r;
  }

  private readRegisters(offset: number, size: number): Uint8Array {
    const out = Buffer.alloc(size);
    // Doorbells read as zero (trap mode); registers past 0x40 are reserved.
    if (offset < REGISTER_BYTES) this.registerFile().copy(out, 0, offset, Math.min(offset + size, REGISTER_BYTES));
    return out;
  }

  /** A shutdown's promise: the reply to the CC write waits for it. */
  private writeBar(offset: number, data: Buffer): void | Promise<void> {
    if (offset >= DOORBELLS && offset < DOORBELLS + 0x1000) {
      if (data.length === 4 && offset % 4 === 0) this.doorbells.write((offset - DOORBELLS) / 4, data.readUInt32LE(0));
      return;
    }
    if (offset >= REGISTER_BYTES) return;
    // Narrow or 64-bit accesses become dword writes, merged with the current bytes.
    const start = offset & ~3;
    const end = (offset + data.length + 3) & ~3;
    const merged = this.registerFile().subarray(start, Math.min(end, REGISTER_BYTES));
    data.copy(merged, offset - start);
    let shutdown: Promise<void> | undefined;
    for (let at = 0; at < merged.length; at += 4) {
      const pending: unknown = this.writeRegister(start + at, merged.readUInt32LE(at));
      if (pending instanceof Promise) shutdown = pending;
    }
    return shutdown;
  }

  private writeRegister(offset: number, value: number): void | Promise<void> {
    switch (offset) {
      case Register.INTMS:
        this.intms = (this.intms | value) >>> 0;
        return this.updateLevel();
      case Register.INTMC:
        this.intms = (this.intms & ~value) >>> 0;
        // A vector unmasked with completions waiting is signalled now (MSI; INTx follows the level).
        if (this.irq.mode === 'msi') {
          for (const cq of this.cqs) {
            if (!cq?.interrupts || ((value >>> cq.vector) & 1) === 0) continue;
            this.refreshHead(cq);
            if (cq.pending) this.irq.raise(cq.vector);
          }
        }
        return this.updateLevel();
      case Register.CC: return this.writeCc(value & CC_WRITABLE);
      case Register.CSTS:
        if (value & Csts.NSSRO) this.csts &= ~Csts.NSSRO;
        return;
      case Register.NSSR:
        if (value !== NSSR_RESET) return;
        this.cc = 0;
        this.csts |= Csts.NSSRO;
        return this.controllerReset();
      case Register.AQA: this.aqa = value & 0x0fff0fff; return;
      case Register.ASQ: this.asq = (this.asq & 0xffffffff00000000n) | BigInt((value & ~0xfff) >>> 0); return;
      case Register.ASQ + 4: this.asq = (this.asq & 0xfffff000n) | (BigInt(value >>> 0) << 32n); return;
      case Register.ACQ: this.acq = (this.acq & 0xffffffff00000000n) | BigInt((value & ~0xfff) >>> 0); return;
      case Register.ACQ + 4: this.acq = (this.acq & 0xfffff000n) | (BigInt(value >>> 0) << 32n); return;
    }
  }

  private writeCc(value: number): void | Promise<void> {
    const was = this.cc;
    this.cc = value;
    let reset: Promise<void> | undefined;
    if (!(was & Cc.EN) && value & Cc.EN) this.enable();
    else if (was & Cc.EN && !(value & Cc.EN)) reset = this.controllerReset();
    if ((value & Cc.SHN_MASK) !== 0 && (was & Cc.SHN_MASK) === 0) return this.shutDown();
    return reset;
  }

  /** Shutdown: commands still running finish, the store writes back, then SHST says done (occurring meanwhile). */
  private async shutDown(): Promise<void> {
    this.csts = (this.csts & ~Csts.SHST_MASK) | Csts.SHST_OCCURRING;
    await this.idle();
    try {
      await this.store.flush();
    } catch (error) {
      console.error('nvme: the store failed to flush at shutdown:', error);
    }
    // A reset meanwhile ended the shutdown with it.
    if ((this.csts & Csts.SHST_MASK) === Csts.SHST_OCCURRING) this.csts = (this.csts & ~Csts.SHST_MASK) | Csts.SHST_COMPLETE;
  }

  /**
   * CC.EN 0 to 1: the admin queues from AQA/ASQ/ACQ, then ready; settings
   * the controller does not have (page size, command set, arbitration,
   * queue entry sizes) are a fatal status instead.
   */
  private enable(): void {
    const sqSize = (this.aqa & 0xfff) + 1;
    const cqSize = ((this.aqa >>> 16) & 0xfff) + 1;
    const mps = (this.cc >>> 7) & 0xf;
    const css = (this.cc >>> 4) & 7;
    const ams = (this.cc >>> 11) & 7;
    // Entry sizes as Identify's SQES and CQES allow (64 and 16 bytes only), as QEMU checks them at enable.
    const entrySizes = ((this.cc >>> Cc.IOSQES_SHIFT) & 0xf) === 6 && ((this.cc >>> Cc.IOCQES_SHIFT) & 0xf) === 4;
    if (sqSize < 2 || cqSize < 2 || mps !== 0 || css !== 0 || ams !== 0 || !entrySizes || this.asq === 0n || this.acq === 0n) {
      this.csts |= Csts.CFS;
      return;
    }
    this.csts &= ~Csts.SHST_MASK;
    this.addCompletionQueue(new CompletionQueue(0, this.acq, cqSize, 0, true));
    this.addSubmissionQueue(new SubmissionQueue(0, this.asq, sqSize, this.cqs[0]!));
    this.csts |= Csts.RDY;
  }

  /**
   * CC.EN 1 to 0 (and every wider reset): queues, requests and features go;
   * AQA, ASQ and ACQ stay. Commands still in the store finish first, their
   * DMA with them (their completions have no queue left to go to): until
   * then CSTS.RDY stays set, since a host waits for it to clear before it
   * reuses the memory they write, and the reset's reply waits too.
   */
  private controllerReset(): Promise<void> | undefined {
    this.sqs = [];
    this.cqs = [];
    this.events.reset();
    this.features.reset();
    this.csts &= Csts.NSSRO | (this.inFlight > 0 ? Csts.RDY : 0);
    this.shadow = undefined;
    this.doorbells.reset();
    // Work scheduled for queues that are gone (and dropped, if the device failed).
    this.resumable.clear();
    this.finished.clear();
    this.held.clear();
    this.coalescing.reset();
    this.updateLevel();
    // A host that enabled the controller again meanwhile (it should have waited) keeps it ready.
    return this.idle()?.then(() => {
      if (!(this.cc & Cc.EN)) this.csts &= ~Csts.RDY;
    });
  }

  /** FLR, DEVICE_RESET: the library reset config space and the BAR; the registers go back to power-on, and the reset answers once commands in the store are done. */
  private powerOnReset(): Promise<void> | undefined {
    const quiesced = this.controllerReset();

    this.cc = 0;
    this.csts = 0;
    this.aqa = 0;
    this.asq = 0n;
    this.acq = 0n;
    this.intms = 0;
    return quiesced;
  }

  /** Enabled, ready and not failed: doorbells are acted on. */
  get ready(): boolean {
    return (this.cc & Cc.EN) !== 0 && (this.csts & (Csts.RDY | Csts.CFS)) === Csts.RDY;
  }

  // ---- queues ----

  addCompletionQueue(cq: CompletionQueue): void {
    this.cqs[cq.id] = cq;
    this.resetDoorbell(2 * cq.id + 1);
  }

  addSubmissionQueue(sq: SubmissionQueue): void {
    this.sqs[sq.id] = sq;
    sq.cq.submissionQueues.add(sq.id);
    this.resetDoorbell(2 * sq.id);
  }

  deleteSubmissionQueue(id: number): void {
    this.sqs[id]!.cq.submissionQueues.delete(id);
    this.sqs[id] = undefined;
    this.doorbells.removed(2 * id);
  }

  deleteCompletionQueue(id: number): void {
    this.cqs[id] = undefined;
    this.doorbells.removed(2 * id + 1);
    this.updateLevel();
  }

  /** A new queue's doorbell reads 0: a value left over from an earlier queue with its ID must not read as new entries. */
  private resetDoorbell(index: number): void {
    this.shadowAccess(() => this.doorbells.added(index, this.dma));
  }

  /**
   * Doorbell Buffer Config: I/O queues' doorbells are read from `shadow`
   * from now on, and their EventIdx published in `eventIdx`. Queues that
   * exist already go on from where they are (Linux creates them first), and
   * are looked at once the command has completed, for kicks that came before.
   * Returns false when the pages are not guest memory the controller can view.
   */
  useShadowDoorbells(shadow: ShadowDoorbells): boolean {
    try {
      // Heads read on demand are taken from where the host stored them until now.
      for (const cq of this.cqs) if (cq) this.refreshHead(cq);
      const held = this.queueDoorbells();
      // What the controller knows goes in the pages; kicks by ioeventfd told it nothing, so there the host's values stand.
      if (this.doorbellMode !== 'ioeventfd') for (const [index, value] of held) if (index >= 2) shadow.reset(index, value);
      shadow.value(0);
      this.doorbells.useShadow(shadow, this.dma, held);
    } catch (error) {
      if (!isDmaError(error)) throw error;
      return false;
    }
    this.shadow = shadow;
    this.context.setImmediate(() => this.serviceAll());
    return true;
  }

  /** What watching the doorbells has cost so far. */
  get doorbellStats(): DoorbellStats {
    return this.doorbells.source.stats();
  }

  /** Each queue's doorbell and the value the controller holds for it (SQ tail, CQ head). */
  private queueDoorbells(): Map<number, number> {
    const held = new Map<number, number>();
    for (const sq of this.sqs) if (sq) held.set(2 * sq.id, sq.tail);
    for (const cq of this.cqs) if (cq) held.set(2 * cq.id + 1, cq.head);
    return held;
  }

  /** Runs an access to the shadow pages; when they are no longer guest memory the controller cannot go on (CSTS.CFS). */
  private shadowAccess<T>(access: () => T): T | undefined {
    try {
      return access();
    } catch (error) {
      if (!isDmaError(error)) throw error;
      this.csts |= Csts.CFS;
      return undefined;
    }
  }

  /**
   * A batch of doorbells: CQ heads first (a full CQ the host drained lets
   * its SQs go on), then SQ tails; each CQ that got completions has them
   * posted together and is interrupted once, at the end. A shadowed
   * doorbell's value is read from the shadow page now, whatever rang; a ring
   * with no value otherwise (an ioeventfd kick before Doorbell Buffer
   * Config) has nothing to act on.
   */
  private rang(rings: readonly Ring[]): void {
    this.trace?.batch(this.doorbells.source.lastBatchSeenAt);
    this.owed = new Set();
    try {
      for (const heads of [true, false]) {
        for (const ring of rings) {
          const index = ring.doorbell % SHADOW;
          if (((index & 1) === 1) !== heads) continue;
          const value = index >= 2 && this.shadow ? this.shadowValue(index) : ring.value;
          if (value !== undefined) this.ringDoorbell(index, value);
        }
      }
    } finally {
      const owed = this.owed;
      this.owed = undefined;
      this.notify(owed);
    }
  }

  /**
   * A shadowed doorbell's value. A ring that lands as its client leaves
   * finds the shadow page out of reach: it has no value then, and the page
   * is read again at the next ring.
   */
  private shadowValue(index: number): number | undefined {
    return this.attached ? this.shadowAccess(() => this.shadow!.value(index)) : undefined;
  }

  /** Doorbell `index` (SQ y tail: 2y, CQ y head: 2y + 1) now reads `value`. */
  ringDoorbell(index: number, value: number): void {
    if (!this.ready) return;
    const id = index >> 1;
    if (index & 1) {
      const cq = this.cqs[id];
      if (!cq) return this.invalidDoorbell(AsyncEvent.INVALID_DOORBELL_REGISTER);
      if (!this.moveHead(cq, value)) return;
      // Room in the queue: queues that stopped on a full CQ go on, and events wait for the admin CQ.
      if (id === 0) this.deliverEvents();
      for (const sqid of cq.submissionQueues) this.service(this.sqs[sqid]!);
      this.followHead(cq);
    } else {
      const sq = this.sqs[id];
      if (!sq || !sq.setTail(value)) return this.invalidDoorbell(sq ? AsyncEvent.INVALID_DOORBELL_VALUE : AsyncEvent.INVALID_DOORBELL_REGISTER);
      this.service(sq);
    }
  }

  private invalidDoorbell(info: number): void {
    this.events.raise(AsyncEvent.ERROR, info, LogPage.ERROR);
    this.deliverEvents();
  }

  /**
   * Runs `sq`'s commands while there are any and their CQ has room, up to a
   * batch: the entries from the head on are read together (`fetch`), then
   * run one by one; completions are staged and posted together at the end,
   * with one interrupt. Every command fetched is answered (an Asynchronous
   * Event Request later), whatever it holds.
   */
  service(sq: SubmissionQueue): void {
    // Stopped for migration, or no client (no guest memory): doorbells wait.
    if (this.stopped || !this.ready || !this.attached) return;
    if (!this.owed) this.trace?.batch();
    const cq = sq.cq;
    const command = this.command;
    const shadow = sq.id > 0 ? this.shadow : undefined;
    let posted = false;
    let budget = BATCH;
    batch: do {
      while (this.ready) {
        if (cq.room < sq.waiting) this.refreshHead(cq);
        // Each command takes at most one CQ entry and one place in the store.
        const n = Math.min(sq.waiting, cq.room, this.store.queueDepth - this.inFlight);
        if (n <= 0) break;
        if (budget === 0) {
          this.resumeLater(sq);
          break batch;
        }
        const fetched = sq.fetch(this.dma, Math.min(n, budget));
        for (let i = 0; i < fetched; i++) {
          budget--;
          command.load(sq.entries, i * SQ_ENTRY);
          const unreadable = sq.unreadable[i] === 1;
          sq.consume();
          const outcome = this.execute(sq, command, unreadable);
          if (outcome === DEFERRED) continue;
          if (typeof outcome !== 'number') {
            this.waitForStore(sq, command, outcome);
            continue;
          }
          if (outcome !== Status.SUCCESS) this.logError(sq.id, command.cid, outcome);
          // A queue deleted by the command it ran (or by a reset) has nowhere to complete.
          if (this.sqs[sq.id] !== sq) return;
          this.complete(cq, sq, command.cid, outcome, command.result);
          posted = true;
          // An admin command may have changed what the rest may do: fetch them again.
          if (sq.id === 0 && i + 1 < fetched) break;
        }
      }
      // At the store's depth the queue goes on when a command finishes (storeDone).
    } while (shadow && this.ready && this.inFlight < this.store.queueDepth && this.shadowAccess(() => this.lookAgain(sq, shadow)));
    if (posted) {
      if (this.owed) this.owed.add(cq);
      else this.notify([cq]);
    }
    // A CQ without room holds this SQ until the host moves its head.
    if (cq.full) this.followHead(cq);
    // Admin commands may have given Asynchronous Event Requests something to complete.
    if (sq.id === 0) this.deliverEvents();
  }

  /**
   * Runs one fetched command; returns its status, or the store's work for a
   * command the store completes later. A field the command may not hold ends
   * it with the spec's status (CommandError), guest memory that is not there
   * (the entry itself included) with Data Transfer Error, and anything else
   * (a bug here, a store that failed) with Internal Error, for that command
   * only.
   */
  private execute(sq: SubmissionQueue, command: Command, unreadable: boolean): Outcome {
    if (unreadable) return Status.DATA_TRANSFER_ERROR;
    const trace = this.trace;
    try {
      trace?.fetched(sq.id, command.cid, command.opcode);
      const outcome = sq.id === 0 ? executeAdmin(this, command) : executeIo(this, command);
      if (trace) {
        trace.submitted(sq.id, command.cid);
        if (typeof outcome === 'number') trace.done(sq.id, command.cid);
      }
      return outcome;
    } catch (error) {
      return failed(error, command.opcode, sq.id);
    }
  }

  /**
   * Completes a command when the store is done with it. Its CQ entry is held
   * meanwhile (the SQ stops when every free entry is promised), so the
   * completion always has room, unless the host moved the head backwards:
   * then the controller cannot report it, and stops (CFS). A command whose
   * queue was deleted, or whose controller was reset, meanwhile is not
   * completed: its queue is gone. Completions that arrive together (one
   * batch from the store) are posted together with one interrupt per CQ. A
   * queue held by a full CQ goes on when the host frees entries (its
   * doorbell, or the EventIdx `lookAgain` set); one held by the store's
   * depth, at the next turn of the event loop once a command finishes.
   */
  private waitForStore(sq: SubmissionQueue, command: Command, work: Promise<number | void> | StoreWork): void {
    const wait = this.spareWaits.pop() ?? this.newStoreWait();
    wait.sq = sq;
    wait.cid = command.cid;
    wait.opcode = command.opcode;
    wait.dw12 = command.dw(12);
    sq.cq.reserved++;
    this.inFlight++;
    if (typeof work !== 'function') {
      work.then(wait.fulfilled, wait.rejected);
      return;
    }
    try {
      work(wait.finished);
    } catch (error) {
      // As a store's promise would: the command ends on a later turn, never inside this batch.
      queueMicrotask(() => wait.rejected(error));
    }
  }

  /** A wait with its two handlers, made once and reused. */
  private newStoreWait(): StoreWait {
    const wait: StoreWait = {
      sq: undefined,
      cid: 0,
      opcode: 0,
      dw12: 0,
      fulfilled: (value) => this.storeDone(wait, typeof value === 'number' ? value : Status.SUCCESS),
      rejected: (error) => this.storeDone(wait, failed(error, wait.opcode, wait.sq!.id)),
      finished: (error) => (error ? wait.rejected(error) : wait.fulfilled()),
    };
    return wait;
  }

  /** The store finished `wait`'s command with `status`. */
  private storeDone(wait: StoreWait, status: number): void {
    const sq = wait.sq!;
    const cq = sq.cq;
    const { cid, opcode, dw12 } = wait;
    wait.sq = undefined;
    this.spareWaits.push(wait);
    // The bookkeeping holds even for a failed device: a reset waits for it.
    cq.reserved--;
    if (this.inFlight-- === this.store.queueDepth) for (const q of this.sqs) if (q) this.resumeLater(q);
    if (this.inFlight === 0) for (const resolve of this.idleWaiters.splice(0)) resolve();
    this.context.run(() => {
      this.trace?.done(sq.id, cid);
      if (this.sqs[sq.id] !== sq || this.cqs[cq.id] !== cq || !this.ready) return;
      if (cq.full) {
        this.csts |= Csts.CFS;
        return;
      }
      if (status === Status.SUCCESS) {
        if (sq.id > 0) countTransfer(this.smart, opcode, dw12);
      } else this.logError(sq.id, cid, status);
      this.complete(cq, sq, cid, status, 0);
      if (this.finished.size === 0) queueMicrotask(this.postFinishedLater);
      this.finished.add(cq);
    });
  }

  /** After a batch of completions from the store: posted together, one interrupt per CQ that got some. */
  private postFinished(): void {
    this.notify(this.finished);
    this.finished.clear();
  }

  /** Resolves once no command waits for the store. */
  private idle(): Promise<void> | undefined {
    if (this.inFlight === 0) return undefined;
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Runs `sq` again at the next turn of the event loop (with the other queues waiting there). */
  private resumeLater(sq: SubmissionQueue): void {
    if (this.resumable.size === 0) {
      this.context.setImmediate(() => {
        const queues = [...this.resumable];
        this.resumable.clear();
        for (const q of queues) if (this.sqs[q.id] === q) this.service(q);
      });
    }
    this.resumable.add(sq);
  }

  /**
   * With shadow doorbells, when `sq` stopped (empty, or its CQ full):
   * publishes how far the controller got, then reads the shadow values again,
   * since the host may have stored new ones without ringing while the old
   * EventIdx said it need not. Returns whether there is more to run now.
   */
  private lookAgain(sq: SubmissionQueue, shadow: ShadowDoorbells): boolean {
    const cq = sq.cq;
    if (cq.full) {
      // Ring once the head moves past what was seen; the SQ waits for it.
      const index = 2 * cq.id + 1;
      shadow.publish(index, cq.head);
      const head = shadow.value(index);
      if (head === cq.head || !this.moveHead(cq, head)) return false;
    }
    shadow.publish(2 * sq.id, sq.tail);
    const tail = shadow.value(2 * sq.id);
    if (tail !== sq.tail && !sq.setTail(tail)) {
      this.invalidDoorbell(AsyncEvent.INVALID_DOORBELL_VALUE);
      return false;
    }
    return sq.ready;
  }

  /** Serves every queue from the doorbells held: after a migration or Doorbell Buffer Config. */
  serviceAll(): void {
    for (const sq of this.sqs) if (sq) this.service(sq);
  }

  /** Stages a completion in `cq`: it is written to the ring with the others of its batch (`notify`). */
  private complete(cq: CompletionQueue, sq: SubmissionQueue, cid: number, status: number, result: number): void {
    cq.stage(sq.head, sq.id, cid, status, result);
    this.trace?.posted(cq.id, sq.id, cid);
  }

  private logError(sqid: number, cid: number, status: number): void {
    this.errors.push({ count: ++this.errorCount, sqid, cid, status });
    if (this.errors.length > ERRORS_KEPT) this.errors.shift();
  }

  /**
   * Completes Asynchronous Event Requests while the admin CQ has room: those
   * an Abort ended first (Aborted by Request), then outstanding ones with
   * queued events.
   */
  deliverEvents(): void {
    const events = this.events;
    const admin = this.sqs[0];
    if (!admin) return;
    let posted = false;
    while (!admin.cq.full && this.ready) {
      if (events.aborted.length > 0) {
        this.complete(admin.cq, admin, events.aborted.shift()!, Status.ABORTED_BY_REQUEST, 0);
      } else if (events.requests.length > 0 && events.queued.length > 0) {
        const event = events.queued.shift()!;
        events.masked.add(event & 7);
        this.complete(admin.cq, admin, events.requests.shift()!, Status.SUCCESS, event);
      } else break;
      posted = true;
    }
    if (posted) {
      if (this.owed) this.owed.add(admin.cq);
      else this.notify([admin.cq]);
    }
  }

  // ---- interrupts ----

  /**
   * Writes the completions staged in `cqs` to their rings, then interrupts:
   * once per vector that got some, as coalescing allows (MSI-X and MSI), or
   * the INTx level. A ring outside guest memory leaves the controller
   * unable to report anything (CSTS.CFS).
   */
  private notify(cqs: Iterable<CompletionQueue>): void {
    if (!this.attached) {
      // Commands that finish as their client leaves: no guest memory to post to until the next one comes.
      for (const cq of cqs) this.held.add(cq);
      return;
    }
    if (this.held.size > 0) {
      const held = [...this.held];
      this.held.clear();
      this.notify(held);
    }
    const counts = this.postedPerVector;
    let vectors = 0;
    let any = false;
    const mode = this.irq.mode;
    for (const cq of cqs) {
      if (this.cqs[cq.id] !== cq) continue;
      let n: number;
      try {
        n = cq.post(this.dma);
      } catch (error) {
        if (!isDmaError(error)) throw error;
        this.csts |= Csts.CFS;
        continue;
      }
      if (n === 0) continue;
      any = true;
      if (cq.interrupts) {
        vectors |= 1 << cq.vector;
        counts[cq.vector] += n;
      } else this.trace?.interrupted(cq.id);
    }
    if (!any) return;
    // The host answers completions with doorbells: watch closely for them.
    this.doorbells.expect();
    if (mode === 'intx') this.updateLevel();
    for (let vector = 0; vectors !== 0; vector++, vectors >>>= 1) {
      if ((vectors & 1) === 0) continue;
      const n = counts[vector];
      counts[vector] = 0;
      if (mode === 'intx') this.traceInterrupted(vector);
      else this.coalescing.completed(vector, n, this.coalescingSetting(vector));
    }
    // A level or a held interrupt is dropped once the host consumes what it announces: follow the heads.
    for (const cq of cqs) if (this.cqs[cq.id] === cq) this.followHead(cq);
  }

  /** Set Features 0x08's value where `vector` may be coalesced (MSI-X or MSI; never the admin queue's, nor one with Coalescing Disable, nor while stopped); else 0. */
  private coalescingSetting(vector: number): number {
    if (vector === 0 || this.stopped || (this.features.coalescingDisabled >>> vector) & 1) return 0;
    return this.features.values.get(Feature.INTERRUPT_COALESCING)!;
  }

  /** Interrupt Coalescing or Interrupt Vector Configuration changed: interrupts held under the old settings go now. */
  coalescingChanged(): void {
    this.coalescing.releaseAll();
  }

  /** Signals `vector`: in MSI-X (masking is the library's) and MSI (masked by INTMS); INTx is a level, set elsewhere. */
  private signal(vector: number): void {
    const mode = this.irq.mode;
    if (mode === 'msix') this.irq.raise(vector);
    else if (mode === 'msi' && !((this.intms >>> vector) & 1)) this.irq.raise(vector);
    this.traceInterrupted(vector);
  }

  private traceInterrupted(vector: number): void {
    if (this.trace) for (const cq of this.cqs) if (cq?.interrupts && cq.vector === vector) this.trace.interrupted(cq.id);
  }

  /**
   * The host moved `cq`'s head: INTx follows; a held interrupt whose vector
   * has nothing left unconsumed would announce nothing, and is dropped.
   */
  private headMoved(cq: CompletionQueue): void {
    this.updateLevel();
    if (!cq.interrupts || !this.coalescing.holds(cq.vector)) return;
    if (!this.cqs.some((q) => q?.interrupts && q.vector === cq.vector && q.pending)) this.coalescing.drained(cq.vector);
  }

  /**
   * Reads an on-demand CQ head (doorbells.ts) from where the host stores it,
   * as a ring of it would deliver it. A value refused once is not reported
   * again until the host stores another.
   */
  private refreshHead(cq: CompletionQueue): void {
    const index = 2 * cq.id + 1;
    if (!this.doorbells.readsOnDemand(index)) return;
    const head = this.shadowAccess(() => this.doorbells.latest(index));
    if (head === undefined || head === cq.head || head === cq.refusedHead) return;
    cq.refusedHead = this.moveHead(cq, head) ? -1 : head;
  }

  /**
   * The host moved `cq`'s head to `value` (a ring, a shadow or on-demand
   * read): false, with an Invalid Doorbell Value event, for one past the ring.
   */
  private moveHead(cq: CompletionQueue, value: number): boolean {
    if (!cq.setHead(value)) {
      this.invalidDoorbell(AsyncEvent.INVALID_DOORBELL_VALUE);
      return false;
    }
    this.headMoved(cq);
    return true;
  }

  /**
   * Watches an on-demand CQ head while the controller waits on it (its CQ
   * has no room after a fresh read, so an SQ is held; an INTx level is up
   * for its entries; or its vector's interrupt is held by coalescing, to be
   * dropped if the host consumes them first), and stops watching it after.
   */
  private followHead(cq: CompletionQueue): void {
    const index = 2 * cq.id + 1;
    if (!this.doorbells.readsOnDemand(index)) return;
    if (cq.full) this.refreshHead(cq);
    const waiting = cq.full || (cq.interrupts && ((this.irq.mode === 'intx' && cq.pending) || this.coalescing.holds(cq.vector)));
    if (waiting) this.shadowAccess(() => this.doorbells.awaitHead(index, cq.head, this.dma));
    else this.doorbells.ignoreHead(index);
  }

  /** INTx: asserted while any CQ with interrupts enabled holds entries the host has not consumed, unless INTMS masks it. */
  private updateLevel(): void {
    if (this.irq.mode !== 'intx') return this.irq.lower();
    const level = (this.intms & 1) === 0 && this.cqs.some((cq) => cq?.interrupts && cq.pending);
    if (level) this.irq.raise(0);
    else this.irq.lower();
  }

  /** Stops watching doorbells, drops held interrupts and closes the store, which the controller owns; then the library's close(). */
  override close(): void {
    super.close();
    // The library's constructor closes a device it refuses, before this class set its doorbells and coalescing.
    this.doorbells?.close();
    this.coalescing?.reset();
    // The library's constructor closes a device it refuses, before this class set a store.
    if (this.store && !this.storeClosed) this.store.close();
    this.storeClosed = true;
  }

  // ---- migration ----

  private saveState(): Uint8Array {
    for (const cq of this.cqs) if (cq) this.refreshHead(cq);
    const state: SavedState = {
      version: STATE_VERSION,
      registers: { cc: this.cc, csts: this.csts, aqa: this.aqa, asq: this.asq.toString(), acq: this.acq.toString(), intms: this.intms },
      features: {
        values: [...this.features.values],
        temperature: this.features.temperature,
        coalescingDisabled: this.features.coalescingDisabled,
        ioQueues: this.features.ioQueues,
      },
      cqs: this.cqs.filter((q) => q !== undefined).map((q) => ({
        id: q.id, base: q.base.toString(), size: q.size, head: q.head, tail: q.tail, phase: q.phase, vector: q.vector, interrupts: q.interrupts,
      })),
      sqs: this.sqs.filter((q) => q !== undefined).map((q) => ({
        id: q.id, base: q.base.toString(), size: q.size, head: q.head, tail: q.tail, cq: q.cq.id,
      })),
      events: { requests: this.events.requests, aborted: this.events.aborted, queued: this.events.queued, masked: [...this.events.masked] },
      errors: this.errors,
      errorCount: this.errorCount,
      smart: this.smart,
      shadowDoorbells: this.shadow ? { shadow: this.shadow.shadow.toString(), eventIdx: this.shadow.eventIdx.toString() } : null,
    };
    return Buffer.from(JSON.stringify(state));
  }

  /** Checks the whole state first (parseState throws NvmeStateError), then applies it. */
  private loadState(data: Uint8Array): void {
    const state = parseState(data, { ccWritable: CC_WRITABLE, cstsBits: CSTS_BITS, ready: Csts.RDY, shadowDoorbells: this.offersShadowDoorbells, errorsKept: ERRORS_KEPT });
    const cqs: CompletionQueue[] = [];
    for (const q of state.cqs) {
      const cq = new CompletionQueue(q.id, BigInt(q.base), q.size, q.vector, q.interrupts);
      Object.assign(cq, { head: q.head, tail: q.tail, phase: q.phase });
      cqs[q.id] = cq;
    }
    const sqs: SubmissionQueue[] = [];
    for (const q of state.sqs) {
      const sq = new SubmissionQueue(q.id, BigInt(q.base), q.size, cqs[q.cq]!);
      Object.assign(sq, { head: q.head, tail: q.tail });
      cqs[q.cq]!.submissionQueues.add(q.id);
      sqs[q.id] = sq;
    }
    const r = state.registers;
    Object.assign(this, { cc: r.cc, csts: r.csts, aqa: r.aqa, asq: BigInt(r.asq), acq: BigInt(r.acq), intms: r.intms });
    const f = state.features;
    Object.assign(this.features, { values: new Map(f.values), temperature: f.temperature, coalescingDisabled: f.coalescingDisabled, ioQueues: f.ioQueues });
    this.cqs = cqs;
    this.sqs = sqs;
    Object.assign(this.events, { requests: state.events.requests, aborted: state.events.aborted, queued: state.events.queued, masked: new Set(state.events.masked) });
    this.errors = state.errors;
    this.errorCount = state.errorCount;
    this.smart = state.smart;
    const shadow = state.shadowDoorbells;
    this.shadow = shadow ? new ShadowDoorbells(() => this.dma, BigInt(shadow.shadow), BigInt(shadow.eventIdx)) : undefined;
  }
}

/** A command waiting for the store: what its completion needs. */
interface StoreWait {
  sq: SubmissionQueue | undefined;
  cid: number;
  opcode: number;
  /** Its dword 12 (a read's or write's block count, for SMART). */
  dw12: number;
  readonly fulfilled: (value: number | void) => void;
  readonly rejected: (error: unknown) => void;
  /** `rejected` or `fulfilled`, for a store's callback. */
  readonly finished: (error: Error | null) => void;
}

/** The status of a command that threw (see `execute`). */
function failed(error: unknown, opcode: number, sqid: number): number {
  if (error instanceof CommandError) return error.status;
  // Guest memory the client truncated under the I/O is as much a transfer error as memory never mapped.
  if (isDmaError(error) || (error instanceof BlockIoError && error.errno === Errno.EFAULT)) return Status.DATA_TRANSFER_ERROR;
  console.error(`nvme: internal error in opcode 0x${opcode.toString(16)} on SQ ${sqid}:`, error);
  return Status.INTERNAL_ERROR;
}
