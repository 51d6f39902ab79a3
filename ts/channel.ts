/**
 * A vfio-user channel: one framed connection carrying commands and replies
 * in both directions. It matches replies to the requests this side sent (by
 * msg_id), hands incoming commands to the owner, and owns every fd that
 * arrives until the owner takes it. Used by the server and the client alike.
 */
import { markAsUntransferable } from 'node:worker_threads';
import { closeFds, describeFailure, errnoOf, native, type NativeConnection, type NativeDmaTable, type NativeRegionReads } from './native.js';
import { debugRequested, messageLogger } from './debug.js';
import type { Side } from './protocol/describe.js';
import { ConnectionClosedError, PeerProtocolError, TimeoutError, TooManyRequestsError } from './errors.js';
import {
  commandName,
  decodeHeader,
  encodeErrorReply,
  encodeMessage,
  encodeReply,
  errorReplyErrno,
  HEADER_SIZE,
  HeaderFlags,
  isErrorReply,
  isReply,
  isValidType,
  ProtocolError,
  type Header,
} from './protocol/index.js';

/** A whole message from the peer. */
export interface Message {
  header: Header;
  /** The bytes after the 16-byte header. */
  payload: Buffer;
  /** fds that came with it; whoever keeps one removes it from this array. */
  fds: number[];
  /** The peer attached more fds than this side can receive. */
  fdsTruncated: boolean;
}

export interface ChannelHandlers {
  /** Which end of the connection this channel is; observers name senders by it. */
  side: Side;
  /** This channel is a twin socket (§4), not the main one. */
  twin?: boolean;
  /** A command from the peer. Return `true` if handling finishes later; then call `channel.done()`. */
  onCommand(message: Message): boolean | void;
  /** The peer closed (no error), the stream broke or the peer broke the protocol; not after close(). */
  onClose(error?: Error): void;
}

interface Pending {
  command: number;
  resolve(message: Message): void;
  reject(error: Error): void;
  timer?: NodeJS.Timeout;
}

/** One whole message as it crosses a channel, for a MessageObserver. */
export interface MessageEvent {
  /** One per socket: key per-connection state on it. */
  channel: Channel;
  /** The end that sent the message. */
  from: Side;
  /** The whole message, header included. */
  message: Buffer;
  /** How many fds travel with it. */
  fds: number;
}

/** Sees every message each channel in the process sends or receives; must not throw. */
export type MessageObserver = (event: MessageEvent) => void;

let observer: MessageObserver | undefined = debugRequested() ? messageLogger() : undefined;

/**
 * Installs (or, with `undefined`, removes) the process-wide observer of every
 * message sent and received, by servers and clients alike: `DEBUG=vfio-user`
 * installs one that prints each message decoded to stderr. Install it before
 * connections open: while an observer is set, region reads and DMA_MAP/UNMAP
 * that would be answered natively go through JS so that they are seen too.
 */
export function setMessageObserver(next: MessageObserver | undefined): void {
  observer = next;
}

/** Frames larger than this are refused before negotiation raises the limit. */
export const INITIAL_MAX_FRAME = 1024 * 1024 + 4096;

/** The connection broke: the errno (and what broke, when the errno alone does not say it). */
function lost(errno: number | undefined, reason: string | undefined): ConnectionClosedError {
  return new ConnectionClosedError(`connection lost: ${describeFailure(errno, reason)}`, { errno });
}

/** msg_id is 16 bits. */
const MAX_MSG_ID = 0xffff;

export class Channel {
  private readonly conn: NativeConnection;
  private readonly pending = new Map<number, Pending>();
  private nextId = 0;
  private closedWith: Error | undefined;
  /** Inside onCommand: a reply sent now is held in `held` (see send()). */
  private receiving = false;
  private held: Buffer | undefined;

  constructor(
    fd: number,
    private readonly handlers: ChannelHandlers,
    maxFrame = INITIAL_MAX_FRAME,
  ) {
    // Messages arrive as views of slabs the native layer keeps writing into:
    // a handler that transferred one (postMessage, structuredClone) would
    // detach it under the next message, so each is untransferable (a
    // transfer then copies it).
    let slab: ArrayBuffer | undefined;
    this.conn = new native.NativeConnection(
      fd,
      maxFrame,
      (buffer, offset, length, fds, truncated) => {
        if (buffer !== slab) {
          markAsUntransferable(buffer);
          slab = buffer;
        }
        return this.receive(Buffer.from(buffer, offset, length), fds ?? [], truncated);
      },
      (reason, errno) => {
        const failed = reason !== undefined || errno !== undefined;
        const error = failed ? lost(errno, reason) : new ConnectionClosedError('the peer closed the connection');
        this.ended(error, failed);
      },
    );
  }

