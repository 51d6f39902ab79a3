import { Command, HEADER_SIZE, MessageType, RegionCapId, RegionInfoFlags } from './constants.js';
import { invalid } from './errors.js';
import { encodeHeader } from './header.js';
import { need, readCount64 } from './wire.js';

// ---- DEVICE_GET_REGION_INFO (5): struct vfio_region_info + capability chain ----

export const REGION_INFO_SIZE = 32;
const CAP_HEADER_SIZE = 8;
const SPARSE_AREA_SIZE = 16;

export interface SparseMmapArea {
  /** Relative to the region's `offset`. */
  offset: bigint;
  size: bigint;
}

export interface SparseMmapCap {
  id: typeof RegionCapId.SPARSE_MMAP;
  areas: SparseMmapArea[];
}

export interface RegionTypeCap {
  id: typeof RegionCapId.TYPE;
  type: number;
  subtype: number;
}

export type RegionCap = SparseMmapCap | RegionTypeCap;

export interface RegionInfoRequest {
  /** Largest reply payload accepted. */
  argsz: number;
  index: number;
}

export interface RegionInfo {
  /** In a reply: the size the full reply needs (32 + caps). */
  argsz: number;
  flags: number;
  index: number;
  capOffset: number;
  size: bigint;
  /** mmap() offset for the region's fd; base of sparse-area offsets. */
  offset: bigint;
  caps: RegionCap[];
  /** Ids of capabilities in the chain that we do not decode (skipped). */
  unknownCapIds: number[];
}

export function encodeRegionInfoRequest(v: { index: number; argsz?: number }): Buffer {
  const b = Buffer.alloc(REGION_INFO_SIZE);
  b.writeUInt32LE(v.argsz ?? REGION_INFO_SIZE, 0);
  b.writeUInt32LE(v.index, 8);
  return b;
}

/** Only argsz and index are read; other request fields are ignored (tolerant decode). */
export function decodeRegionInfoRequest(payload: Buffer): RegionInfoRequest {
  const C = Command.DEVICE_GET_REGION_INFO;
  need(payload, REGION_INFO_SIZE, C, 'GET_REGION_INFO request');
  const argsz = payload.readUInt32LE(0);
  if (argsz < REGION_INFO_SIZE) throw invalid(C, `argsz ${argsz} < ${REGION_INFO_SIZE}`);
  return { argsz, index: payload.readUInt32LE(8) };
}

function capSize(cap: RegionCap): number {
  return cap.id === RegionCapId.SPARSE_MMAP
    ? CAP_HEADER_SIZE + 8 + SPARSE_AREA_SIZE * cap.areas.length
    : CAP_HEADER_SIZE + 8;
}

function writeCap(b: Buffer, off: number, cap: RegionCap, next: number): void {
  b.writeUInt16LE(cap.id, off);
  b.writeUInt16LE(1, off + 2); // version 1 for both cap types
  b.writeUInt32LE(next, off + 4);
  if (cap.id === RegionCapId.SPARSE_MMAP) {
    b.writeUInt32LE(cap.areas.length, off + 8);
    b.writeUInt32LE(0, off + 12);
    cap.areas.forEach((a, i) => {
      b.writeBigUInt64LE(a.offset, off + 16 + i * SPARSE_AREA_SIZE);
      b.writeBigUInt64LE(a.size, off + 24 + i * SPARSE_AREA_SIZE);
    });
  } else {
    b.writeUInt32LE(cap.type, off + 8);
    b.writeUInt32LE(cap.subtype, off + 12);
  }
}

/**
 * Encodes the reply with the argsz two-step: argsz is always the full size (32 + caps). If the
 * request's argsz is smaller, only the 32-byte fixed part goes out (CAPS clear, cap_offset 0)
 * and `complete` is false; like libvfio-user, attach the region fd only when `complete`. CAPS
 * goes with the capabilities, as libvfio-user does: QEMU 10.2's vfio-user client refuses
 * (EINVAL, and the device with it) a reply with CAPS set and a cap_offset below 32, before its
 * retry with the larger argsz.
 */
