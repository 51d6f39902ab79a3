/**
 * `VfioUserServer`: serves one device on a UNIX socket, one client at a
 * time, in the manner of Node's `net.Server`. Further clients wait in the
 * listen backlog until the current one leaves; the device state survives a
 * client's departure (its DMA maps and interrupt fds do not).
 */
import { EventEmitter } from 'node:events';
import { native, type PeerCredentials } from '../native.js';
import { UsageError, VfioUserError } from '../errors.js';
import { errnoName } from '../protocol/index.js';
import { contractOf, type VfioUserDevice } from '../device.js';
import type { PciDevice } from '../pci/device.js';
import { contextOf } from '../boundary.js';
import { ServerSession, type SessionOptions } from './session.js';

/** How long to wait before accepting again after a failed accept. */
const ACCEPT_RETRY_MS = 100;
/** The longest `requestTimeoutMs`: the longest delay setTimeout honours (2^31 - 1 ms). */
export const MAX_REQUEST_TIMEOUT_MS = 0x7fffffff;

export interface ServerOptions {
  /**
   * Deadline, in ms, for one command's handler. Past it the client gets
   * ETIMEDOUT, `requestTimeout` is emitted and the client's next command
   * runs while the late handler may still be running; what it produces is
   * dropped. Off by default: a device that may legitimately take long (a
   * reset, a migration save) would otherwise see commands overtake it.
   */
  requestTimeoutMs?: number;
  /**
   * Most bytes of replies (and server requests) queued for a client that
   * does not read them; past it the client is cut off ('disconnect' with the
   * reason). 8 MiB by default: room for several 1 MiB replies.
   */
  maxQueuedBytes?: number;
  /** Accept only these peers; every process that can open the socket by default. */
  allowedPeers?: AllowedPeers;
}

export interface ListenOptions {
  /** File mode of the socket; owner-only unless asked otherwise. */
  mode?: number;
}

/**
 * Which connecting processes the server accepts, by the credentials the
 * kernel recorded for the connection (SO_PEERCRED): a peer is accepted
 * when each given list contains its value. Others are closed at accept,
 * before VERSION, and reported as 'connectionRefused'. This narrows who may
 * connect beyond the socket file's mode; see docs/security.md.
 */
export interface AllowedPeers {
  uids?: readonly number[];
  gids?: readonly number[];
  pids?: readonly number[];
}

export interface VfioUserServerEvents {
  /** Listening on a socket path, or "fd N" for an adopted socket. */
  listening: [where: string];
  /** A client connected (negotiation follows). */
  connection: [session: ServerSession];
  /** The client left; `error` says why when it was not a clean disconnect. */
  disconnect: [session: ServerSession, error?: Error];
  /** Accepting a client failed (out of fds, say); the server retries shortly. */
  acceptError: [error: Error];
  /** A peer that `allowedPeers` does not allow connected and was closed at once. */
  connectionRefused: [peer: PeerCredentials, reason: string];
  /**
   * Device code threw: serving `command` (the client was answered EIO), or
   * on its own (`command` undefined: a timer, an ioeventfd notification).
   * The device is failed until reset (docs/errors.md); `error` is what it threw.
   */
  deviceError: [error: Error, command: number | undefined];
  /** A handler missed `requestTimeoutMs`; the client was answered ETIMEDOUT. */
  requestTimeout: [command: number];
  close: [];
}

export class VfioUserServer extends EventEmitter<VfioUserServerEvents> {
  private listener: InstanceType<typeof native.NativeListener> | undefined;
  private current: ServerSession | undefined;
  private socketPath: string | undefined;
  /** What we listen on, for messages: the path or "fd N". */
  private where: string | undefined;
  private keepAlive = true;

  private readonly sessionOptions: SessionOptions;
  private readonly stopReporting: () => void;

  /** What sessions serve: `device` itself, or the contract a PciDevice keeps. */
  private readonly contract: VfioUserDevice;

  constructor(
    readonly device: VfioUserDevice | PciDevice,
    private readonly options: ServerOptions = {},
  ) {
    super();
    const contract = contractOf(device);
    if (contract === undefined) throw new UsageError('createServer needs a PciDevice or a VfioUserDevice');
    this.contract = contract;
    checkOptions(options);
    const { requestTimeoutMs, maxQueuedBytes } = options;
    this.sessionOptions = { requestTimeoutMs, maxQueuedBytes };
    this.stopReporting = contextOf(contract).onFailure((error, command) => this.emit('deviceError', error, command));
  }