  get closed(): boolean {
    return this.closedWith !== undefined;
  }

  get side(): Side {
    return this.handlers.side;
  }

  get twin(): boolean {
    return this.handlers.twin === true;
  }

  private get peer(): Side {
    return this.handlers.side === 'client' ? 'server' : 'client';
  }

  /** REGION_READs answered natively so far. */
  get nativeReads(): number {
    return this.conn.nativeReads;
  }

  /** DMA_MAPs and DMA_UNMAPs answered natively so far. */
  get nativeDma(): number {
    return this.conn.nativeDma;
  }

  setMaxFrame(bytes: number): void {
    this.conn.setMaxFrame(bytes);
  }

  /** Most fds one incoming message may carry (the `max_msg_fds` this side announced); the rest are closed and the message flagged `fdsTruncated`. */
  setMaxFds(count: number): void {
    this.conn.setMaxFds(count);
  }

  /** Most bytes queued for a peer that does not read; past it the peer is cut off (onClose with the reason). */
  setMaxQueued(bytes: number): void {
    this.conn.setMaxQueued(bytes);
  }

  /** Bytes waiting for the peer to read. */
  get queued(): number {
    return this.conn.queued;
  }

  setRegionReads(reads: NativeRegionReads | null): void {
    // Reads answered natively would never reach the observer.
    this.conn.setRegionReads(observer === undefined ? reads : null);
  }

  /** The window table DMA_MAP/UNMAP are applied to natively; null sends them to JS. */
  setDmaTable(table: NativeDmaTable | null): void {
    // Messages answered natively would never reach the observer.
    this.conn.setDmaTable(observer === undefined ? table : null);
  }

  setKeepAlive(keepAlive: boolean): void {
    this.conn.setKeepAlive(keepAlive);
  }

