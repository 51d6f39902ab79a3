/**
 * `BlockDevice`: a file or block device that moves data straight between
 * itself and guest memory, asynchronously. Reads land in the guest's pages
 * and writes leave from them (the kernel is given the DMA windows' memory:
 * no copy, no buffer of ours), through io_uring where the kernel allows it
 * and a few native threads elsewhere. Nothing runs synchronously on the
 * event loop but the submission, one system call for the requests made in
 * one turn; completions arrive in batches, one wake-up of the loop for
 * everything that finished together.
 *
 * Device-neutral: NVMe, virtio-blk or anything else that stores blocks
 * hands it scatter-gather lists of guest memory and byte offsets.
 */
import { UsageError } from '../errors.js';
import { DmaAccessError } from '../dma/errors.js';
import type { GuestMemoryAccess, SgList } from '../dma/access.js';
import { errnoOf, native, type NativeBlockDevice } from '../native.js';
import { Errno } from '../protocol/index.js';
import { BlockDeviceClosedError, BlockIoError, BlockOpenError, BlockQueueFullError, type BlockOp } from './errors.js';

export type BlockEngine = 'io_uring' | 'threads';

export interface BlockOpenOptions {
  /** O_DIRECT: bypass the page cache. Requests must then respect `alignment`. Default false. */
  direct?: boolean;
  /** Open read-only: writes, discards and write-zeroes fail with EBADF. Default false. */
  readOnly?: boolean;
  /** Requests in flight at most (1-4096); one more is refused with `BlockQueueFullError`. Default 128. */
  queueDepth?: number;
  /**
   * Which engine moves the data. By default io_uring where the kernel offers
   * it (not refused by seccomp or `kernel.io_uring_disabled`), else threads;
   * the environment variable `VFIO_USER_BLOCK_ENGINE` (`threads` or
   * `io_uring`) sets the default. Naming one fails when it is unavailable.
   */
  engine?: BlockEngine;
}

/** What O_DIRECT asks: file offsets and lengths multiples of `offset`, every guest memory segment's address and length of `memory`. */
export interface BlockAlignment {
  readonly memory: number;
  readonly offset: number;
}

/** How a request's end is reported: null for success, else the error (a `BlockIoError`, or the refusal that kept it from starting). */
export type BlockCallback = (error: Error | null) => void;

interface Pending {
  /** The promise's settlers, or the caller's callback. */
  resolve: (() => void) | undefined;
  reject: ((error: Error) => void) | undefined;
  done: BlockCallback | undefined;
  op: BlockOp;
  offset: bigint;
  length: bigint;
}

const DEFAULT_QUEUE_DEPTH = 128;
const MAX_QUEUE_DEPTH = 4096;

export class BlockDevice {
  /** Bytes: the file's size when opened, or the block device's. */
  readonly size: bigint;
  readonly engine: BlockEngine;
  /** What O_DIRECT requires; null for buffered I/O. */
  readonly alignment: BlockAlignment | null;
  readonly readOnly: boolean;
  readonly queueDepth: number;
  /** Requests by tag; a tag is a slot, free again when its request settles. */
  private readonly pending: (Pending | undefined)[];
  private readonly freeTags: number[];
  private closing: Promise<void> | undefined;
  private drained: (() => void) | undefined;
  /** Requests were queued in this turn: they go to the kernel together once it ends (one system call per batch). */
  private submitting = false;
  private readonly submitQueued = (): void => {
    this.submitting = false;
    // Requests the kernel served within the submission (cached pages) settle now.
    const done = this.native.submit();
    if (done) this.settle(done);
  };

  private constructor(
    readonly path: string,
    private readonly native: NativeBlockDevice,
    options: Required<Pick<BlockOpenOptions, 'readOnly' | 'queueDepth'>>,
  ) {
    this.size = native.size;
    this.engine = native.engine;
    this.alignment = native.alignment;
    this.readOnly = options.readOnly;
    this.queueDepth = options.queueDepth;
    this.pending = new Array(options.queueDepth).fill(undefined);
    this.freeTags = Array.from({ length: options.queueDepth }, (_, i) => options.queueDepth - 1 - i);
  }

