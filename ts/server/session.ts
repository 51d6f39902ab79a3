/**
 * One client's session with a served device: the connection, the order in
 * which commands run (ordering.ts), the handlers that answer them
 * (handlers/), and what ends with the client: its DMA windows, twin socket
 * and every fd it sent that no handler kept.
 */
import { Channel, INITIAL_MAX_FRAME, type Message } from '../channel.js';
import { closeFds, native } from '../native.js';
import { DmaSpace } from '../dma/space.js';
import { MessageDma } from '../dma/messages.js';
import { ConnectionClosedError, type PeerProtocolError } from '../errors.js';
import { nativeRegionReads, requestAttachment, type DeviceAttachment, type VfioUserDevice } from '../device.js';
import { contextOf, type DeviceContext } from '../boundary.js';
import { MigrationSession, migrationStateOf } from './migration/index.js';
import {
  Command,
  commandName,
  Errno,
  ProtocolError,
  wantsReply,
  type Capabilities,
  type RegionAccess,
  type Version,
} from '../protocol/index.js';
import { fail, handlers, SERVER_CAPABILITIES, type HandlerContext, type Reply } from './handlers/index.js';
import { RequestQueue } from './ordering.js';

/** Commands that reach device code: a failed device answers them EIO until it is reset. */
const DEVICE_COMMANDS: ReadonlySet<number> = new Set([
  Command.REGION_READ,
  Command.REGION_WRITE,
  Command.REGION_WRITE_MULTI,
  Command.DEVICE_SET_IRQS,
  Command.DEVICE_FEATURE,
  Command.MIG_DATA_READ,
  Command.MIG_DATA_WRITE,
]);

export interface SessionOptions {
  /** How long one handler may keep the client's later commands waiting; undefined: no limit. */
  requestTimeoutMs?: number;
  /** Most bytes queued for a client that does not read them before it is cut off; 8 MiB by default. */
  maxQueuedBytes?: number;
}

export interface SessionEvents {
  /** The session ended; `error` says why when it was not a clean disconnect. */
  onClose(session: ServerSession, error?: Error): void;
  /** A handler missed the deadline: the client got ETIMEDOUT, its later commands run. */
  onRequestTimeout(command: number): void;
}

export class ServerSession {
  private readonly channel: Channel;
  /** The twin socket (§4): server-to-client DMA travels here when negotiated. */
  private twin: Channel | undefined;
  private readonly requests: RequestQueue;
  private readonly context: HandlerContext;
  private negotiated: Version | undefined;
  readonly dma = new DmaSpace(SERVER_CAPABILITIES.maxDmaMaps);
  /** What the device sees of this client; handlers run inside it (requestAttachment). */
  private readonly attachment: DeviceAttachment = { dma: this.dma };
  private readonly boundary: DeviceContext;
  /** A device that failed before this client came is reset before its first command runs. */
  private recovery: Promise<void> | undefined;
  private readonly stopWatching: () => void;