export function encodeRegionInfoReply(
  info: { flags: number; index: number; size: bigint; offset: bigint; caps?: RegionCap[] },
  requestArgsz: number,
): { payload: Buffer; complete: boolean } {
  const caps = info.caps ?? [];
  const full = caps.reduce((n, c) => n + capSize(c), REGION_INFO_SIZE);
  const complete = requestArgsz >= full;
  const flags = (info.flags & ~RegionInfoFlags.CAPS) | (complete && caps.length ? RegionInfoFlags.CAPS : 0);
  const b = Buffer.alloc(complete ? full : REGION_INFO_SIZE);
  b.writeUInt32LE(full, 0);
  b.writeUInt32LE(flags, 4);
  b.writeUInt32LE(info.index, 8);
  b.writeUInt32LE(complete && caps.length ? REGION_INFO_SIZE : 0, 12);
  b.writeBigUInt64LE(info.size, 16);
  b.writeBigUInt64LE(info.offset, 24);
  if (complete) {
    let off = REGION_INFO_SIZE;
    caps.forEach((cap, i) => {
      const end = off + capSize(cap);
      writeCap(b, off, cap, i + 1 < caps.length ? end : 0);
      off = end;
    });
  }
  return { payload: b, complete };
}

function decodeCap(p: Buffer, off: number, id: number, C: number): RegionCap {
  need(p, off + 16, C, `region capability ${id} at ${off}`);
  if (id === RegionCapId.TYPE) {
    return { id, type: p.readUInt32LE(off + 8), subtype: p.readUInt32LE(off + 12) };
  }
  const n = p.readUInt32LE(off + 8);
  need(p, off + 16 + n * SPARSE_AREA_SIZE, C, `sparse mmap capability with ${n} areas`);
  const areas: SparseMmapArea[] = [];
  for (let i = 0; i < n; i++) {
    const a = off + 16 + i * SPARSE_AREA_SIZE;
    areas.push({ offset: p.readBigUInt64LE(a), size: p.readBigUInt64LE(a + 8) });
  }
  return { id: RegionCapId.SPARSE_MMAP, areas };
}

/**
 * Decodes a reply, walking the capability chain by `next` (offsets from the start of the
 * struct). A truncated reply (argsz > what we got, cap_offset 0) yields no caps.
 */
export function decodeRegionInfoReply(payload: Buffer): RegionInfo {
  const C = Command.DEVICE_GET_REGION_INFO;
  need(payload, REGION_INFO_SIZE, C, 'GET_REGION_INFO reply');
  const info: RegionInfo = {
    argsz: payload.readUInt32LE(0),
    flags: payload.readUInt32LE(4),
    index: payload.readUInt32LE(8),
    capOffset: payload.readUInt32LE(12),
    size: payload.readBigUInt64LE(16),
    offset: payload.readBigUInt64LE(24),
    caps: [],
    unknownCapIds: [],
  };
  const seen = new Set<number>();
  for (let off = info.capOffset; off !== 0; ) {
    if (off < REGION_INFO_SIZE || off + CAP_HEADER_SIZE > payload.length) {
      throw invalid(C, `capability offset ${off} out of range`);
    }
    if (seen.has(off)) throw invalid(C, `capability chain loops at ${off}`);
    seen.add(off);
    const id = payload.readUInt16LE(off);
    if (id === RegionCapId.SPARSE_MMAP || id === RegionCapId.TYPE) {
      info.caps.push(decodeCap(payload, off, id, C));
    } else {
      info.unknownCapIds.push(id);
    }
    off = payload.readUInt32LE(off + 4);
  }
  return info;
}

// ---- DEVICE_GET_REGION_IO_FDS (6) ----

export const REGION_IO_FDS_SIZE = 16;
/** Entry size per the spec. */
export const IO_FD_ENTRY_SIZE = 40;
/** libvfio-user's vfio_user_sub_region_ioeventfd (datamatch at +40). */
export const IO_FD_ENTRY_SIZE_LIBVFIO_USER = 48;

export interface RegionIoFdsRequest {
  argsz: number;
  flags: number;
  index: number;
  count: number;
}

export interface IoFdEntry {
  offset: bigint;
  /** 0 = any access size. */
  size: bigint;
  fdIndex: number;
  type: number;
  flags: number;
  /** datamatch (ioeventfd) or user_data (ioregionfd). */
  datamatch: bigint;
  /** Only in libvfio-user's 48-byte entries. */
  shadowFdIndex?: number;
  shadowOffset?: bigint;
}

export interface RegionIoFdsReply extends RegionIoFdsRequest {
  /** Empty when the reply was truncated (count > 0 with no entries: retry with argsz). */
  entries: IoFdEntry[];
}

