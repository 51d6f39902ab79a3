/**
 * Submission and completion queues: rings in guest memory, physically
 * contiguous (CAP.CQR), with the controller's head and tail indices (§4.1).
 *
 * Both move in batches: an SQ's entries from its head to the tail are read
 * ahead in one copy per contiguous run of the ring (two at its wrap), and a
 * CQ's completions are staged as commands finish and written together by
 * `post()`, which moves the tail once.
 */
import type { DmaSpace } from 'vfio-user';
import { SQ_ENTRY, Status } from './command.js';

/** Bytes of a completion queue entry (CQES 4). */
export const CQ_ENTRY = 16;
/** Staged completion: dword 0, then SQ head | SQ ID << 16, then CID | status << 16 (Status Field without the phase tag). */
const STAGED_WORDS = 3;
/** Status Field bit 15: Do Not Retry. */
const DNR = 0x8000;
/**
 * Commands one queue runs before the controller lets the event loop turn
 * (and the most entries one fetch reads): a host that keeps its SQ full (or
 * keeps moving its shadow tail) cannot hold the process; the rest run on the
 * next turn.
 */
export const BATCH = 64;

export class CompletionQueue {
  head = 0;
  /** The next entry `post()` writes: entries before it are in guest memory. */
  tail = 0;
  /** The phase tag the entry at `tail` carries; flips each time the ring wraps. */
  phase = 1;
  readonly submissionQueues = new Set<number>();
  /** Entries promised to commands still running (the store completes them later). */
  reserved = 0;
  /** Completions staged for the next `post()`. */
  staged = 0;
  /** A head read on demand and refused (past the ring), reported once. */
  refusedHead = -1;
  private stagedWords: Uint32Array | undefined;
  /** One entry, laid out for `writeEntries`. */
  private readonly entry = Buffer.alloc(CQ_ENTRY);

  constructor(
    readonly id: number,
    readonly base: bigint,
    readonly size: number,
    readonly vector: number,
    readonly interrupts: boolean,
  ) {}

  /** Entries a command may still take: neither holding an unconsumed completion, nor staged, nor promised. */
  get room(): number {
    return Math.max(0, this.size - 1 - ((this.tail - this.head + this.size) % this.size) - this.staged - this.reserved);
  }

  /** No entry left for another command. */
  get full(): boolean {
    return this.room === 0;
  }

  /** Whether the host has entries it has not consumed yet (what a level interrupt shows). */
  get pending(): boolean {
    return this.head !== this.tail;
  }

  /** Stages one completion (§4.6) for the next `post()`; the caller checks `full` first. */
  stage(sqHead: number, sqid: number, cid: number, status: number, result: number): void {
    const words = (this.stagedWords ??= new Uint32Array(STAGED_WORDS * this.size));
    const at = STAGED_WORDS * this.staged++;
    words[at] = result;
    words[at + 1] = sqHead | (sqid << 16);
    // Every error here is deterministic: Do Not Retry with it.
    words[at + 2] = cid | (((status << 1) | (status === Status.SUCCESS ? 0 : DNR)) << 16);
  }

  /**
   * Writes the staged completions into the ring and moves the tail past
   * them; returns how many. Through one view of the ring: first every
   * entry but its Status Field (whose phase tag still says "old" to the
   * host), then each Status Field in order with its new phase tag, each an
   * atomic store that follows the entry's other stores: a host that sees
   * the phase flip sees the whole entry, as it reads it after its read
   * barrier. A ring in memory that is not plain (an unsealed file, as
   * SPDK's hugepages, where a view per batch would be an ArrayBuffer for
   * the garbage collector each time; or across windows) is written an
   * entry at a time with native copies, its Status Field last. Throws a
   * DMA error when the ring is not guest memory.
   */
  post(dma: DmaSpace): number {
    const n = this.staged;
    if (n === 0) return 0;
    this.staged = 0;
    if (dma.hasPlainAccess(this.base, this.size * CQ_ENTRY)) dma.withView(this.base, this.size * CQ_ENTRY, (ring) => this.writeRing(ring, n));
    else this.writeEntries(dma, n);
    this.tail += n;
    if (this.tail >= this.size) {
      this.tail -= this.size;
      this.phase ^= 1;
    }
    return n;
  }

  /** The host's CQ head doorbell; a value past the ring is refused. */
  setHead(value: number): boolean {
    if (value >= this.size) return false;
    this.head = value;
    return true;
  }

