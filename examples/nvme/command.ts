/**
 * What admin and I/O commands share: the 64-byte submission entry, the
 * status codes a completion carries, and PRP data pointers (NVMe 1.4 §4.2,
 * §4.3, §4.6).
 */
import { AsyncDmaRequiredError, DmaAccessError, DmaSpaceClosedError, DmaViewError, type DmaSpace } from 'vfio-user';

/** Status Code Type << 8 | Status Code, as the completion's Status Field holds them (§4.6.1.2). */
export const Status = {
  SUCCESS: 0x000,
  INVALID_OPCODE: 0x001,
  INVALID_FIELD: 0x002,
  DATA_TRANSFER_ERROR: 0x004,
  INTERNAL_ERROR: 0x006,
  ABORTED_BY_REQUEST: 0x007,
  INVALID_NAMESPACE: 0x00b,
  COMMAND_SEQUENCE_ERROR: 0x00c,
  PRP_OFFSET_INVALID: 0x013,
  LBA_OUT_OF_RANGE: 0x080,
  // Command specific (type 1).
  COMPLETION_QUEUE_INVALID: 0x100,
  INVALID_QUEUE_ID: 0x101,
  INVALID_QUEUE_SIZE: 0x102,
  AER_LIMIT_EXCEEDED: 0x105,
  INVALID_INTERRUPT_VECTOR: 0x108,
  INVALID_LOG_PAGE: 0x109,
  INVALID_QUEUE_DELETION: 0x10c,
  FEATURE_NOT_SAVEABLE: 0x10d,
  FEATURE_NOT_NAMESPACE_SPECIFIC: 0x10f,
} as const;

/** A handler's answer that completes later (an Asynchronous Event Request). */
export const DEFERRED = -1;

/** Ends a command with `status`; thrown by handlers and the PRP walker. */
export class CommandError extends Error {
  constructor(readonly status: number, why: string) {
    super(why);
  }
}

export const PAGE_SIZE = 4096;
/** Bytes of a submission queue entry (SQES 6). */
export const SQ_ENTRY = 64;
const PAGE = BigInt(PAGE_SIZE);
const PRP_ENTRY = 8;
/** MDTS 7: at most 2^7 pages (512 KiB) per command, in units of CAP.MPSMIN (4 KiB). */
export const MDTS = 7;
export const MAX_TRANSFER = PAGE_SIZE << MDTS;

/** Every data-carrying command's length is checked against MDTS before anything else is read (Invalid Field, as QEMU answers). */
export function checkTransfer(length: number): void {
  if (length > MAX_TRANSFER) throw new CommandError(Status.INVALID_FIELD, `${length} bytes is past MDTS (${MAX_TRANSFER})`);
}

/**
 * A submission queue entry, decoded in place where its queue read it ahead
 * (`load`); one is reused for every command.
 */
export class Command {
  private bytes: Buffer = Buffer.alloc(SQ_ENTRY);
  private at = 0;
  /** Completion dword 0, set by handlers that return a value. */
  result = 0;

  /** Decodes the entry at byte `at` of `entries` from now on. */
  load(entries: Buffer, at: number): void {
    this.bytes = entries;
    this.at = at;
    this.result = 0;
  }

  get opcode(): number { return this.bytes[this.at]; }
  /** PSDT: 0 for PRPs; SGLs are not supported. */
  get dataTransfer(): number { return this.bytes[this.at + 1] >> 6; }
  /** FUSE: 0 for a command on its own; fused operations are not supported. */
  get fused(): number { return this.bytes[this.at + 1] & 3; }
  get cid(): number { return this.bytes.readUInt16LE(this.at + 2); }
  get nsid(): number { return this.bytes.readUInt32LE(this.at + 4); }
  get prp1(): bigint { return this.bytes.readBigUInt64LE(this.at + 24); }
  get prp2(): bigint { return this.bytes.readBigUInt64LE(this.at + 32); }
  /** PRP1 as a number (guest addresses past 2^53 lose bits: checked against the DMA windows as a bigint later). */
  get prp1Low(): number { return this.bytes.readUInt32LE(this.at + 24); }
  /** Command dwords 10-15. */
  dw(n: 10 | 11 | 12 | 13 | 14 | 15): number { return this.bytes.readUInt32LE(this.at + 4 * n); }
  /** Dwords 12 and 13 as one 64-bit value (Get Log Page's offset). */
  get dw12_13(): bigint { return this.bytes.readBigUInt64LE(this.at + 48); }
}

/** FUSE and PSDT (byte 1): fused operations and SGLs are not supported (FUSES, SGLS clear): Invalid Field. */
export function checkFlags(command: Command): void {
  if (command.fused !== 0) throw new CommandError(Status.INVALID_FIELD, 'fused operations are not supported');
  if (command.dataTransfer !== 0) throw new CommandError(Status.INVALID_FIELD, 'SGLs are not supported');
}

/** A run of guest memory: one or more whole PRP pages that happen to be contiguous. */
export interface Segment {
  iova: bigint;
  length: number;
}