function writeIoFdsHeader(b: Buffer, v: RegionIoFdsRequest): void {
  b.writeUInt32LE(v.argsz, 0);
  b.writeUInt32LE(v.flags, 4);
  b.writeUInt32LE(v.index, 8);
  b.writeUInt32LE(v.count, 12);
}

function readIoFdsHeader(p: Buffer, C: number, what: string): RegionIoFdsRequest {
  need(p, REGION_IO_FDS_SIZE, C, what);
  return {
    argsz: p.readUInt32LE(0),
    flags: p.readUInt32LE(4),
    index: p.readUInt32LE(8),
    count: p.readUInt32LE(12),
  };
}

export function encodeRegionIoFdsRequest(v: { index: number; argsz: number }): Buffer {
  const b = Buffer.alloc(REGION_IO_FDS_SIZE);
  writeIoFdsHeader(b, { argsz: v.argsz, flags: 0, index: v.index, count: 0 });
  return b;
}

/** flags and count must be 0 in a request (libvfio-user enforces this too). */
export function decodeRegionIoFdsRequest(payload: Buffer): RegionIoFdsRequest {
  const C = Command.DEVICE_GET_REGION_IO_FDS;
  const r = readIoFdsHeader(payload, C, 'GET_REGION_IO_FDS request');
  if (r.argsz < REGION_IO_FDS_SIZE) throw invalid(C, `argsz ${r.argsz} < ${REGION_IO_FDS_SIZE}`);
  if (r.flags !== 0 || r.count !== 0) throw invalid(C, 'request flags and count must be 0');
  return r;
}

/**
 * Encodes 40-byte entries. argsz = 16 + 40 * n; if the request's argsz is smaller, only the
 * 16-byte header goes out (count still n) and `complete` is false: send no fds then.
 */
export function encodeRegionIoFdsReply(
  v: { index: number; flags?: number; entries: IoFdEntry[] },
  requestArgsz: number,
): { payload: Buffer; complete: boolean } {
  const full = REGION_IO_FDS_SIZE + IO_FD_ENTRY_SIZE * v.entries.length;
  const complete = requestArgsz >= full;
  const b = Buffer.alloc(complete ? full : REGION_IO_FDS_SIZE);
  writeIoFdsHeader(b, { argsz: full, flags: v.flags ?? 0, index: v.index, count: v.entries.length });
  if (complete) {
    v.entries.forEach((e, i) => {
      const o = REGION_IO_FDS_SIZE + i * IO_FD_ENTRY_SIZE;
      b.writeBigUInt64LE(e.offset, o);
      b.writeBigUInt64LE(e.size, o + 8);
      b.writeUInt32LE(e.fdIndex, o + 16);
      b.writeUInt32LE(e.type, o + 20);
      b.writeUInt32LE(e.flags, o + 24);
      b.writeBigUInt64LE(e.datamatch, o + 32);
    });
  }
  return { payload: b, complete };
}

/** Detects the entry stride as (length - 16) / count: 40 (spec) or 48 (libvfio-user). */
export function decodeRegionIoFdsReply(payload: Buffer): RegionIoFdsReply {
  const C = Command.DEVICE_GET_REGION_IO_FDS;
  const h = readIoFdsHeader(payload, C, 'GET_REGION_IO_FDS reply');
  const body = payload.length - REGION_IO_FDS_SIZE;
  const entries: IoFdEntry[] = [];
  if (body === 0) return { ...h, entries };
  const stride = h.count === 0 ? 0 : body / h.count;
  if (stride !== IO_FD_ENTRY_SIZE && stride !== IO_FD_ENTRY_SIZE_LIBVFIO_USER) {
    throw invalid(C, `${body} entry bytes do not fit ${h.count} entries of 40 or 48 bytes`);
  }
  for (let i = 0; i < h.count; i++) {
    const o = REGION_IO_FDS_SIZE + i * stride;
    const e: IoFdEntry = {
      offset: payload.readBigUInt64LE(o),
      size: payload.readBigUInt64LE(o + 8),
      fdIndex: payload.readUInt32LE(o + 16),
      type: payload.readUInt32LE(o + 20),
      flags: payload.readUInt32LE(o + 24),
      datamatch: payload.readBigUInt64LE(o + stride - 8),
    };
    if (stride === IO_FD_ENTRY_SIZE_LIBVFIO_USER) {
      e.shadowFdIndex = payload.readUInt32LE(o + 28);
      e.shadowOffset = payload.readBigUInt64LE(o + 32);
    }
    entries.push(e);
  }
  return { ...h, entries };
}

