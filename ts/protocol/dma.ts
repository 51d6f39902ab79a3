import { Command, DmaUnmapFlags } from './constants.js';
import { invalid } from './errors.js';
import { need, readCount64 } from './wire.js';

// ---- DMA_MAP (2): client -> server; the reply has no payload. ----

export interface DmaMapRequest {
  /** Size of the request struct: 32. */
  argsz: number;
  flags: number;
  /** Offset into the attached fd (0 without one). */
  offset: bigint;
  address: bigint;
  size: bigint;
}

export const DMA_MAP_REQUEST_SIZE = 32;

export function encodeDmaMapRequest(
  v: Omit<DmaMapRequest, 'argsz'> & { argsz?: number },
): Buffer {
  const b = Buffer.alloc(DMA_MAP_REQUEST_SIZE);
  b.writeUInt32LE(v.argsz ?? DMA_MAP_REQUEST_SIZE, 0);
  b.writeUInt32LE(v.flags, 4);
  b.writeBigUInt64LE(v.offset, 8);
  b.writeBigUInt64LE(v.address, 16);
  b.writeBigUInt64LE(v.size, 24);
  return b;
}

export function decodeDmaMapRequest(payload: Buffer): DmaMapRequest {
  const C = Command.DMA_MAP;
  need(payload, DMA_MAP_REQUEST_SIZE, C, 'DMA_MAP request');
  const argsz = payload.readUInt32LE(0);
  if (argsz < DMA_MAP_REQUEST_SIZE) throw invalid(C, `argsz ${argsz} < ${DMA_MAP_REQUEST_SIZE}`);
  return {
    argsz,
    flags: payload.readUInt32LE(4),
    offset: payload.readBigUInt64LE(8),
    address: payload.readBigUInt64LE(16),
    size: payload.readBigUInt64LE(24),
  };
}

// ---- DMA_UNMAP (3) ----

/** Legacy (migration v1) dirty bitmap header that follows the request with GET_DIRTY_BITMAP. */
export interface DmaUnmapBitmap {
  pgsize: bigint;
  /** Bitmap size in bytes. */
  size: number;
}

export interface DmaUnmapRequest {
  /** Largest reply payload the client accepts. */
  argsz: number;
  flags: number;
  address: bigint;
  size: bigint;
  bitmap?: DmaUnmapBitmap;
}

export interface DmaUnmapReply extends DmaUnmapRequest {
  /** Bitmap bytes (legacy GET_DIRTY_BITMAP replies only). */
  bitmapData?: Buffer;
}

export const DMA_UNMAP_SIZE = 24;
const BITMAP_HEADER_SIZE = 16;

function writeUnmap(b: Buffer, v: Omit<DmaUnmapRequest, 'argsz'>, argsz: number): void {
  b.writeUInt32LE(argsz, 0);
  b.writeUInt32LE(v.flags, 4);
  b.writeBigUInt64LE(v.address, 8);
  b.writeBigUInt64LE(v.size, 16);
  if (v.bitmap) {
    b.writeBigUInt64LE(v.bitmap.pgsize, 24);
    b.writeBigUInt64LE(BigInt(v.bitmap.size), 32);
  }
}