  /**
   * Opens a regular file or block device. Opening is the one synchronous
   * call (open and stat, at setup); throws `BlockOpenError` with the errno.
   */
  static open(path: string, options: BlockOpenOptions = {}): BlockDevice {
    const queueDepth = options.queueDepth ?? DEFAULT_QUEUE_DEPTH;
    if (!Number.isInteger(queueDepth) || queueDepth < 1 || queueDepth > MAX_QUEUE_DEPTH) {
      throw new UsageError(`queueDepth ${queueDepth} is not an integer in 1..${MAX_QUEUE_DEPTH}`);
    }
    if (options.engine !== undefined && options.engine !== 'io_uring' && options.engine !== 'threads') {
      throw new UsageError(`engine ${String(options.engine)} is neither 'io_uring' nor 'threads'`);
    }
    const readOnly = options.readOnly ?? false;
    let device: BlockDevice | undefined;
    let handle: NativeBlockDevice;
    try {
      handle = native.NativeBlockDevice.open(path, options.direct ?? false, readOnly, options.engine ?? '', queueDepth, (done) => device!.settle(done));
    } catch (error) {
      throw new BlockOpenError(errnoOf(error) ?? Errno.EINVAL, path, (error as Error).message);
    }
    if (handle.size > BigInt(Number.MAX_SAFE_INTEGER)) {
      handle.close();
      throw new BlockOpenError(Errno.E2BIG, path, 'larger than 2^53 bytes');
    }
    device = new BlockDevice(path, handle, { readOnly, queueDepth });
    return device;
  }

  /** Requests started and not yet settled. */
  get inFlight(): number {
    return this.queueDepth - this.freeTags.length;
  }

  /**
   * Reads `offset..` of the device into guest memory along `sg` (its total
   * length). With `done`, no promise is made: `done(null)` or
   * `done(error)` is called instead (an error that stops the request from
   * starting, as well as one from the kernel), never before `read` returns.
   * A device doing many small requests saves a promise each (and, where
   * AsyncLocalStorage is in use, as it is in the server, its hooks).
   */
  read(memory: GuestMemoryAccess, sg: SgList, offset: bigint): Promise<void>;
  read(memory: GuestMemoryAccess, sg: SgList, offset: bigint, done: BlockCallback): void;
  read(memory: GuestMemoryAccess, sg: SgList, offset: bigint, done?: BlockCallback): Promise<void> | void {
    return this.transfer('read', memory, sg, offset, done);
  }

  /** Writes guest memory along `sg` to `offset..` of the device; `done` as for `read`. */
  write(memory: GuestMemoryAccess, sg: SgList, offset: bigint): Promise<void>;
  write(memory: GuestMemoryAccess, sg: SgList, offset: bigint, done: BlockCallback): void;
  write(memory: GuestMemoryAccess, sg: SgList, offset: bigint, done?: BlockCallback): Promise<void> | void {
    return this.transfer('write', memory, sg, offset, done);
  }

  /** Makes completed writes durable (fdatasync). */
  flush(): Promise<void> {
    return this.start('flush', 0n, 0n, (tag) => this.native.flush(tag));
  }

  /**
   * Gives the range back (FALLOC_FL_PUNCH_HOLE): it reads as zeros after and
   * takes no space. Where the filesystem cannot punch holes, zeros are written.
   */
  discard(offset: bigint, length: bigint): Promise<void> {
    checkRange(offset, length);
    return this.start('discard', offset, length, (tag) => this.native.discard(tag, offset, length));
  }

  /** Makes the range read as zeros (FALLOC_FL_ZERO_RANGE, or writes of zeros where the filesystem lacks it). */
  writeZeroes(offset: bigint, length: bigint): Promise<void> {
    checkRange(offset, length);
    return this.start('writeZeroes', offset, length, (tag) => this.native.writeZeroes(tag, offset, length));
  }

  /**
   * Refuses new requests, waits for those in flight to settle, then closes
   * the file. Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      if (this.inFlight > 0) await new Promise<void>((resolve) => (this.drained = resolve));
      this.native.close();
    })();
    return this.closing;
  }

  private transfer(op: 'read' | 'write', memory: GuestMemoryAccess, sg: SgList, offset: bigint, done?: BlockCallback): Promise<void> | void {
    checkRange(offset, 0n);
    const refusal = this.refusal(op) ?? (offset > this.size ? this.failure(Errno.EINVAL, op, offset, 0n) : undefined);
    if (refusal) return this.refuse(refusal, done);
    const into = op === 'read';
    // The device is smaller than 2^53 bytes (checked at open), so the offset is exact as a number.
    const at = Number(offset);
    let length = 0;
    let pieces: ReturnType<GuestMemoryAccess['resolveSg']>;
    try {
      // Every piece is resolved and checked before anything starts.
      pieces = memory.resolveSg(sg, into ? 'writable' : 'readable');
      for (const piece of pieces) {
        if (!piece.window.mapping) {
          const iova = piece.window.iova + BigInt(piece.offset);
          throw new BlockIoError(Errno.ENOTSUP, op, offset, BigInt(piece.length), `guest memory at 0x${iova.toString(16)} is mapped without an fd: block I/O needs memory shared by fd`);
        }
        length += piece.length;
      }
      if (pieces.length !== 1) {
        for (const piece of pieces) {
          const errno = this.native.addSegment(piece.window.mapping!, piece.offset, piece.length, into);
          if (errno !== 0) throw this.segmentError(errno, op, piece.window.iova + BigInt(piece.offset), piece.length);
        }
      }
    } catch (error) {
      this.native.clearSegments();
      return this.refuse(error as Error, done);
    }
    const tag = this.freeTags.pop()!;
    if (pieces.length !== 1) {
      return this.started(tag, into ? this.native.read(tag, at) : this.native.write(tag, at), op, offset, BigInt(length), done);
    }
    const piece = pieces[0];
    const errno = this.native.transferOne(tag, into, piece.window.mapping!, piece.offset, piece.length, at);
    // The segment is checked in the same call: EFAULT and EPERM there are the window's.
    const windowFailure = errno === Errno.EFAULT || errno === Errno.EPERM
      ? this.segmentError(errno, op, piece.window.iova + BigInt(piece.offset), piece.length)
      : undefined;
    return this.started(tag, errno, op, offset, BigInt(length), done, windowFailure);
  }

  private segmentError(errno: number, op: 'read' | 'write', iova: bigint, length: number): Error {
    return new DmaAccessError(errno, iova, length, errno === Errno.EFAULT ? 'the window is gone' : `the window is not ${op === 'read' ? 'writable' : 'readable'}`);
  }

  /** A request that cannot start: its rejection, or its callback on a later turn. */
  private refuse(error: Error, done: BlockCallback | undefined): Promise<void> | void {
    if (!done) return Promise.reject(error);
    queueMicrotask(() => done(error));
  }