/**
 * Whether KVM signals an ioeventfd at `at` of `size` bytes (0: any size)
 * for a write of `data` at `offset`: the same offset, that size, and, with
 * a `datamatch`, that little-endian value. Devices and clients both decide
 * with it which writes an ioeventfd takes.
 */
export function ioeventfdMatches(at: number, size: number, datamatch: bigint | undefined, offset: number, data: Uint8Array): boolean {
  if (offset !== at || (size !== 0 && data.length !== size)) return false;
  if (datamatch === undefined) return true;
  let value = 0n;
  for (let i = data.length - 1; i >= 0; i--) value = (value << 8n) | BigInt(data[i]);
  return value === datamatch;
}

// ---- REGION_READ (9) / REGION_WRITE (10) ----

export const REGION_ACCESS_SIZE = 16;
/** Where the data starts in a whole REGION_READ reply message (header + 16). */
export const REGION_READ_REPLY_DATA_OFFSET = HEADER_SIZE + REGION_ACCESS_SIZE;

export interface RegionAccess {
  offset: bigint;
  region: number;
  count: number;
}

export interface RegionData extends RegionAccess {
  data: Buffer;
}

function writeAccess(b: Buffer, a: RegionAccess, at = 0): void {
  b.writeBigUInt64LE(a.offset, at);
  b.writeUInt32LE(a.region, at + 8);
  b.writeUInt32LE(a.count, at + 12);
}

function readAccess(p: Buffer, out: RegionAccess): RegionAccess {
  out.offset = p.readBigUInt64LE(0);
  out.region = p.readUInt32LE(8);
  out.count = p.readUInt32LE(12);
  return out;
}

function checkData(C: number, a: RegionAccess, data: Uint8Array): void {
  if (data.length !== a.count) throw invalid(C, `${data.length} data bytes for count ${a.count}`);
}

function readData(payload: Buffer, C: number, what: string): RegionData {
  need(payload, REGION_ACCESS_SIZE, C, what);
  const a = readAccess(payload, { offset: 0n, region: 0, count: 0 });
  if (payload.length !== REGION_ACCESS_SIZE + a.count) {
    throw invalid(C, `${what}: ${payload.length - REGION_ACCESS_SIZE} data bytes for count ${a.count}`);
  }
  return { ...a, data: payload.subarray(REGION_ACCESS_SIZE) };
}

export function encodeRegionReadRequest(a: RegionAccess): Buffer {
  const b = Buffer.allocUnsafe(REGION_ACCESS_SIZE);
  writeAccess(b, a);
  return b;
}

/** Hot path: pass `out` to decode into a reused object. The request carries no data. */
export function decodeRegionReadRequest(payload: Buffer, out?: RegionAccess): RegionAccess {
  if (payload.length !== REGION_ACCESS_SIZE) {
    throw invalid(Command.REGION_READ, `request must be 16 bytes, got ${payload.length}`);
  }
  return readAccess(payload, out ?? { offset: 0n, region: 0, count: 0 });
}

/** Payload only; prefer encodeRegionReadReplyMessage on the hot path (one allocation). */
export function encodeRegionReadReply(a: RegionAccess, data: Uint8Array): Buffer {
  checkData(Command.REGION_READ, a, data);
  const b = Buffer.allocUnsafe(REGION_ACCESS_SIZE + data.length);
  writeAccess(b, a);
  b.set(data, REGION_ACCESS_SIZE);
  return b;
}

function readReplyMessage(msgId: number, a: RegionAccess, alloc: (n: number) => Buffer): Buffer {
  const size = REGION_READ_REPLY_DATA_OFFSET + a.count;
  const m = alloc(size);
  encodeHeader(m, { msgId, command: Command.REGION_READ, size, flags: MessageType.REPLY, error: 0 });
  writeAccess(m, a, HEADER_SIZE);
  return m;
}

/** The whole reply message (header + payload) in a single allocation. */
export function encodeRegionReadReplyMessage(msgId: number, a: RegionAccess, data: Uint8Array): Buffer {
  checkData(Command.REGION_READ, a, data);
  const m = readReplyMessage(msgId, a, Buffer.allocUnsafe);
  m.set(data, REGION_READ_REPLY_DATA_OFFSET);
  return m;
}

