/** One session's view of migration: DEVICE_FEATURE, MIG_DATA_* and DMA dirty logging. */
import type { DmaSpace } from '../../dma/space.js';
import { DIRTY_PAGE_SIZE } from '../../dma/access.js';
import {
  Command,
  decodeDeviceFeatureRequest,
  decodeDmaLoggingReportRequest,
  decodeDmaLoggingStart,
  decodeMigDataReadRequest,
  decodeMigDataWriteRequest,
  decodeMigDeviceState,
  DEVICE_FEATURE_SIZE,
  DMA_LOGGING_REPORT_SIZE,
  DeviceFeatureFlags,
  dmaLoggingBitmapSize,
  encodeDeviceFeatureReply,
  encodeDmaLoggingReportReply,
  encodeMigDataReadReply,
  encodeMigDeviceState,
  encodeMigrationFeature,
  Errno,
  FeatureIndex,
  featureIndex,
  MigrationState,
  ProtocolError,
  type DmaLoggingRange,
} from '../../protocol/index.js';
import type { MigrationStateMachine } from './machine.js';

const S = MigrationState;

// ---- dirty logging ----

const DIRTY_PAGE = BigInt(DIRTY_PAGE_SIZE);
const U64_END = 1n << 64n;
/** Dirty bits are fetched this many bytes of guest memory at a time (32 KiB of bitmap). */
const SCAN_CHUNK = 1n << 30n;

/** Our bitmaps are 4 KiB; coarser power-of-two page sizes are reported by OR-ing. */
function isLoggingPageSize(size: bigint): boolean {
  return size >= DIRTY_PAGE && (size & (size - 1n)) === 0n;
}

interface DirtyLog {
  /** Sorted, disjoint; empty means all of guest memory. */
  ranges: DmaLoggingRange[];
}

/**
 * The page-aligned parts of [iova, iova + length) that fd-backed windows map,
 * a chunk at a time: only mapped memory has dirty bits, and a huge, mostly
 * unmapped range must not cost a walk over all of it.
 */
function* mappedChunks(dma: DmaSpace, iova: bigint, length: bigint): Generator<[bigint, bigint]> {
  const end = iova + length;
  for (const w of dma.list()) {
    if (!w.mapping || w.end <= iova || w.iova >= end) continue;
    const from = w.iova > iova ? w.iova : iova;
    const to = w.end < end ? w.end : end;
    for (let at = from; at < to; at += SCAN_CHUNK) yield [at, to - at < SCAN_CHUNK ? to - at : SCAN_CHUNK];
  }
}

/** Forgets the writes recorded in [iova, iova + length). */
function clearDirty(dma: DmaSpace, iova: bigint, length: bigint): void {
  for (const [at, n] of mappedChunks(dma, iova, length)) dma.dirtyPages(at, Number(n), true);
}

/** Takes (and clears) the dirty bits of [iova, iova + length): [chunk iova, 4 KiB bitmap] per mapped chunk. */
function* takeDirty(dma: DmaSpace, iova: bigint, length: bigint): Generator<[bigint, BigUint64Array]> {
  for (const [at, n] of mappedChunks(dma, iova, length)) yield [at, dma.dirtyPages(at, Number(n), true)];
}

// ---- DEVICE_FEATURE and MIG_DATA_* for one session ----

const { GET, SET, PROBE } = DeviceFeatureFlags;

/** The operations each feature supports (§6.14). */
const FEATURE_OPS: ReadonlyMap<number, number> = new Map([
  [FeatureIndex.MIGRATION, GET],
  [FeatureIndex.MIG_DEVICE_STATE, GET | SET],
  [FeatureIndex.DMA_LOGGING_START, SET],
  [FeatureIndex.DMA_LOGGING_STOP, SET],
  [FeatureIndex.DMA_LOGGING_REPORT, GET],
]);

/** Commands that would change a device whose state is being copied out; see `check`. */
const FROZEN_IN_STOP_COPY: ReadonlySet<number> = new Set([
  Command.REGION_WRITE,
  Command.REGION_WRITE_MULTI,
  Command.DEVICE_SET_IRQS,
  Command.DEVICE_RESET,
]);

