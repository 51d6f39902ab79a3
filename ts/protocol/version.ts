import { Command } from './constants.js';
import { ProtocolError, Errno, invalid } from './errors.js';
import { asBuffer, need } from './wire.js';

/**
 * Negotiated capabilities (§4), camelCase for the JSON's snake_case keys.
 * `pgsizes` is a number: JSON carries it as a number, JSON.parse/stringify cannot handle bigint,
 * and every real page-size mask (4 KiB | 2 MiB | 1 GiB ...) is far below 2^53.
 */
export interface Capabilities {
  maxMsgFds: number;
  maxDataXferSize: number;
  maxDmaMaps: number;
  pgsizes: number;
  twinSocket: { supported: boolean; fdIndex?: number };
  writeMultiple: boolean;
  /** Legacy migration-v1 key; QEMU still sends it. */
  migration?: { pgsize: number; maxBitmapSize?: number };
}

/** Defaults for absent keys (spec values; QEMU alone assumes max_msg_fds 8). */
export const DEFAULT_CAPABILITIES: Readonly<Capabilities> = Object.freeze({
  maxMsgFds: 1,
  maxDataXferSize: 1024 * 1024,
  maxDmaMaps: 65535,
  pgsizes: 4096,
  twinSocket: Object.freeze({ supported: false }),
  writeMultiple: false,
});

export interface VersionNumber {
  major: number;
  minor: number;
}

export interface Version extends VersionNumber {
  /** Defaults filled in for every absent key. */
  capabilities: Capabilities;
  /** snake_case keys the peer actually sent inside "capabilities" (known ones only). */
  presentKeys: string[];
  /** Keys we do not know, as dotted paths, e.g. "capabilities.max_fds". */
  unknownKeys: string[];
}

const C = Command.VERSION;

const KNOWN_CAP_KEYS = [
  'max_msg_fds',
  'max_data_xfer_size',
  'max_dma_maps',
  'pgsizes',
  'twin_socket',
  'write_multiple',
  'migration',
] as const;

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function uint(v: unknown, key: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw invalid(C, `${key} must be a non-negative integer`);
  }
  return v;
}

function bool(v: unknown, key: string): boolean {
  if (typeof v !== 'boolean') throw invalid(C, `${key} must be a boolean`);
  return v;
}

function object(v: unknown, key: string): Json {
  if (!isObject(v)) throw invalid(C, `${key} must be an object`);
  return v;
}

function unknownIn(obj: Json, known: readonly string[], prefix: string, out: string[]): void {
  for (const k of Object.keys(obj)) if (!known.includes(k)) out.push(prefix + k);
}

/** The JSON text: up to the first NUL; a missing NUL is tolerated. */
function jsonText(payload: Buffer): string {
  const body = payload.subarray(4);
  const nul = body.indexOf(0);
  const raw = nul < 0 ? body : body.subarray(0, nul);
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(raw);
  } catch {
    throw invalid(C, 'capabilities are not valid UTF-8');
  }
}