  /** @internal Sessions are made by VfioUserServer. */
  constructor(
    fd: number,
    readonly device: VfioUserDevice,
    private readonly events: SessionEvents,
    options: SessionOptions = {},
  ) {
    // The fd is the connection's from here on (closed by it, even if it cannot be made): nothing
    // before may throw, and what follows closes the connection if it throws.
    this.channel = new Channel(fd, {
      side: 'server',
      onCommand: (message) => this.requests.receive(message),
      onClose: (error) => this.finish(error),
    });
    try {
      this.boundary = contextOf(device);
      this.stopWatching = this.boundary.onFailure(() => this.deviceFailed());
    } catch (error) {
      this.channel.close('the session could not start');
      throw error;
    }
    const { migration } = device;
    const session = this;
    const scratch: RegionAccess = { offset: 0n, region: 0, count: 0 };
    this.context = {
      device,
      dma: this.dma,
      migration: migration
        ? new MigrationSession(migrationStateOf(device, migration), this.dma, SERVER_CAPABILITIES.maxDataXferSize)
        : undefined,
      scratch,
      get negotiated() {
        return session.negotiated;
      },
      establish: (peer) => this.establish(peer),
      reset: () => this.reset(),
      close: () => this.close(),
    };
    this.channel.setMaxFds(SERVER_CAPABILITIES.maxMsgFds);
    if (options.maxQueuedBytes !== undefined) this.channel.setMaxQueued(options.maxQueuedBytes);
    this.requests = new RequestQueue(this.channel, {
      dispatch: (message) => this.dispatch(message),
      answer: (message, reply, error) => this.answer(message, reply, error),
      overflow: (error) => this.overflow(error),
      expired: (message) => this.expired(message),
      late: (message, reply, error) => this.late(message, reply, error),
    }, options.requestTimeoutMs);
    if (this.boundary.failed) this.recovery = this.reset().catch((error: unknown) => this.boundary.fail(error));
  }

  /** The client's capabilities once VERSION is done. */
  get peer(): Capabilities | undefined {
    return this.negotiated?.capabilities;
  }

  /** REGION_READs answered natively, without device code. */
  get readsAnsweredNatively(): number {
    return this.channel.nativeReads;
  }

  /** DMA_MAPs and DMA_UNMAPs answered natively, without entering JS. */
  get dmaAnsweredNatively(): number {
    return this.channel.nativeDma;
  }

  /** Requests waiting their turn behind a pending handler (the order a client sees). */
  get requestsWaiting(): number {
    return this.requests.waitingCount;
  }

  get closed(): boolean {
    return this.channel.closed;
  }

  /** Whether DMA_READ/DMA_WRITE travel on a twin socket. */
  get twinSocket(): boolean {
    return this.twin !== undefined;
  }

  close(): void {
    if (this.channel.closed) return;
    this.channel.close('the server closed the session');
    this.finish();
  }

  private dispatch(message: Message): Reply | Promise<Reply> {
    if (this.recovery) {
      const recovery = this.recovery;
      this.recovery = undefined;
      return recovery.then(() => this.dispatch(message));
    }
    const { header } = message;
    if (message.fdsTruncated) throw fail(Errno.EINVAL, header.command, 'more fds than max_msg_fds');
    if (!this.negotiated && header.command !== Command.VERSION) {
      throw fail(Errno.EINVAL, header.command, 'VERSION must come first');
    }
    if (this.boundary.failed && DEVICE_COMMANDS.has(header.command)) {
      throw fail(Errno.EIO, header.command, 'the device failed: DEVICE_RESET, or a new connection, resets it');
    }
    this.context.migration?.check(header.command);
    const handler = handlers.get(header.command);
    if (!handler) {
      // DMA_READ/DMA_WRITE go server to client; 14 was removed; the rest are unknown.
      throw fail(Errno.ENOSYS, header.command, `${commandName(header.command)} is not a command a server handles`);
    }
    return requestAttachment.run(this.attachment, handler, this.context, message);
  }

  private answer(message: Message, reply: Reply, error?: unknown): void {
    closeFds(message.fds);
    const { header } = message;
    if (error !== undefined && !(error instanceof ProtocolError)) {
      this.boundary.fail(error, header.command);
      error = fail(Errno.EIO, header.command, 'the device failed');
    }
    // Reply fds are ours (dups): the peer gets its own copies with the send.
    const replyFds = reply && !reply.message ? reply.fds ?? [] : [];
    try {
      if (!wantsReply(header) || this.channel.closed) return;
      if (error instanceof ProtocolError) this.channel.replyError(header, error.errno);
      else if (reply?.message) this.channel.send(reply.message);
      else this.channel.reply(header, reply?.payload, replyFds);
    } finally {
      closeFds(replyFds);
    }
  }

