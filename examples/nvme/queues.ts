/**
 * Submission and completion queues: rings in guest memory, physically
 * contiguous (CAP.CQR), with the controller's head and tail indices (§4.1).
 */
import type { DmaSpace } from 'vfio-user';
import { Command, CommandError, Status } from './command.js';

export const SQ_ENTRY = 64;
export const CQ_ENTRY = 16;

export class CompletionQueue {
  head = 0;
  tail = 0;
  /** The phase tag the next entry carries; flips each time the ring wraps. */
  phase = 1;
  readonly submissionQueues = new Set<number>();
  private readonly entry = Buffer.alloc(CQ_ENTRY);

  constructor(
    readonly id: number,
    readonly base: bigint,
    readonly size: number,
    readonly vector: number,
    readonly interrupts: boolean,
  ) {}

  /** Entries promised to commands still running (the store completes them later). */
  reserved = 0;

  /** No entry left for another command: every free one is posted or promised. */
  get full(): boolean {
    return (this.tail - this.head + this.size) % this.size + this.reserved >= this.size - 1;
  }

  /** Whether the host has entries it has not consumed yet (what a level interrupt shows). */
  get pending(): boolean {
    return this.head !== this.tail;
  }

  /** Writes one entry (§4.6): the caller checks `full` first. */
  post(dma: DmaSpace, sq: SubmissionQueue, cid: number, status: number, result: number): void {
    const e = this.entry;
    e.writeUInt32LE(result >>> 0, 0);
    e.writeUInt32LE(0, 4);
    e.writeUInt16LE(sq.head, 8);
    e.writeUInt16LE(sq.id, 10);
    e.writeUInt16LE(cid, 12);
    // Every error here is deterministic: Do Not Retry with it.
    const dnr = status === Status.SUCCESS ? 0 : 0x8000;
    e.writeUInt16LE(((status << 1) | this.phase | dnr) & 0xffff, 14);
    dma.write(this.base + BigInt(this.tail * CQ_ENTRY), e);
    this.tail = (this.tail + 1) % this.size;
    if (this.tail === 0) this.phase ^= 1;
  }

  /** The host's CQ head doorbell; a value past the ring is refused. */
  setHead(value: number): boolean {
    if (value >= this.size) return false;
    this.head = value;
    return true;
  }
}

export class SubmissionQueue {
  head = 0;
  tail = 0;

  constructor(
    readonly id: number,
    readonly base: bigint,
    readonly size: number,
    readonly cq: CompletionQueue,
  ) {}

  /** The host's SQ tail doorbell; a value past the ring is refused. */
  setTail(value: number): boolean {
    if (value >= this.size) return false;
    this.tail = value;
    return true;
  }

  /** Whether there is an entry to fetch and room for its completion. */
  get ready(): boolean {
    return this.head !== this.tail && !this.cq.full;
  }

  /** Reads the entry at the head into `command` and consumes it. */
  fetch(dma: DmaSpace, command: Command): void {
    command.result = 0;
    try {
      dma.readInto(this.base + BigInt(this.head * SQ_ENTRY), command.bytes);
    } catch (error) {
      // The ring itself is outside guest memory: nothing to execute, but the host still gets an answer.
      command.bytes.fill(0);
      throw new CommandError(Status.DATA_TRANSFER_ERROR, (error as Error).message);
    } finally {
      this.head = (this.head + 1) % this.size;
    }
  }
}
