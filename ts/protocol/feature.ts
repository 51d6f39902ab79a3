import { Command, DeviceFeatureFlags } from './constants.js';
import { invalid } from './errors.js';
import { need } from './wire.js';

const C = Command.DEVICE_FEATURE;

// ---- DEVICE_FEATURE (16): argsz u32, flags u32, feature data ----

export const DEVICE_FEATURE_SIZE = 8;

export interface DeviceFeature {
  /** Request: largest reply accepted. Reply: size of the reply payload. */
  argsz: number;
  /** Feature index (low 16 bits) | GET/SET/PROBE. */
  flags: number;
  data: Buffer;
}

export function featureIndex(flags: number): number {
  return flags & DeviceFeatureFlags.MASK;
}

const KNOWN_FEATURE_BITS =
  DeviceFeatureFlags.MASK | DeviceFeatureFlags.GET | DeviceFeatureFlags.SET | DeviceFeatureFlags.PROBE;

function checkFeatureFlags(flags: number): void {
  if ((flags & ~KNOWN_FEATURE_BITS) !== 0) throw invalid(C, `unknown flag bits 0x${flags.toString(16)}`);
  const getAndSet = DeviceFeatureFlags.GET | DeviceFeatureFlags.SET;
  if ((flags & getAndSet) === getAndSet && (flags & DeviceFeatureFlags.PROBE) === 0) {
    throw invalid(C, 'GET and SET together need PROBE');
  }
}

function encodeFeature(v: { argsz?: number; flags: number; data?: Uint8Array }): Buffer {
  checkFeatureFlags(v.flags);
  const len = DEVICE_FEATURE_SIZE + (v.data?.length ?? 0);
  const b = Buffer.alloc(len);
  b.writeUInt32LE(v.argsz ?? len, 0);
  b.writeUInt32LE(v.flags, 4);
  if (v.data) b.set(v.data, DEVICE_FEATURE_SIZE);
  return b;
}

function decodeFeature(payload: Buffer, what: string): DeviceFeature {
  need(payload, DEVICE_FEATURE_SIZE, C, what);
  const flags = payload.readUInt32LE(4);
  checkFeatureFlags(flags);
  return { argsz: payload.readUInt32LE(0), flags, data: payload.subarray(DEVICE_FEATURE_SIZE) };
}

/** argsz defaults to the request size; for GET pass the largest reply you accept. */
export function encodeDeviceFeatureRequest(v: { argsz?: number; flags: number; data?: Uint8Array }): Buffer {
  return encodeFeature(v);
}

export function decodeDeviceFeatureRequest(payload: Buffer): DeviceFeature {
  const req = decodeFeature(payload, 'DEVICE_FEATURE request');
  if (req.argsz < DEVICE_FEATURE_SIZE) throw invalid(C, `argsz ${req.argsz} < ${DEVICE_FEATURE_SIZE}`);
  return req;
}

/** SET/PROBE replies echo the request; GET replies append data. argsz defaults to the size. */
export function encodeDeviceFeatureReply(v: { argsz?: number; flags: number; data?: Uint8Array }): Buffer {
  return encodeFeature(v);
}

export function decodeDeviceFeatureReply(payload: Buffer): DeviceFeature {
  return decodeFeature(payload, 'DEVICE_FEATURE reply');
}

// ---- Feature data helpers (the bytes after argsz/flags) ----

/** MIGRATION (1), GET reply data: flags u64 (MigrationFlags bits). */
export function encodeMigrationFeature(v: { flags: bigint }): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v.flags, 0);
  return b;
}

export function decodeMigrationFeature(data: Buffer): { flags: bigint } {
  need(data, 8, C, 'MIGRATION feature data');
  return { flags: data.readBigUInt64LE(0) };
}

/** MIG_DEVICE_STATE (2): device_state u32, data_fd u32 (unused in vfio-user). */
export interface MigDeviceState {
  /** A MigrationState value; not range-checked here (the session answers bad states). */
  deviceState: number;
  dataFd: number;
}

export function encodeMigDeviceState(v: { deviceState: number; dataFd?: number }): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(v.deviceState, 0);
  // data_fd is unused over vfio-user; kernel VFIO uses -1 (0xffffffff) for "no fd".
  b.writeUInt32LE(v.dataFd ?? 0, 4);
  return b;
}

export function decodeMigDeviceState(data: Buffer): MigDeviceState {
  need(data, 8, C, 'MIG_DEVICE_STATE feature data');
  return { deviceState: data.readUInt32LE(0), dataFd: data.readUInt32LE(4) };
}

