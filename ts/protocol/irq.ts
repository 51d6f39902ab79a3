import { Command, IrqIndex, SetIrqsFlags } from './constants.js';
import { Errno, invalid } from './errors.js';
import { need } from './wire.js';

// ---- DEVICE_GET_IRQ_INFO (7): 16-byte request and reply ----

export const IRQ_INFO_SIZE = 16;

export interface IrqInfo {
  argsz: number;
  flags: number;
  index: number;
  count: number;
}

function encodeIrqInfo(v: IrqInfo): Buffer {
  const b = Buffer.alloc(IRQ_INFO_SIZE);
  b.writeUInt32LE(v.argsz, 0);
  b.writeUInt32LE(v.flags, 4);
  b.writeUInt32LE(v.index, 8);
  b.writeUInt32LE(v.count, 12);
  return b;
}

function decodeIrqInfo(payload: Buffer, what: string): IrqInfo {
  const C = Command.DEVICE_GET_IRQ_INFO;
  need(payload, IRQ_INFO_SIZE, C, what);
  const argsz = payload.readUInt32LE(0);
  if (argsz < IRQ_INFO_SIZE) throw invalid(C, `argsz ${argsz} < ${IRQ_INFO_SIZE}`);
  return {
    argsz,
    flags: payload.readUInt32LE(4),
    index: payload.readUInt32LE(8),
    count: payload.readUInt32LE(12),
  };
}

/** flags and count are written as 0 (the spec table shows flags, but requests carry zeros). */
export function encodeIrqInfoRequest(v: { index: number; argsz?: number }): Buffer {
  return encodeIrqInfo({ argsz: v.argsz ?? IRQ_INFO_SIZE, flags: 0, index: v.index, count: 0 });
}

/** Non-zero flags/count in a request are returned, not rejected (tolerant decode). */
export function decodeIrqInfoRequest(payload: Buffer): IrqInfo {
  return decodeIrqInfo(payload, 'GET_IRQ_INFO request');
}

export function encodeIrqInfoReply(v: Omit<IrqInfo, 'argsz'> & { argsz?: number }): Buffer {
  return encodeIrqInfo({ ...v, argsz: v.argsz ?? IRQ_INFO_SIZE });
}

export function decodeIrqInfoReply(payload: Buffer): IrqInfo {
  return decodeIrqInfo(payload, 'GET_IRQ_INFO reply');
}

// ---- DEVICE_SET_IRQS (8): 20 bytes + bool data; the reply has no payload ----

export const SET_IRQS_SIZE = 20;

export interface SetIrqs {
  /** Size of the request including data. */
  argsz: number;
  flags: number;
  index: number;
  start: number;
  count: number;
  /** DATA_BOOL only: one entry per vector. */
  bools?: boolean[];
}

const KNOWN_SET_IRQS_BITS = SetIrqsFlags.DATA_TYPE_MASK | SetIrqsFlags.ACTION_TYPE_MASK;

function isSingleBit(v: number): boolean {
  return v !== 0 && (v & (v - 1)) === 0;
}

function checkSetIrqsFlags(flags: number): string | undefined {
  if ((flags & ~KNOWN_SET_IRQS_BITS) !== 0) return `unknown flag bits 0x${flags.toString(16)}`;
  if (!isSingleBit(flags & SetIrqsFlags.DATA_TYPE_MASK)) return 'need exactly one DATA flag';
  if (!isSingleBit(flags & SetIrqsFlags.ACTION_TYPE_MASK)) return 'need exactly one ACTION flag';
  return undefined;
}

/** argsz defaults to 20 + the bool bytes. `bools` is required exactly with DATA_BOOL. */
export function encodeSetIrqsRequest(v: Omit<SetIrqs, 'argsz'> & { argsz?: number }): Buffer {
  const C = Command.DEVICE_SET_IRQS;
  const bad = checkSetIrqsFlags(v.flags);
  if (bad) throw invalid(C, bad);
  const isBool = (v.flags & SetIrqsFlags.DATA_BOOL) !== 0;
  if (isBool !== (v.bools !== undefined) || (v.bools && v.bools.length !== v.count)) {
    throw invalid(C, 'DATA_BOOL needs exactly count bools, other DATA types none');
  }
  const len = SET_IRQS_SIZE + (v.bools?.length ?? 0);
  const b = Buffer.alloc(len);
  b.writeUInt32LE(v.argsz ?? len, 0);
  b.writeUInt32LE(v.flags, 4);
  b.writeUInt32LE(v.index, 8);
  b.writeUInt32LE(v.start, 12);
  b.writeUInt32LE(v.count, 16);
  v.bools?.forEach((on, i) => b.writeUInt8(on ? 1 : 0, SET_IRQS_SIZE + i));
  return b;
}

/**
 * Checks exactly one DATA and one ACTION bit (no unknown bits) and, for DATA_BOOL, exactly
 * `count` data bytes. Trailing bytes after other DATA types are ignored. fd-related rules need
 * the fds: see validateSetIrqs.
 */
export function decodeSetIrqsRequest(payload: Buffer): SetIrqs {
  const C = Command.DEVICE_SET_IRQS;
  need(payload, SET_IRQS_SIZE, C, 'SET_IRQS request');
  const argsz = payload.readUInt32LE(0);
  if (argsz < SET_IRQS_SIZE) throw invalid(C, `argsz ${argsz} < ${SET_IRQS_SIZE}`);
  const req: SetIrqs = {
    argsz,
    flags: payload.readUInt32LE(4),
    index: payload.readUInt32LE(8),
    start: payload.readUInt32LE(12),
    count: payload.readUInt32LE(16),
  };
  const bad = checkSetIrqsFlags(req.flags);
  if (bad) throw invalid(C, bad);
  if ((req.flags & SetIrqsFlags.DATA_BOOL) !== 0) {
    const n = payload.length - SET_IRQS_SIZE;
    if (n !== req.count) throw invalid(C, `DATA_BOOL with ${n} bytes for count ${req.count}`);
    req.bools = Array.from(payload.subarray(SET_IRQS_SIZE), (x) => x !== 0);
  }
  return req;
}

/**
 * The §6.8 rules that need context: `irqCount` = vectors of `req.index` (the caller checks the
 * index itself), `fdCount` = fds attached to the message. Returns 0 or an errno (EINVAL).
 */
export function validateSetIrqs(
  req: Pick<SetIrqs, 'flags' | 'index' | 'start' | 'count'>,
  fdCount: number,
  irqCount: number,
): number {
  if (checkSetIrqsFlags(req.flags)) return Errno.EINVAL;
  const data = req.flags & SetIrqsFlags.DATA_TYPE_MASK;
  const action = req.flags & SetIrqsFlags.ACTION_TYPE_MASK;
  if (req.count === 0) {
    // The only zero-count form: disable every vector of the index.
    const disableAll =
      req.start === 0 && data === SetIrqsFlags.DATA_NONE && action === SetIrqsFlags.ACTION_TRIGGER;
    if (!disableAll) return Errno.EINVAL;
  } else if (req.start >= irqCount || req.start + req.count > irqCount) {
    return Errno.EINVAL;
  }
  if (req.index === IrqIndex.ERR || req.index === IrqIndex.REQ) {
    if (action !== SetIrqsFlags.ACTION_TRIGGER || req.count > 1) return Errno.EINVAL;
  }
  if (fdCount > 0) {
    if (data !== SetIrqsFlags.DATA_EVENTFD) return Errno.EINVAL;
    if (fdCount !== req.count) return Errno.EINVAL; // 0 fds (de-assign) or exactly count
  }
  return 0;
}
