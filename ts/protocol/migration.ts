import { Command } from './constants.js';
import { invalid } from './errors.js';
import { need } from './wire.js';

// ---- MIG_DATA_READ (17) / MIG_DATA_WRITE (18): argsz u32, size u32, data ----

export const MIG_DATA_SIZE = 8;

export interface MigDataReadRequest {
  /** Largest reply payload accepted: must be ≥ 8 + size. */
  argsz: number;
  /** Bytes requested. */
  size: number;
}

export interface MigData {
  argsz: number;
  /** Bytes carried; in a READ reply, fewer than requested means end of data. */
  size: number;
  data: Buffer;
}

export function encodeMigDataReadRequest(v: { size: number; argsz?: number }): Buffer {
  const b = Buffer.alloc(MIG_DATA_SIZE);
  b.writeUInt32LE(v.argsz ?? MIG_DATA_SIZE + v.size, 0);
  b.writeUInt32LE(v.size, 4);
  return b;
}

export function decodeMigDataReadRequest(payload: Buffer): MigDataReadRequest {
  const C = Command.MIG_DATA_READ;
  need(payload, MIG_DATA_SIZE, C, 'MIG_DATA_READ request');
  const argsz = payload.readUInt32LE(0);
  const size = payload.readUInt32LE(4);
  if (argsz < MIG_DATA_SIZE + size) throw invalid(C, `argsz ${argsz} < 8 + size ${size}`);
  return { argsz, size };
}

function encodeMigData(data: Uint8Array, argsz?: number, padTo = data.length): Buffer {
  const b = Buffer.alloc(MIG_DATA_SIZE + Math.max(data.length, padTo));
  b.writeUInt32LE(argsz ?? b.length, 0);
  b.writeUInt32LE(data.length, 4);
  b.set(data, MIG_DATA_SIZE);
  return b;
}

/** `size` comes from `size`; trailing bytes are ignored (libvfio-user over-allocates replies). */
function decodeMigData(payload: Buffer, C: number, what: string): MigData {
  need(payload, MIG_DATA_SIZE, C, what);
  const size = payload.readUInt32LE(4);
  need(payload, MIG_DATA_SIZE + size, C, `${what} with size ${size}`);
  return { argsz: payload.readUInt32LE(0), size, data: payload.subarray(MIG_DATA_SIZE, MIG_DATA_SIZE + size) };
}

/**
 * argsz defaults to the reply's length. `requested` (the request's `size`)
 * pads the data with zeros to that length, as libvfio-user's server does:
 * libvfio-user's client reads the reply at the size it asked for and fails
 * with ECONNRESET on a shorter one. `size` still says how much is data.
 */
export function encodeMigDataReadReply(data: Uint8Array, argsz?: number, requested?: number): Buffer {
  return encodeMigData(data, argsz, requested);
}

export function decodeMigDataReadReply(payload: Buffer): MigData {
  return decodeMigData(payload, Command.MIG_DATA_READ, 'MIG_DATA_READ reply');
}

export function encodeMigDataWriteRequest(data: Uint8Array, argsz?: number): Buffer {
  return encodeMigData(data, argsz);
}

/** As libvfio-user: `argsz` must cover the request with its data. */
export function decodeMigDataWriteRequest(payload: Buffer): MigData {
  const C = Command.MIG_DATA_WRITE;
  const req = decodeMigData(payload, C, 'MIG_DATA_WRITE request');
  if (req.argsz < MIG_DATA_SIZE + req.size) throw invalid(C, `argsz ${req.argsz} < 8 + size ${req.size}`);
  return req;
}

/** The WRITE reply has no payload. */
export function encodeMigDataWriteReply(): Buffer {
  return Buffer.alloc(0);
}