function checkUnmapFlags(C: number, flags: number, hasBitmap: boolean): void {
  const dirty = (flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== 0;
  if (dirty && (flags & DmaUnmapFlags.ALL) !== 0) throw invalid(C, 'GET_DIRTY_BITMAP with ALL');
  if (dirty !== hasBitmap) throw invalid(C, 'bitmap must be given exactly with GET_DIRTY_BITMAP');
}

/** argsz defaults to 24, or 40 + bitmap bytes for a legacy dirty-bitmap request. */
export function encodeDmaUnmapRequest(
  v: Omit<DmaUnmapRequest, 'argsz'> & { argsz?: number },
): Buffer {
  checkUnmapFlags(Command.DMA_UNMAP, v.flags, v.bitmap !== undefined);
  const len = DMA_UNMAP_SIZE + (v.bitmap ? BITMAP_HEADER_SIZE : 0);
  const b = Buffer.alloc(len);
  writeUnmap(b, v, v.argsz ?? len + (v.bitmap?.size ?? 0));
  return b;
}

export function decodeDmaUnmapRequest(payload: Buffer): DmaUnmapRequest {
  const C = Command.DMA_UNMAP;
  need(payload, DMA_UNMAP_SIZE, C, 'DMA_UNMAP request');
  const argsz = payload.readUInt32LE(0);
  if (argsz < DMA_UNMAP_SIZE) throw invalid(C, `argsz ${argsz} < ${DMA_UNMAP_SIZE}`);
  const req: DmaUnmapRequest = {
    argsz,
    flags: payload.readUInt32LE(4),
    address: payload.readBigUInt64LE(8),
    size: payload.readBigUInt64LE(16),
  };
  const dirty = (req.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== 0;
  if (dirty) {
    need(payload, DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE, C, 'DMA_UNMAP with dirty bitmap');
    req.bitmap = {
      pgsize: payload.readBigUInt64LE(24),
      size: readCount64(payload, 32, C, 'bitmap size'),
    };
  }
  checkUnmapFlags(C, req.flags, dirty);
  if ((req.flags & DmaUnmapFlags.ALL) !== 0 && (req.address !== 0n || req.size !== 0n)) {
    throw invalid(C, 'ALL needs address and size 0');
  }
  return req;
}

/** The reply echoes the request struct (plus bitmap header and bytes in the legacy form). */
export function encodeDmaUnmapReply(v: DmaUnmapReply): Buffer {
  const C = Command.DMA_UNMAP;
  checkUnmapFlags(C, v.flags, v.bitmap !== undefined);
  if (v.bitmap && (v.bitmapData?.length ?? 0) !== v.bitmap.size) {
    throw invalid(C, 'bitmapData length must equal bitmap.size');
  }
  const head = DMA_UNMAP_SIZE + (v.bitmap ? BITMAP_HEADER_SIZE : 0);
  const b = Buffer.alloc(head + (v.bitmap?.size ?? 0));
  writeUnmap(b, v, v.argsz);
  if (v.bitmapData) b.set(v.bitmapData, head);
  return b;
}

export function decodeDmaUnmapReply(payload: Buffer): DmaUnmapReply {
  const C = Command.DMA_UNMAP;
  need(payload, DMA_UNMAP_SIZE, C, 'DMA_UNMAP reply');
  const r: DmaUnmapReply = {
    argsz: payload.readUInt32LE(0),
    flags: payload.readUInt32LE(4),
    address: payload.readBigUInt64LE(8),
    size: payload.readBigUInt64LE(16),
  };
  // The legacy bitmap is only decoded when the server actually sent it.
  if ((r.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== 0 && payload.length > DMA_UNMAP_SIZE) {
    const head = DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE;
    need(payload, head, C, 'DMA_UNMAP reply bitmap header');
    const size = readCount64(payload, 32, C, 'bitmap size');
    need(payload, head + size, C, 'DMA_UNMAP reply bitmap');
    r.bitmap = { pgsize: payload.readBigUInt64LE(24), size };
    r.bitmapData = payload.subarray(head, head + size);
  }
  return r;
}

// ---- DMA_READ (11) / DMA_WRITE (12): server -> client ----

/** address u64, count u64, data at +16. `count` is a byte count of this message: a number. */
export interface DmaAccess {
  address: bigint;
  count: number;
}

export interface DmaData extends DmaAccess {
  data: Buffer;
}

export const DMA_RW_HEADER_SIZE = 16;

function writeDmaAccess(b: Buffer, address: bigint, count: number): void {
  b.writeBigUInt64LE(address, 0);
  b.writeBigUInt64LE(BigInt(count), 8);
}

function withData(address: bigint, data: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(DMA_RW_HEADER_SIZE + data.length);
  writeDmaAccess(b, address, data.length);
  b.set(data, DMA_RW_HEADER_SIZE);
  return b;
}

/** Data of a message whose data length must equal count (standard form: data at +16). */
function decodeWithData(payload: Buffer, C: number, what: string): DmaData {
  need(payload, DMA_RW_HEADER_SIZE, C, what);
  const count = readCount64(payload, 8, C, 'count');
  if (payload.length !== DMA_RW_HEADER_SIZE + count) {
    throw invalid(C, `${what}: ${payload.length - DMA_RW_HEADER_SIZE} data bytes for count ${count}`);
  }
  return { address: payload.readBigUInt64LE(0), count, data: payload.subarray(DMA_RW_HEADER_SIZE) };
}

export function encodeDmaReadRequest(v: DmaAccess): Buffer {
  const b = Buffer.allocUnsafe(DMA_RW_HEADER_SIZE);
  writeDmaAccess(b, v.address, v.count);
  return b;
}

export function decodeDmaReadRequest(payload: Buffer): DmaAccess {
  const C = Command.DMA_READ;
  need(payload, DMA_RW_HEADER_SIZE, C, 'DMA_READ request');
  return { address: payload.readBigUInt64LE(0), count: readCount64(payload, 8, C, 'count') };
}

export function encodeDmaReadReply(address: bigint, data: Uint8Array): Buffer {
  return withData(address, data);
}

/**
 * Standard form: data at +16 with a u64 count. Also accepts QEMU's VFIOUserDMARW layout
 * (u32 count, data at +12), recognised when the length matches 12 + that u32.
 */
export function decodeDmaReadReply(payload: Buffer): DmaData {
  const C = Command.DMA_READ;
  if (payload.length >= DMA_RW_HEADER_SIZE) {
    const count = payload.readBigUInt64LE(8);
    if (BigInt(payload.length) === BigInt(DMA_RW_HEADER_SIZE) + count) {
      return decodeWithData(payload, C, 'DMA_READ reply');
    }
  }
  if (payload.length >= 12 && payload.length === 12 + payload.readUInt32LE(8)) {
    return {
      address: payload.readBigUInt64LE(0),
      count: payload.readUInt32LE(8),
      data: payload.subarray(12),
    };
  }
  return decodeWithData(payload, C, 'DMA_READ reply'); // throws with the reason
}

export function encodeDmaWriteRequest(address: bigint, data: Uint8Array): Buffer {
  return withData(address, data);
}

export function decodeDmaWriteRequest(payload: Buffer): DmaData {
  return decodeWithData(payload, Command.DMA_WRITE, 'DMA_WRITE request');
}

/** The reply libvfio-user expects: address u64 + count u64 (16 bytes). */
export function encodeDmaWriteReply(v: DmaAccess): Buffer {
  return encodeDmaReadRequest(v);
}

/**
 * Accepts the 16-byte form (u64 count, libvfio-user), the spec table's 12-byte form (u32 count)
 * and QEMU's bare header (empty payload; returns undefined as nothing is echoed).
 */
export function decodeDmaWriteReply(payload: Buffer): DmaAccess | undefined {
  const C = Command.DMA_WRITE;
  switch (payload.length) {
    case 0:
      return undefined;
    case 12:
      return { address: payload.readBigUInt64LE(0), count: payload.readUInt32LE(8) };
    case 16:
      return { address: payload.readBigUInt64LE(0), count: readCount64(payload, 8, C, 'count') };
    default:
      throw invalid(C, `DMA_WRITE reply of ${payload.length} bytes`);
  }
}