export interface DmaLoggingRange {
  iova: bigint;
  length: bigint;
}

/** DMA_LOGGING_START (6): page_size u64, num_ranges u32, reserved u32, ranges (0 = everything). */
export interface DmaLoggingStart {
  pageSize: bigint;
  ranges: DmaLoggingRange[];
}

export function encodeDmaLoggingStart(v: DmaLoggingStart): Buffer {
  const b = Buffer.alloc(16 + 16 * v.ranges.length);
  b.writeBigUInt64LE(v.pageSize, 0);
  b.writeUInt32LE(v.ranges.length, 8);
  v.ranges.forEach((r, i) => {
    b.writeBigUInt64LE(r.iova, 16 + 16 * i);
    b.writeBigUInt64LE(r.length, 24 + 16 * i);
  });
  return b;
}

export function decodeDmaLoggingStart(data: Buffer): DmaLoggingStart {
  need(data, 16, C, 'DMA_LOGGING_START data');
  const n = data.readUInt32LE(8);
  need(data, 16 + 16 * n, C, `DMA_LOGGING_START with ${n} ranges`);
  const ranges: DmaLoggingRange[] = [];
  for (let i = 0; i < n; i++) {
    ranges.push({ iova: data.readBigUInt64LE(16 + 16 * i), length: data.readBigUInt64LE(24 + 16 * i) });
  }
  return { pageSize: data.readBigUInt64LE(0), ranges };
}

/** DMA_LOGGING_STOP (7) carries no data. */
export function encodeDmaLoggingStop(): Buffer {
  return Buffer.alloc(0);
}

/** DMA_LOGGING_REPORT (8) request data: iova, length, page_size (u64 each). */
export interface DmaLoggingReport {
  iova: bigint;
  length: bigint;
  pageSize: bigint;
}

/** Reply data: the request's 24 bytes, then the bitmap (u64 words, page n = word n/64 bit n%64). */
export interface DmaLoggingReportReply extends DmaLoggingReport {
  bitmap: Buffer;
}

export const DMA_LOGGING_REPORT_SIZE = 24;

function writeReport(b: Buffer, v: DmaLoggingReport): void {
  b.writeBigUInt64LE(v.iova, 0);
  b.writeBigUInt64LE(v.length, 8);
  b.writeBigUInt64LE(v.pageSize, 16);
}

function readReport(data: Buffer, what: string): DmaLoggingReport {
  need(data, DMA_LOGGING_REPORT_SIZE, C, what);
  return { iova: data.readBigUInt64LE(0), length: data.readBigUInt64LE(8), pageSize: data.readBigUInt64LE(16) };
}

/** Bitmap bytes for a report: one bit per page, rounded up to whole u64 words. */
export function dmaLoggingBitmapSize(length: bigint, pageSize: bigint): number {
  if (pageSize <= 0n || (pageSize & (pageSize - 1n)) !== 0n) {
    throw invalid(C, `page size ${pageSize} is not a power of two`);
  }
  const pages = (length + pageSize - 1n) / pageSize;
  return Number(((pages + 63n) / 64n) * 8n);
}

export function encodeDmaLoggingReportRequest(v: DmaLoggingReport): Buffer {
  const b = Buffer.alloc(DMA_LOGGING_REPORT_SIZE);
  writeReport(b, v);
  return b;
}

export function decodeDmaLoggingReportRequest(data: Buffer): DmaLoggingReport {
  return readReport(data, 'DMA_LOGGING_REPORT data');
}

export function encodeDmaLoggingReportReply(v: DmaLoggingReportReply): Buffer {
  if (v.bitmap.length % 8 !== 0) throw invalid(C, 'bitmap must be whole u64 words');
  const b = Buffer.alloc(DMA_LOGGING_REPORT_SIZE + v.bitmap.length);
  writeReport(b, v);
  b.set(v.bitmap, DMA_LOGGING_REPORT_SIZE);
  return b;
}

export function decodeDmaLoggingReportReply(data: Buffer): DmaLoggingReportReply {
  const r = readReport(data, 'DMA_LOGGING_REPORT reply data');
  const bitmap = data.subarray(DMA_LOGGING_REPORT_SIZE);
  if (bitmap.length % 8 !== 0) throw invalid(C, `bitmap of ${bitmap.length} bytes is not whole u64 words`);
  return { ...r, bitmap };
}