/**
 * The guest memory a command's PRP1/PRP2 describe for `length` bytes (§4.3):
 * PRP1 may start inside a page (dword aligned); PRP2 is the second page, or,
 * past two pages, a qword-aligned pointer to a list of page pointers that
 * runs to the end of its page, whose last entry chains to the next list page
 * while more pages remain. Every data page starts a page, and so does every
 * chained list page (QEMU's rule too): so a list whose last entry points at
 * itself from inside its page is PRP Offset Invalid, and a list page after
 * the first holds 511 data pages before it chains. The walk is bounded by
 * `length` (at most MDTS): each data entry takes a page of it, and at most
 * one list page (the first, when it has a single slot) takes none. A list
 * outside guest memory is a Data Transfer Error. Adjacent pages are merged
 * so a transfer takes as few copies as it can.
 */
export function prpSegments(dma: DmaSpace, command: Command, length: number): Segment[] {
  checkTransfer(length);
  // Offsets and alignment are in the low dword: no bigint arithmetic for them.
  const low = command.prp1Low;
  if ((low & 3) !== 0) throw new CommandError(Status.PRP_OFFSET_INVALID, 'PRP1 is not dword aligned');
  const first = Math.min(length, PAGE_SIZE - (low & (PAGE_SIZE - 1)));
  const segments: Segment[] = [{ iova: command.prp1, length: first }];
  let left = length - first;
  if (left === 0) return segments;
  if (left <= PAGE_SIZE) {
    addPage(segments, command.prp2, left);
    return segments;
  }
  let list = command.prp2;
  if ((list & 7n) !== 0n) throw new CommandError(Status.PRP_OFFSET_INVALID, 'the PRP list pointer is not qword aligned');
  for (;;) {
    const slots = (PAGE_SIZE - Number(list & (PAGE - 1n))) / PRP_ENTRY;
    const pages = Math.ceil(left / PAGE_SIZE);
    const entries = dmaRead(dma, list, PRP_ENTRY * Math.min(slots, pages));
    const data = pages <= slots ? pages : slots - 1;
    for (let i = 0; i < data; i++) {
      const n = Math.min(left, PAGE_SIZE);
      addPage(segments, entries.readBigUInt64LE(PRP_ENTRY * i), n);
      left -= n;
    }
    if (pages <= slots) return segments;
    list = entries.readBigUInt64LE(PRP_ENTRY * (slots - 1));
    if ((list & (PAGE - 1n)) !== 0n) throw new CommandError(Status.PRP_OFFSET_INVALID, `the chained PRP list 0x${list.toString(16)} does not start a page`);
  }
}

/** Adds a data page (`n` bytes of it) to `segments`, merged with the last one when adjacent; PRP Offset Invalid unless it starts a page. */
function addPage(segments: Segment[], entry: bigint, n: number): void {
  if ((entry & (PAGE - 1n)) !== 0n) throw new CommandError(Status.PRP_OFFSET_INVALID, `PRP entry 0x${entry.toString(16)} has an offset`);
  const last = segments[segments.length - 1];
  if (last.iova + BigInt(last.length) === entry) last.length += n;
  else segments.push({ iova: entry, length: n });
}

/** Reads guest memory for the controller; a PRP or ring outside guest memory is a Data Transfer Error. */
export function dmaRead(dma: DmaSpace, iova: bigint, length: number): Buffer {
  return guarded(() => dma.read(iova, length));
}

/** Copies `data` into the segments (data the controller returns: Identify, log pages). */
export function writeSegments(dma: DmaSpace, segments: Segment[], data: Uint8Array): void {
  guarded(() => dma.writeSg(segments, data.subarray(0, segments.reduce((n, s) => n + s.length, 0))));
}

/**
 * Calls `each` with a zero-copy view of every segment (dma.withView) and the
 * segment's offset into the transfer: the caller moves data between the view
 * and the backing store directly. A segment that crosses into another DMA
 * window is viewed a page at a time.
 */
export function forEachView(dma: DmaSpace, segments: Segment[], each: (view: Uint8Array, offset: number) => void): void {
  let offset = 0;
  for (const s of segments) {
    guarded(() => {
      try {
        dma.withView(s.iova, s.length, (view) => each(view, offset));
      } catch (error) {
        if (!(error instanceof DmaViewError) || error.reason !== 'spans-windows') throw error;
        for (let at = 0; at < s.length; at += PAGE_SIZE) dma.withView(s.iova + BigInt(at), Math.min(PAGE_SIZE, s.length - at), (view) => each(view, offset + at));
      }
    });
    offset += s.length;
  }
}

/** Whether `error` says guest memory is not there to access (message-based windows too: this controller moves data only through mapped guest memory). */
export function isDmaError(error: unknown): error is Error {
  return error instanceof DmaAccessError || error instanceof DmaViewError || error instanceof AsyncDmaRequiredError || error instanceof DmaSpaceClosedError;
}

function guarded<T>(access: () => T): T {
  try {
    return access();
  } catch (error) {
    if (isDmaError(error)) throw new CommandError(Status.DATA_TRANSFER_ERROR, error.message);
    throw error;
  }
}