/** One session's view of migration: command decoding and dirty logging (which ends with the session). */
export class MigrationSession {
  private log: DirtyLog | undefined;

  constructor(
    private readonly machine: MigrationStateMachine,
    private readonly dma: DmaSpace,
    /** Largest payload we send or accept (max_data_xfer_size). */
    private readonly maxTransfer: number,
  ) {}

  /**
   * STOP_COPY's data was saved on entry, so a change made afterwards would
   * never reach the destination: commands that change device state are
   * refused (EINVAL, libvfio-user's errno). Reads are served, natively too.
   */
  check(command: number): void {
    if (this.machine.state === S.STOP_COPY && FROZEN_IN_STOP_COPY.has(command)) {
      throw new ProtocolError(Errno.EINVAL, command, 'the device is in STOP_COPY: its state is being saved');
    }
  }

  async feature(payload: Buffer): Promise<Buffer> {
    const fail = (errno: number, why: string) => new ProtocolError(errno, Command.DEVICE_FEATURE, why);
    const req = decodeDeviceFeatureRequest(payload);
    const index = featureIndex(req.flags);
    const supported = FEATURE_OPS.get(index);
    if (supported === undefined) throw fail(Errno.ENOTSUP, `feature ${index} is not supported`);
    const ops = req.flags & (GET | SET);
    // As kernel VFIO: an unsupported operation is EINVAL, with or without PROBE.
    if (ops & ~supported) throw fail(Errno.EINVAL, `feature ${index} does not support ${ops & GET & ~supported ? 'GET' : 'SET'}`);
    if (req.flags & PROBE) return payload;
    if (ops === 0) throw fail(Errno.EINVAL, 'GET or SET is needed without PROBE');
    if (ops === GET) {
      const data = await this.get(index, req.data, req.argsz);
      const reply = encodeDeviceFeatureReply({ flags: req.flags, data });
      if (req.argsz < reply.length) throw fail(Errno.EINVAL, `argsz ${req.argsz} < the ${reply.length}-byte reply`);
      return reply;
    }
    if (req.argsz < payload.length) throw fail(Errno.EINVAL, `argsz ${req.argsz} < the ${payload.length}-byte request`);
    await this.set(index, req.data);
    return payload;
  }

  /** `argsz` is the room the client gave the reply: a report must fit before it clears anything. */
  private async get(index: number, data: Buffer, argsz: number): Promise<Buffer> {
    switch (index) {
      case FeatureIndex.MIGRATION: return encodeMigrationFeature({ flags: BigInt(this.machine.flags) });
      case FeatureIndex.MIG_DEVICE_STATE: return encodeMigDeviceState({ deviceState: await this.machine.settledState() });
      default: return this.report(data, argsz);
    }
  }

  private async set(index: number, data: Buffer): Promise<void> {
    switch (index) {
      case FeatureIndex.MIG_DEVICE_STATE: return this.machine.setState(decodeMigDeviceState(data).deviceState);
      case FeatureIndex.DMA_LOGGING_START: return this.startLogging(data);
      default: this.log = undefined;
    }
  }

  private startLogging(data: Buffer): void {
    const fail = (errno: number, why: string) => new ProtocolError(errno, Command.DEVICE_FEATURE, `DMA_LOGGING_START: ${why}`);
    const { pageSize, ranges } = decodeDmaLoggingStart(data);
    if (this.log) throw fail(Errno.EBUSY, 'logging is already on: stop it first');
    if (!isLoggingPageSize(pageSize)) throw fail(Errno.EINVAL, `page size ${pageSize} is not a power of two of at least ${DIRTY_PAGE_SIZE}`);
    const sorted = [...ranges].sort((a, b) => (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0));
    sorted.forEach((r, i) => {
      const end = r.iova + r.length;
      if (r.length === 0n || end > U64_END || r.iova % pageSize !== 0n || r.length % pageSize !== 0n) {
        throw fail(Errno.EINVAL, `range 0x${r.iova.toString(16)}+0x${r.length.toString(16)} is empty, wraps or is not page-aligned`);
      }
      if (i + 1 < sorted.length && sorted[i + 1].iova < end) throw fail(Errno.EINVAL, 'ranges overlap');
    });
    // A report tells what was written since logging started: forget older writes.
    for (const w of this.dma.list()) if (w.mapping) clearDirty(this.dma, w.iova, w.size);
    this.log = { ranges: sorted };
  }

