import { HEADER_SIZE, HeaderFlags, MessageType } from './constants.js';
import { Errno, invalid } from './errors.js';
import { asBuffer } from './wire.js';

/** The 16-byte message header (§3). `size` includes the header itself. */
export interface Header {
  msgId: number;
  command: number;
  size: number;
  flags: number;
  error: number;
}

/**
 * Decodes a header. Throws EINVAL only when the stream cannot be framed (fewer than 16 bytes,
 * or msg_size < 16); type/flag checks are left to the session (see messageType/isValidType).
 */
export function decodeHeader(buf: Uint8Array, offset = 0): Header {
  const b = asBuffer(buf);
  if (offset < 0 || b.length - offset < HEADER_SIZE) {
    throw invalid(0, `header needs ${HEADER_SIZE} bytes, got ${Math.max(0, b.length - offset)}`);
  }
  const h: Header = {
    msgId: b.readUInt16LE(offset),
    command: b.readUInt16LE(offset + 2),
    size: b.readUInt32LE(offset + 4),
    flags: b.readUInt32LE(offset + 8),
    error: b.readUInt32LE(offset + 12),
  };
  if (h.size < HEADER_SIZE) throw invalid(h.command, `msg_size ${h.size} is smaller than the header`);
  return h;
}

/** Writes `h` into `target` at `offset` (16 bytes). */
export function encodeHeader(target: Buffer, h: Header, offset = 0): void {
  target.writeUInt16LE(h.msgId, offset);
  target.writeUInt16LE(h.command, offset + 2);
  target.writeUInt32LE(h.size, offset + 4);
  target.writeUInt32LE(h.flags, offset + 8);
  target.writeUInt32LE(h.error, offset + 12);
}

/** Allocates header + payload and fills `size`. `flags` and `error` default to 0. */
export function encodeMessage(
  h: { msgId: number; command: number; flags?: number; error?: number },
  payload?: Uint8Array,
): Buffer {
  const len = payload ? payload.length : 0;
  const out = Buffer.allocUnsafe(HEADER_SIZE + len);
  encodeHeader(out, {
    msgId: h.msgId,
    command: h.command,
    size: HEADER_SIZE + len,
    flags: h.flags ?? 0,
    error: h.error ?? 0,
  });
  if (payload) out.set(payload, HEADER_SIZE);
  return out;
}

/** Bits 0-3 of `flags`: 0 command, 1 reply, anything else invalid. */
export function messageType(flags: number): number {
  return flags & HeaderFlags.TYPE_MASK;
}

export function isValidType(flags: number): boolean {
  const t = messageType(flags);
  return t === MessageType.COMMAND || t === MessageType.REPLY;
}

export function isReply(h: Pick<Header, 'flags'>): boolean {
  return messageType(h.flags) === MessageType.REPLY;
}

/** A command that expects a reply (No_reply clear). */
export function wantsReply(h: Pick<Header, 'flags'>): boolean {
  return messageType(h.flags) === MessageType.COMMAND && (h.flags & HeaderFlags.NO_REPLY) === 0;
}

export function isErrorReply(h: Pick<Header, 'flags'>): boolean {
  return isReply(h) && (h.flags & HeaderFlags.ERROR) !== 0;
}

/**
 * The errno an error reply stands for. Peers may send 0 (rust-vmm does for non-EINVAL
 * failures); like libvfio-user we read anything outside 1..4096 as EINVAL.
 */
export function errorReplyErrno(h: Pick<Header, 'error'>): number {
  return h.error >= 1 && h.error <= 4096 ? h.error : Errno.EINVAL;
}

/** An error reply: the bare 16-byte header, type reply + ERROR, never a payload. */
export function encodeErrorReply(msgId: number, command: number, errno: number): Buffer {
  return encodeMessage({
    msgId,
    command,
    flags: MessageType.REPLY | HeaderFlags.ERROR,
    error: errno,
  });
}

/** A successful reply header with an optional payload. */
export function encodeReply(msgId: number, command: number, payload?: Uint8Array): Buffer {
  return encodeMessage({ msgId, command, flags: MessageType.REPLY }, payload);
}