  private writeRing(ring: Uint8Array, n: number): void {
    if (ring.byteOffset % 4 !== 0) return this.writeEntries(undefined, n, ring);
    const words = new Uint32Array(ring.buffer, ring.byteOffset, 4 * this.size);
    const halves = new Uint16Array(ring.buffer, ring.byteOffset, 8 * this.size);
    const staged = this.stagedWords!;
    const size = this.size;
    let t = this.tail;
    for (let i = 0, at = 0; i < n; i++, at += STAGED_WORDS) {
      words[4 * t] = staged[at];
      words[4 * t + 1] = 0;
      words[4 * t + 2] = staged[at + 1];
      halves[8 * t + 6] = staged[at + 2] & 0xffff;
      if (++t === size) t = 0;
    }
    t = this.tail;
    let phase = this.phase;
    for (let i = 0, at = 2; i < n; i++, at += STAGED_WORDS) {
      Atomics.store(halves, 8 * t + 7, (staged[at] >>> 16) | phase);
      if (++t === size) {
        t = 0;
        phase ^= 1;
      }
    }
  }

  /**
   * Entry by entry, in order, through `dma` or into `ring` (a view not
   * aligned for word stores): each entry's first 14 bytes, then its Status
   * Field with the phase tag, a later store the host sees after them.
   */
  private writeEntries(dma: DmaSpace | undefined, n: number, ring?: Uint8Array): void {
    const staged = this.stagedWords!;
    const entry = this.entry;
    const body = entry.subarray(0, CQ_ENTRY - 2);
    const status = entry.subarray(CQ_ENTRY - 2);
    let t = this.tail;
    let phase = this.phase;
    for (let i = 0, at = 0; i < n; i++, at += STAGED_WORDS) {
      entry.writeUInt32LE(staged[at], 0);
      entry.writeUInt32LE(staged[at + 1], 8);
      entry.writeUInt16LE(staged[at + 2] & 0xffff, 12);
      entry.writeUInt16LE((staged[at + 2] >>> 16) | phase, 14);
      const address = t * CQ_ENTRY;
      if (ring) {
        ring.set(body, address);
        ring.set(status, address + CQ_ENTRY - 2);
      } else {
        const iova = this.base + BigInt(address);
        dma!.write(iova, body);
        dma!.write(iova + BigInt(CQ_ENTRY - 2), status);
      }
      if (++t === this.size) {
        t = 0;
        phase ^= 1;
      }
    }
  }
}

export class SubmissionQueue {
  head = 0;
  tail = 0;
  /** Entries read ahead from the head (`fetch`), `SQ_ENTRY` bytes each. */
  readonly entries: Buffer;
  /** Per entry read ahead: 1 when it was outside guest memory (read as zeros). */
  readonly unreadable: Uint8Array;

  constructor(
    readonly id: number,
    readonly base: bigint,
    readonly size: number,
    readonly cq: CompletionQueue,
  ) {
    const n = Math.min(size, BATCH);
    this.entries = Buffer.alloc(n * SQ_ENTRY);
    this.unreadable = new Uint8Array(n);
  }

  /** The host's SQ tail doorbell; a value past the ring is refused. */
  setTail(value: number): boolean {
    if (value >= this.size) return false;
    this.tail = value;
    return true;
  }

  /** Entries the host submitted that the controller has not consumed. */
  get waiting(): number {
    return (this.tail - this.head + this.size) % this.size;
  }

  /** Whether there is an entry to fetch and room for its completion. */
  get ready(): boolean {
    return this.head !== this.tail && !this.cq.full;
  }

  /**
   * Reads up to `max` entries from the head into `entries` (copies, so the
   * host cannot change one while it is checked): one copy per contiguous run
   * of the ring. Consumes nothing: the caller moves the head past each entry
   * it runs (`consume`). An entry outside guest memory reads as zeros and is
   * marked `unreadable`. Returns how many were read.
   */
  fetch(dma: DmaSpace, max: number): number {
    const n = Math.min(max, this.waiting, this.unreadable.length);
    const first = Math.min(n, this.size - this.head);
    this.readRun(dma, this.head, 0, first);
    if (first < n) this.readRun(dma, 0, first, n - first);
    return n;
  }

  /** Moves the head past the entry the controller took. */
  consume(): void {
    if (++this.head === this.size) this.head = 0;
  }

  private readRun(dma: DmaSpace, slot: number, into: number, n: number): void {
    const target = this.entries.subarray(into * SQ_ENTRY, (into + n) * SQ_ENTRY);
    try {
      dma.readInto(this.base + BigInt(slot * SQ_ENTRY), target);
      this.unreadable.fill(0, into, into + n);
    } catch {
      // Part of the ring is not guest memory: entry by entry, so each gets its own answer.
      for (let i = 0; i < n; i++) {
        const entry = target.subarray(i * SQ_ENTRY, (i + 1) * SQ_ENTRY);
        try {
          dma.readInto(this.base + BigInt((slot + i) * SQ_ENTRY), entry);
          this.unreadable[into + i] = 0;
        } catch {
          entry.fill(0);
          this.unreadable[into + i] = 1;
        }
      }
    }
  }
}