/** Decodes a VERSION payload (request or reply), tolerating unknown and legacy keys. */
export function decodeVersion(payload: Uint8Array): Version {
  const p = asBuffer(payload);
  need(p, 4, C, 'VERSION payload');
  const text = jsonText(p).trim();
  const caps: Capabilities = { ...DEFAULT_CAPABILITIES, twinSocket: { supported: false } };
  const version: Version = {
    major: p.readUInt16LE(0),
    minor: p.readUInt16LE(2),
    capabilities: caps,
    presentKeys: [],
    unknownKeys: [],
  };
  if (text === '') return version;

  let root: unknown;
  try {
    root = JSON.parse(text);
  } catch {
    throw invalid(C, 'capabilities are not valid JSON');
  }
  const top = object(root, 'JSON root');
  unknownIn(top, ['capabilities'], '', version.unknownKeys);
  if (top.capabilities === undefined) return version;
  const c = object(top.capabilities, 'capabilities');
  unknownIn(c, KNOWN_CAP_KEYS, 'capabilities.', version.unknownKeys);
  version.presentKeys = Object.keys(c).filter((k) => (KNOWN_CAP_KEYS as readonly string[]).includes(k));

  if ('max_msg_fds' in c) caps.maxMsgFds = uint(c.max_msg_fds, 'max_msg_fds');
  if ('max_data_xfer_size' in c) caps.maxDataXferSize = uint(c.max_data_xfer_size, 'max_data_xfer_size');
  if ('max_dma_maps' in c) caps.maxDmaMaps = uint(c.max_dma_maps, 'max_dma_maps');
  if ('pgsizes' in c) caps.pgsizes = uint(c.pgsizes, 'pgsizes');
  if ('write_multiple' in c) caps.writeMultiple = bool(c.write_multiple, 'write_multiple');
  if ('twin_socket' in c) {
    const t = object(c.twin_socket, 'twin_socket');
    unknownIn(t, ['supported', 'fd_index'], 'capabilities.twin_socket.', version.unknownKeys);
    if ('supported' in t) caps.twinSocket.supported = bool(t.supported, 'twin_socket.supported');
    if ('fd_index' in t) caps.twinSocket.fdIndex = uint(t.fd_index, 'twin_socket.fd_index');
  }
  if ('migration' in c) {
    const m = object(c.migration, 'migration');
    unknownIn(m, ['pgsize', 'max_bitmap_size'], 'capabilities.migration.', version.unknownKeys);
    if (!('pgsize' in m)) throw invalid(C, 'migration.pgsize is missing');
    caps.migration = { pgsize: uint(m.pgsize, 'migration.pgsize') };
    if ('max_bitmap_size' in m) {
      caps.migration.maxBitmapSize = uint(m.max_bitmap_size, 'migration.max_bitmap_size');
    }
  }
  return version;
}

/** JSON object for the capabilities given, in the digest's key order, snake_case. */
function capabilitiesJson(caps: Partial<Capabilities>): Json {
  const out: Json = {};
  if (caps.maxMsgFds !== undefined) out.max_msg_fds = uint(caps.maxMsgFds, 'max_msg_fds');
  if (caps.maxDataXferSize !== undefined) {
    out.max_data_xfer_size = uint(caps.maxDataXferSize, 'max_data_xfer_size');
  }
  if (caps.maxDmaMaps !== undefined) out.max_dma_maps = uint(caps.maxDmaMaps, 'max_dma_maps');
  if (caps.pgsizes !== undefined) out.pgsizes = uint(caps.pgsizes, 'pgsizes');
  if (caps.twinSocket !== undefined) {
    const t: Json = { supported: bool(caps.twinSocket.supported, 'twin_socket.supported') };
    if (caps.twinSocket.fdIndex !== undefined) {
      t.fd_index = uint(caps.twinSocket.fdIndex, 'twin_socket.fd_index');
    }
    out.twin_socket = t;
  }
  if (caps.writeMultiple !== undefined) out.write_multiple = bool(caps.writeMultiple, 'write_multiple');
  if (caps.migration !== undefined) {
    const m: Json = { pgsize: uint(caps.migration.pgsize, 'migration.pgsize') };
    if (caps.migration.maxBitmapSize !== undefined) {
      m.max_bitmap_size = uint(caps.migration.maxBitmapSize, 'migration.max_bitmap_size');
    }
    out.migration = m;
  }
  return out;
}

/**
 * Encodes a VERSION payload. Without `capabilities` only major/minor are written (4 bytes);
 * with them, `{"capabilities":{...}}` plus a terminating NUL, emitting only the keys given.
 */
export function encodeVersion(v: {
  major: number;
  minor: number;
  capabilities?: Partial<Capabilities>;
}): Buffer {
  const json =
    v.capabilities === undefined
      ? undefined
      : Buffer.from(JSON.stringify({ capabilities: capabilitiesJson(v.capabilities) }), 'utf8');
  const out = Buffer.alloc(4 + (json ? json.length + 1 : 0));
  out.writeUInt16LE(v.major, 0);
  out.writeUInt16LE(v.minor, 2);
  if (json) out.set(json, 4); // the last byte stays 0: the NUL
  return out;
}

/** The version to reply with: major must be 0 on both sides; minor = min(peer, ours). */
export function negotiateVersion(peer: VersionNumber, ours: VersionNumber): VersionNumber {
  if (ours.major !== 0) throw new ProtocolError(Errno.EINVAL, C, `we speak major ${ours.major}`);
  if (peer.major !== 0) {
    throw new ProtocolError(Errno.EINVAL, C, `unsupported major version ${peer.major}`);
  }
  return { major: 0, minor: Math.min(peer.minor, ours.minor) };
}
