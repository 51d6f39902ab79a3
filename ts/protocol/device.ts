import { Command } from './constants.js';
import { invalid } from './errors.js';
import { need } from './wire.js';

// ---- DEVICE_GET_INFO (4): 16-byte request and reply ----

export interface DeviceInfo {
  /** Request: largest reply accepted (≥ 16). Reply: 16. */
  argsz: number;
  flags: number;
  numRegions: number;
  numIrqs: number;
}

export const DEVICE_INFO_SIZE = 16;

function encodeDeviceInfo(v: DeviceInfo): Buffer {
  const b = Buffer.alloc(DEVICE_INFO_SIZE);
  b.writeUInt32LE(v.argsz, 0);
  b.writeUInt32LE(v.flags, 4);
  b.writeUInt32LE(v.numRegions, 8);
  b.writeUInt32LE(v.numIrqs, 12);
  return b;
}

function decodeDeviceInfo(payload: Buffer, what: string): DeviceInfo {
  const C = Command.DEVICE_GET_INFO;
  need(payload, DEVICE_INFO_SIZE, C, what);
  const argsz = payload.readUInt32LE(0);
  if (argsz < DEVICE_INFO_SIZE) throw invalid(C, `argsz ${argsz} < ${DEVICE_INFO_SIZE}`);
  return {
    argsz,
    flags: payload.readUInt32LE(4),
    numRegions: payload.readUInt32LE(8),
    numIrqs: payload.readUInt32LE(12),
  };
}

/** Only argsz is meaningful in the request; the other fields are written as 0. */
export function encodeDeviceGetInfoRequest(v: { argsz?: number } = {}): Buffer {
  return encodeDeviceInfo({ argsz: v.argsz ?? DEVICE_INFO_SIZE, flags: 0, numRegions: 0, numIrqs: 0 });
}

/** Non-zero request fields other than argsz are returned, not rejected (tolerant decode). */
export function decodeDeviceGetInfoRequest(payload: Buffer): DeviceInfo {
  return decodeDeviceInfo(payload, 'DEVICE_GET_INFO request');
}

export function encodeDeviceGetInfoReply(v: Omit<DeviceInfo, 'argsz'> & { argsz?: number }): Buffer {
  return encodeDeviceInfo({ ...v, argsz: v.argsz ?? DEVICE_INFO_SIZE });
}

export function decodeDeviceGetInfoReply(payload: Buffer): DeviceInfo {
  return decodeDeviceInfo(payload, 'DEVICE_GET_INFO reply');
}

// ---- DEVICE_RESET (13): no payload either way ----

export function encodeDeviceResetRequest(): Buffer {
  return Buffer.alloc(0);
}

export function decodeDeviceResetRequest(payload: Buffer): void {
  if (payload.length !== 0) {
    throw invalid(Command.DEVICE_RESET, `unexpected ${payload.length}-byte payload`);
  }
}