  /** DMA_LOGGING_REPORT: the 24 request bytes, then the bitmap at the requested page size; clears what it reports. */
  private report(data: Buffer, argsz: number): Buffer {
    const fail = (errno: number, why: string) => new ProtocolError(errno, Command.DEVICE_FEATURE, `DMA_LOGGING_REPORT: ${why}`);
    const req = decodeDmaLoggingReportRequest(data);
    const { iova, length, pageSize } = req;
    if (!this.log) throw fail(Errno.EINVAL, 'logging was not started');
    if (!isLoggingPageSize(pageSize)) throw fail(Errno.EINVAL, `page size ${pageSize} is not a power of two of at least ${DIRTY_PAGE_SIZE}`);
    if (length === 0n || iova + length > U64_END || iova % pageSize !== 0n || length % pageSize !== 0n) {
      throw fail(Errno.EINVAL, 'the range is empty, wraps or is not page-aligned');
    }
    if (!covers(this.log.ranges, iova, iova + length)) throw fail(Errno.EINVAL, 'the range was not logged');
    const bitmapSize = dmaLoggingBitmapSize(length, pageSize);
    if (DEVICE_FEATURE_SIZE + DMA_LOGGING_REPORT_SIZE + bitmapSize > this.maxTransfer) throw fail(Errno.E2BIG, `a ${bitmapSize}-byte bitmap exceeds max_data_xfer_size`);
    // Checked here, before the bits are taken: a refused report must not lose them.
    const replySize = DEVICE_FEATURE_SIZE + DMA_LOGGING_REPORT_SIZE + bitmapSize;
    if (argsz < replySize) throw fail(Errno.EINVAL, `argsz ${argsz} < the ${replySize}-byte reply`);
    const bitmap = Buffer.alloc(bitmapSize);
    const ratio = Number(pageSize / DIRTY_PAGE);
    for (const [at, words] of takeDirty(this.dma, iova, length)) {
      const base = Number((at - iova) / DIRTY_PAGE);
      words.forEach((word, w) => {
        if (word === 0n) return;
        // Each set 4 KiB bit ORs into the bit of the reported page holding it.
        for (const [half, offset] of [[Number(word & 0xffffffffn), 0], [Number(word >> 32n), 32]] as const) {
          for (let bits = half; bits !== 0; bits &= bits - 1) {
            const page = Math.floor((base + w * 64 + offset + 31 - Math.clz32(bits & -bits)) / ratio);
            bitmap[page >> 3] |= 1 << (page & 7);
          }
        }
      });
    }
    return encodeDmaLoggingReportReply({ ...req, bitmap });
  }

  async dataRead(payload: Buffer): Promise<Buffer> {
    const req = decodeMigDataReadRequest(payload);
    if (req.size > this.maxTransfer) throw new ProtocolError(Errno.E2BIG, Command.MIG_DATA_READ, `size ${req.size} exceeds max_data_xfer_size`);
    return encodeMigDataReadReply(await this.machine.read(req.size), undefined, req.size);
  }

  async dataWrite(payload: Buffer): Promise<void> {
    const { data } = decodeMigDataWriteRequest(payload);
    if (data.length > this.maxTransfer) throw new ProtocolError(Errno.E2BIG, Command.MIG_DATA_WRITE, `size ${data.length} exceeds max_data_xfer_size`);
    await this.machine.write(data);
  }

  afterReset(): Promise<void> {
    return this.machine.afterReset();
  }

  /** The session ended: logging stops with it, and the device returns to RUNNING. */
  end(): Promise<void> {
    this.log = undefined;
    return this.machine.abandon();
  }
}

/** Whether the sorted, disjoint `ranges` (empty: everything) cover [start, end). */
function covers(ranges: readonly DmaLoggingRange[], start: bigint, end: bigint): boolean {
  if (ranges.length === 0) return true;
  let at = start;
  for (const r of ranges) {
    if (r.iova <= at && at < r.iova + r.length) at = r.iova + r.length;
    if (at >= end) return true;
  }
  return false;
}