  /** Sends a command and resolves with its reply; an error reply rejects with ProtocolError. */
  request(command: number, payload?: Uint8Array, fds?: number[], timeoutMs?: number): Promise<Message> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    let msgId: number;
    try {
      msgId = this.allocateId();
    } catch (error) {
      return Promise.reject(error);
    }
    return new Promise<Message>((resolve, reject) => {
      const entry: Pending = { command, resolve, reject };
      if (timeoutMs !== undefined && timeoutMs > 0) {
        entry.timer = setTimeout(() => {
          this.pending.delete(msgId);
          reject(new TimeoutError(`${commandName(command)}: no reply within ${timeoutMs} ms`));
        }, timeoutMs);
      }
      this.pending.set(msgId, entry);
      try {
        const message = encodeMessage({ msgId, command }, payload);
        if (observer !== undefined) observer({ channel: this, from: this.handlers.side, message, fds: fds?.length ?? 0 });
        this.conn.send(message, fds);
      } catch (error) {
        this.pending.delete(msgId);
        clearTimeout(entry.timer);
        const errno = errnoOf(error);
        reject(new ConnectionClosedError(`${commandName(command)}: ${describeFailure(errno, (error as Error).message)}`, { errno, command }));
        // A peer cut off for not reading: the native side already let go of it.
        if (this.conn.closed) this.ended(lost(errno, (error as Error).message), true);
      }
    });
  }

  /** Sends a command with No_reply set (a posted write). */
  post(command: number, payload?: Uint8Array): void {
    this.send(encodeMessage({ msgId: this.allocateId(), command, flags: HeaderFlags.NO_REPLY }, payload));
  }

  reply(to: Header, payload?: Uint8Array, fds?: number[]): void {
    this.send(encodeReply(to.msgId, to.command, payload), fds);
  }

  replyError(to: Header, errno: number): void {
    this.send(encodeErrorReply(to.msgId, to.command, errno));
  }

  /**
   * Sends a fully encoded message (the hot path builds its own). A reply sent
   * while a command is being received is held and handed back to the native
   * layer as onMessage's return value, which spares a native call per
   * message; anything else sent meanwhile releases it first, keeping order.
   */
  send(message: Buffer, fds?: number[]): void {
    if (this.closedWith) throw this.closedWith;
    if (observer !== undefined) observer({ channel: this, from: this.handlers.side, message, fds: fds?.length ?? 0 });
    if (this.receiving && this.held === undefined && !fds?.length) {
      this.held = message;
      return;
    }
    this.release();
    this.sendNow(message, fds);
  }

  /** A socket error means the peer is gone: close and report it through onClose, never throw into a handler. */
  private sendNow(message: Buffer, fds?: number[]): void {
    try {
      this.conn.send(message, fds);
    } catch (error) {
      this.conn.close();
      this.ended(lost(errnoOf(error), (error as Error).message), true);
    }
  }

  private release(): void {
    const held = this.held;
    if (held === undefined) return;
    this.held = undefined;
    this.sendNow(held);
  }

  /** A command for which onCommand returned true has been handled. */
  done(): void {
    this.conn.complete();
  }

  /** Closes after queued replies are sent; pending requests reject. */
  close(reason = 'the connection was closed'): void {
    if (this.closedWith) return;
    this.release();
    this.conn.close();
    this.ended(new ConnectionClosedError(reason), false, false);
  }

  private allocateId(): number {
    if (this.pending.size > MAX_MSG_ID) {
      throw new TooManyRequestsError(`all ${MAX_MSG_ID + 1} msg_ids are taken by requests awaiting replies`);
    }
    // msg_ids are ours to choose; skip any still awaiting a reply.
    do this.nextId = (this.nextId + 1) & MAX_MSG_ID;
    while (this.pending.has(this.nextId));
    return this.nextId;
  }

  /** Returns true if the command finishes later, or the reply to send now. */
  private receive(bytes: Buffer, fds: number[], fdsTruncated: boolean): boolean | Buffer {
    let header: Header;
    try {
      if (observer !== undefined) observer({ channel: this, from: this.peer, message: bytes, fds: fds.length });
      header = decodeHeader(bytes);
    } catch (error) {
      // The fds are ours once the native layer hands them over: a throw before they reach a message must not leak them.
      closeFds(fds);
      throw error;
    }
    if (!isValidType(header.flags)) {
      // A message of no known type: the stream cannot be trusted (§2).
      closeFds(fds);
      this.abort(`message type ${header.flags & 0xf} of ${commandName(header.command)} is neither command nor reply`);
      return false;
    }
    const message: Message = { header, payload: bytes.subarray(HEADER_SIZE), fds, fdsTruncated };
    if (isReply(header)) {
      this.settle(message);
      return false;
    }
    let busy = false;
    this.receiving = true;
    try {
      busy = this.handlers.onCommand(message) === true;
    } finally {
      this.receiving = false;
    }
    const held = this.held;
    if (held === undefined || this.closedWith) return busy;
    this.held = undefined;
    if (!busy) return held;
    this.sendNow(held);
    return true;
  }

  private settle(message: Message): void {
    const { header } = message;
    const entry = this.pending.get(header.msgId);
    if (!entry || entry.command !== header.command) {
      // Never answer a reply; one nobody waits for is dropped.
      closeFds(message.fds);
      return;
    }
    if (message.fdsTruncated) {
      // More fds than this side announced it takes: the peer broke the
      // negotiation. Every pending request, this one too, rejects.
      closeFds(message.fds);
      this.abort(`the ${commandName(header.command)} reply carried more fds than max_msg_fds`);
      return;
    }
    this.pending.delete(header.msgId);
    clearTimeout(entry.timer);
    if (isErrorReply(header)) {
      closeFds(message.fds);
      entry.reject(new ProtocolError(errorReplyErrno(header), header.command, 'error reply from the peer'));
    } else {
      entry.resolve(message);
    }
  }

  private abort(reason: string): void {
    this.conn.close();
    this.ended(new PeerProtocolError(reason), true);
  }

  /** `report` says whether onClose hears the error (a clean end of stream is not one). */
  private ended(error: Error, report: boolean, notify = true): void {
    if (this.closedWith) return;
    this.closedWith = error;
    for (const [, entry] of this.pending) {
      clearTimeout(entry.timer);
      // Each waiting request hears why, under its own name.
      const message = `${commandName(entry.command)}: ${error.message}`;
      entry.reject(error instanceof ConnectionClosedError ? new ConnectionClosedError(message, { errno: error.errno, command: entry.command }) : new PeerProtocolError(message));
    }
    this.pending.clear();
    if (notify) this.handlers.onClose(report ? error : undefined);
  }
}