  /**
   * Starts listening at a socket path, or on an already listening UNIX socket
   * passed as `{ fd }` (the backend `--fd` convention; the server then owns
   * the fd and leaves its file alone). Resolves once clients can connect.
   */
  async listen(target: string | { fd: number }, options: ListenOptions = {}): Promise<this> {
    if (this.listener) throw new UsageError(`already listening on ${this.where}`);
    const onConnection = (fd: number) => this.accept(fd);
    if (typeof target === 'string') {
      const mode = options.mode ?? 0o600;
      if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) throw new UsageError(`mode ${mode} is not a file mode`);
      this.listener = new native.NativeListener(target, mode, onConnection);
      this.socketPath = target;
    } else {
      if (!Number.isInteger(target.fd) || target.fd < 0) throw new UsageError(`fd ${target.fd} is not a file descriptor`);
      if (options.mode !== undefined) throw new UsageError('mode applies to a socket path, not to an fd');
      this.listener = native.NativeListener.adopt(target.fd, onConnection);
    }
    this.listener.setKeepAlive(this.keepAlive);
    this.where = typeof target === 'string' ? target : `fd ${target.fd}`;
    const where = this.where;
    setImmediate(() => this.emit('listening', where));
    return this;
  }

  /** The socket path, or undefined when not listening on a path. */
  address(): string | undefined {
    return this.socketPath;
  }

  /** The session of the connected client, if any. */
  get session(): ServerSession | undefined {
    return this.current;
  }

  /** Like `server.unref()`: listening alone does not keep the process alive. */
  unref(): this {
    this.keepAlive = false;
    this.listener?.setKeepAlive(false);
    return this;
  }

  ref(): this {
    this.keepAlive = true;
    this.listener?.setKeepAlive(true);
    return this;
  }

  /** Stops listening, removes the socket file and ends the current session. */
  async close(): Promise<void> {
    if (!this.listener) return;
    this.stopReporting();
    this.listener.close();
    this.listener = undefined;
    this.socketPath = undefined;
    this.where = undefined;
    this.current?.close();
    this.emit('close');
  }

  private accept(fd: number): void {
    if (fd < 0) {
      // Out of fds (EMFILE...): the client waits in the backlog; try again shortly rather than spin.
      this.emit('acceptError', new VfioUserError(`accept failed: ${errnoName(-fd)}`));
      // While it waits the listener polls nothing, so the timer is what keeps a ref'd server alive.
      const retry = setTimeout(() => {
        if (!this.current) this.listener?.resume();
      }, ACCEPT_RETRY_MS);
      if (!this.keepAlive) retry.unref();
      return;
    }
    if (this.options.allowedPeers && !this.allowed(fd, this.options.allowedPeers)) return;
    this.listener!.pause();
    const session = new ServerSession(fd, this.contract, {
      onClose: (s, error) => this.ended(s, error),
      onRequestTimeout: (command) => this.emit('requestTimeout', command),
    }, this.sessionOptions);
    this.current = session;
    this.emit('connection', session);
  }

  /** Whether the peer on `fd` may talk to the device; if not, `fd` is closed and the refusal reported. */
  private allowed(fd: number, allowed: AllowedPeers): boolean {
    let peer: PeerCredentials;
    try {
      peer = native.peerCredentials(fd);
    } catch (error) {
      // The fd is ours from the listener on: a throw here must not leak it.
      native.closeFd(fd);
      this.emit('acceptError', error instanceof Error ? error : new VfioUserError(String(error)));
      return false;
    }
    const refusal =
      allowed.uids && !allowed.uids.includes(peer.uid) ? `uid ${peer.uid} is not allowed` :
      allowed.gids && !allowed.gids.includes(peer.gid) ? `gid ${peer.gid} is not allowed` :
      allowed.pids && !allowed.pids.includes(peer.pid) ? `pid ${peer.pid} is not allowed` :
      undefined;
    if (refusal === undefined) return true;
    native.closeFd(fd);
    this.emit('connectionRefused', peer, refusal);
    return false;
  }

  private ended(session: ServerSession, error?: Error): void {
    if (this.current === session) this.current = undefined;
    this.emit('disconnect', session, error);
    this.listener?.resume();
  }
}

function checkOptions(options: ServerOptions): void {
  const { requestTimeoutMs, maxQueuedBytes, allowedPeers } = options;
  if (requestTimeoutMs !== undefined && !(Number.isInteger(requestTimeoutMs) && requestTimeoutMs > 0 && requestTimeoutMs <= MAX_REQUEST_TIMEOUT_MS)) {
    throw new UsageError(`requestTimeoutMs ${requestTimeoutMs} is not a whole number of ms between 1 and ${MAX_REQUEST_TIMEOUT_MS}`);
  }
  if (maxQueuedBytes !== undefined && (!Number.isSafeInteger(maxQueuedBytes) || maxQueuedBytes <= 0)) {
    throw new UsageError(`maxQueuedBytes ${maxQueuedBytes} is not a positive integer`);
  }
  for (const [field, list] of Object.entries(allowedPeers ?? {})) {
    if (!Array.isArray(list) || !list.every((id) => Number.isInteger(id) && id >= 0)) {
      throw new UsageError(`allowedPeers.${field} must be an array of non-negative integers`);
    }
  }
}

/** Creates a server for `device`, like `net.createServer()`. */
export function createServer(device: VfioUserDevice | PciDevice, options: ServerOptions = {}): VfioUserServer {
  return new VfioUserServer(device, options);
}