/**
 * The whole reply message with `count` zeroed data bytes at REGION_READ_REPLY_DATA_OFFSET for
 * the device to fill in place (avoids the copy of encodeRegionReadReplyMessage).
 */
export function allocRegionReadReplyMessage(msgId: number, a: RegionAccess): Buffer {
  return readReplyMessage(msgId, a, Buffer.alloc);
}

export function decodeRegionReadReply(payload: Buffer): RegionData {
  return readData(payload, Command.REGION_READ, 'REGION_READ reply');
}

export function encodeRegionWriteRequest(a: { offset: bigint; region: number }, data: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(REGION_ACCESS_SIZE + data.length);
  writeAccess(b, { offset: a.offset, region: a.region, count: data.length });
  b.set(data, REGION_ACCESS_SIZE);
  return b;
}

/** The body must be exactly 16 + count bytes. */
export function decodeRegionWriteRequest(payload: Buffer): RegionData {
  return readData(payload, Command.REGION_WRITE, 'REGION_WRITE request');
}

export function encodeRegionWriteReply(a: RegionAccess): Buffer {
  const b = Buffer.allocUnsafe(REGION_ACCESS_SIZE);
  writeAccess(b, a);
  return b;
}

export function decodeRegionWriteReply(payload: Buffer): RegionAccess {
  if (payload.length !== REGION_ACCESS_SIZE) {
    throw invalid(Command.REGION_WRITE, `reply must be 16 bytes, got ${payload.length}`);
  }
  return readAccess(payload, { offset: 0n, region: 0, count: 0 });
}

// ---- REGION_WRITE_MULTI (15) ----

export const WRITE_MULTI_ENTRY_SIZE = 24;
export const WRITE_MULTI_MAX_DATA = 8;

export type WriteMultiEntry = RegionData;

export function encodeRegionWriteMultiRequest(
  entries: { offset: bigint; region: number; data: Uint8Array }[],
): Buffer {
  const b = Buffer.alloc(8 + WRITE_MULTI_ENTRY_SIZE * entries.length);
  b.writeBigUInt64LE(BigInt(entries.length), 0);
  entries.forEach((e, i) => {
    if (e.data.length > WRITE_MULTI_MAX_DATA) {
      throw invalid(Command.REGION_WRITE_MULTI, `entry ${i} has ${e.data.length} > 8 data bytes`);
    }
    const o = 8 + i * WRITE_MULTI_ENTRY_SIZE;
    writeAccess(b, { offset: e.offset, region: e.region, count: e.data.length }, o);
    b.set(e.data, o + 16);
  });
  return b;
}

/** The body must be exactly 8 + 24 * wr_cnt; each entry's count ≤ 8. */
export function decodeRegionWriteMultiRequest(payload: Buffer): WriteMultiEntry[] {
  const C = Command.REGION_WRITE_MULTI;
  need(payload, 8, C, 'REGION_WRITE_MULTI request');
  const n = readCount64(payload, 0, C, 'wr_cnt');
  if (payload.length !== 8 + n * WRITE_MULTI_ENTRY_SIZE) {
    throw invalid(C, `${payload.length} bytes for wr_cnt ${n}`);
  }
  const entries: WriteMultiEntry[] = [];
  for (let i = 0; i < n; i++) {
    const o = 8 + i * WRITE_MULTI_ENTRY_SIZE;
    const e = payload.subarray(o, o + WRITE_MULTI_ENTRY_SIZE);
    const a = readAccess(e, { offset: 0n, region: 0, count: 0 });
    if (a.count > WRITE_MULTI_MAX_DATA) throw invalid(C, `entry ${i} count ${a.count} > 8`);
    entries.push({ ...a, data: e.subarray(16, 16 + a.count) });
  }
  return entries;
}

export function encodeRegionWriteMultiReply(wrCnt: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(wrCnt), 0);
  return b;
}

export function decodeRegionWriteMultiReply(payload: Buffer): number {
  const C = Command.REGION_WRITE_MULTI;
  if (payload.length !== 8) throw invalid(C, `reply must be 8 bytes, got ${payload.length}`);
  return readCount64(payload, 0, C, 'wr_cnt');
}