  private expired(message: Message): void {
    const { command } = message.header;
    this.events.onRequestTimeout(command);
    this.answer(message, undefined, fail(Errno.ETIMEDOUT, command, 'the device did not answer in time'));
  }

  /** A handler finished after its deadline: its answer has no one to go to. */
  private late(message: Message, reply: Reply, error?: unknown): void {
    if (reply && !reply.message) closeFds(reply.fds ?? []);
    if (error !== undefined && !(error instanceof ProtocolError)) this.boundary.fail(error, message.header.command);
  }

  private overflow(error: PeerProtocolError): void {
    this.channel.close(error.message);
    this.finish(error);
  }

  // ---- negotiation (VERSION's handler calls this once the versions agree) ----

  private establish(peer: Version): number | undefined {
    this.negotiated = peer;
    const frame = SERVER_CAPABILITIES.maxDataXferSize + INITIAL_MAX_FRAME;
    this.channel.setMaxFrame(frame);
    this.answerNatively();
    this.channel.setDmaTable(this.dma.table);
    // The twin socket travels as an fd: not to a client that takes none.
    const clientEnd = peer.capabilities.twinSocket.supported && peer.capabilities.maxMsgFds > 0 ? this.openTwin(frame) : undefined;
    // DMA_READ replies must fit our frame limit as well as the client's transfer limit.
    const chunk = Math.max(1, Math.min(peer.capabilities.maxDataXferSize, SERVER_CAPABILITIES.maxDataXferSize));
    this.dma.useMessages(new MessageDma(this.twin ?? this.channel, chunk));
    this.device.attach(this.attachment);
    return clientEnd;
  }

  /** DEVICE_RESET, and what a failed device gets before a new client's first command: a reset that succeeds clears the failure. */
  private async reset(): Promise<void> {
    await this.boundary.recover(async () => {
      await this.device.reset();
      await this.context.migration?.afterReset();
    });
    if (this.negotiated) this.answerNatively();
  }

  /** Reads of plain-memory regions are answered without device code, unless the device failed. */
  private answerNatively(): void {
    const reads = this.boundary.failed ? undefined : this.device[nativeRegionReads]?.(SERVER_CAPABILITIES.maxDataXferSize);
    this.channel.setRegionReads(reads ?? null);
  }

  /** The device failed (in a handler or on its own): its regions are no longer read natively. */
  private deviceFailed(): void {
    if (this.negotiated && !this.channel.closed) this.channel.setRegionReads(null);
  }

  /**
   * Creates the twin socket pair; keeps one end for server-to-client DMA and
   * returns the other for the VERSION reply. Nothing but replies should come
   * back on it; a command there is refused, and losing it ends the session.
   */
  private openTwin(frame: number): number {
    const [ours, theirs] = native.socketPair();
    this.twin = new Channel(ours, {
      side: 'server',
      twin: true,
      onCommand: (message) => {
        closeFds(message.fds);
        if (wantsReply(message.header)) this.twin?.replyError(message.header, Errno.EINVAL);
      },
      onClose: (error) => {
        if (this.channel.closed) return;
        this.channel.close('the twin socket closed');
        this.finish(error ?? new ConnectionClosedError('the client closed the twin socket'));
      },
    }, frame);
    this.twin.setMaxFds(SERVER_CAPABILITIES.maxMsgFds);
    return theirs;
  }

  // ---- end ----

  private finished = false;

  private finish(error?: Error): void {
    if (this.finished) return;
    this.finished = true;
    this.requests.clear();
    this.twin?.close('the session ended');
    // Detaches every view before anything else can run; late device code gets DmaSpaceClosedError.
    this.dma.close();
    this.stopWatching();
    try {
      if (this.negotiated) this.device.detach();
    } catch (failure) {
      this.boundary.fail(failure);
    }
    this.context.migration?.end().catch((failure: unknown) => this.boundary.fail(failure, Command.DEVICE_FEATURE));
    this.events.onClose(this, error);
  }
}