  /** Why a new request cannot start now, if it cannot. */
  private refusal(op: BlockOp): Error | undefined {
    if (this.closing) return new BlockDeviceClosedError(this.path, op);
    if (this.freeTags.length === 0) return new BlockQueueFullError(op, this.queueDepth);
    return undefined;
  }

  private start(op: BlockOp, offset: bigint, length: bigint, submit: (tag: number) => number): Promise<void> {
    const refusal = this.refusal(op);
    if (refusal) return Promise.reject(refusal);
    const tag = this.freeTags.pop()!;
    return this.started(tag, submit(tag), op, offset, length) as Promise<void>;
  }

  /** Request `tag` was handed to the native queue, which answered `errno` (0: queued). */
  private started(tag: number, errno: number, op: BlockOp, offset: bigint, length: bigint, done?: BlockCallback, failure?: Error): Promise<void> | void {
    if (errno !== 0) {
      this.freeTags.push(tag);
      return this.refuse(failure ?? this.failure(errno, op, offset, length), done);
    }
    if (!this.submitting) {
      this.submitting = true;
      queueMicrotask(this.submitQueued);
    }
    if (done) {
      this.pending[tag] = { resolve: undefined, reject: undefined, done, op, offset, length };
      return;
    }
    return new Promise((resolve, reject) => (this.pending[tag] = { resolve, reject, done: undefined, op, offset, length }));
  }

  /** Settles a batch of completions: [tag, errno, tag, errno, ...]. */
  private settle(done: number[]): void {
    // A callback that throws does not keep the others from their results; the first throw is raised after.
    let thrown: { error: unknown } | undefined;
    for (let i = 0; i < done.length; i += 2) {
      const tag = done[i];
      const request = this.pending[tag]!;
      this.pending[tag] = undefined;
      this.freeTags.push(tag);
      const errno = done[i + 1];
      const error = errno === 0 ? null : this.failure(errno, request.op, request.offset, request.length);
      if (request.done) {
        try {
          request.done(error);
        } catch (e) {
          thrown ??= { error: e };
        }
      } else if (error) request.reject!(error);
      else request.resolve!();
    }
    if (this.inFlight === 0) this.drained?.();
    if (thrown) throw thrown.error;
  }

  private failure(errno: number, op: BlockOp, offset: bigint, length: bigint): BlockIoError {
    let detail: string | undefined;
    if (errno === Errno.EINVAL) {
      const a = this.alignment;
      detail = offset + length > this.size
        ? `outside the ${this.size}-byte device`
        : `not aligned as O_DIRECT needs: offset and length multiples of ${a?.offset}, memory addresses and lengths of ${a?.memory}`;
    } else if (errno === Errno.EBADF) {
      detail = this.readOnly ? 'the device is open read-only' : 'the device is closed';
    } else if (errno === Errno.EFAULT) {
      detail = 'guest memory could not be reached (the client truncated its file)';
    }
    return new BlockIoError(errno, op, offset, length, detail);
  }
}

function checkRange(offset: bigint, length: bigint): void {
  if (typeof offset !== 'bigint' || offset < 0n) throw new UsageError(`offset ${String(offset)} is not a non-negative bigint`);
  if (typeof length !== 'bigint' || length < 0n) throw new UsageError(`length ${String(length)} is not a non-negative bigint`);
}
