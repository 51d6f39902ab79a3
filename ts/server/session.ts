/**
 * One client's session with a served device: version negotiation, then every
 * command in arrival order (async handlers hold later messages back), posted
 * writes honoured, and each fd the client sends either kept or closed.
 */
import { Channel, INITIAL_MAX_FRAME, type Message } from '../channel.js';
import { closeFds, native } from '../native.js';
import { DmaSpace } from '../dma/space.js';
import { MessageDma } from '../dma/messages.js';
import { ConnectionClosedError, PeerProtocolError } from '../errors.js';
import type { VfioUserDevice } from '../device.js';
import { MigrationSession, migrationStateOf } from './migration/index.js';
import {
  allocRegionReadReplyMessage,
  Command,
  commandName,
  decodeDeviceGetInfoRequest,
  decodeDmaMapRequest,
  decodeDmaUnmapRequest,
  decodeIrqInfoRequest,
  decodeRegionInfoRequest,
  decodeRegionIoFdsRequest,
  decodeRegionReadRequest,
  decodeRegionWriteMultiRequest,
  decodeRegionWriteRequest,
  decodeSetIrqsRequest,
  decodeVersion,
  DmaMapFlags,
  DmaUnmapFlags,
  encodeDeviceGetInfoReply,
  encodeDmaUnmapReply,
  encodeIrqInfoReply,
  encodeRegionInfoReply,
  encodeRegionIoFdsReply,
  encodeRegionWriteMultiReply,
  encodeVersion,
  Errno,
  IoFdType,
  negotiateVersion,
  ProtocolError,
  REGION_READ_REPLY_DATA_OFFSET,
  RegionInfoFlags,
  SetIrqsFlags,
  validateSetIrqs,
  wantsReply,
  type Capabilities,
  type IoFdEntry,
  type RegionAccess,
  type Version,
} from '../protocol/index.js';

/** What this server offers in VERSION. */
export const SERVER_VERSION = { major: 0, minor: 2 } as const;
export const SERVER_CAPABILITIES = {
  maxMsgFds: 16,
  maxDataXferSize: 1024 * 1024,
  maxDmaMaps: 65535,
  pgsizes: 4096,
  writeMultiple: true,
} as const;

/** Commands may wait behind a pending (async) handler; past this many payload bytes the client is cut off. */
const MAX_QUEUED_BYTES = 64 * 1024 * 1024;

/** A handler's answer: a payload (and fds) for the reply, or a whole prebuilt message. */
type Reply = { payload?: Uint8Array; fds?: number[]; message?: undefined } | { message: Buffer } | void;

export interface SessionEvents {
  /** The session ended; `error` says why when it was not a clean disconnect. */
  onClose(session: ServerSession, error?: Error): void;
  /** A device handler threw: the client got EIO, the server goes on. */
  onDeviceError(error: Error, command: number): void;
}

const fail = (errno: number, command: number, why: string) => new ProtocolError(errno, command, why);

export class ServerSession {
  private readonly channel: Channel;
  /** The twin socket (§4): server-to-client DMA travels here when negotiated. */
  private twin: Channel | undefined;
  private readonly queue: Message[] = [];
  /** Payload bytes in `queue`. */
  private queued = 0;
  private running = false;
  private negotiated: Version | undefined;
  readonly dma = new DmaSpace(SERVER_CAPABILITIES.maxDmaMaps);
  private readonly scratch: RegionAccess = { offset: 0n, region: 0, count: 0 };
  /** Present when the device supports live migration. */
  private readonly migration: MigrationSession | undefined;

  constructor(
    fd: number,
    readonly device: VfioUserDevice,
    private readonly events: SessionEvents,
  ) {
    const { migration } = device;
    this.migration = migration
      ? new MigrationSession(migrationStateOf(device, migration), this.dma, SERVER_CAPABILITIES.maxDataXferSize)
      : undefined;
    this.channel = new Channel(fd, {
      onCommand: (message) => this.receive(message),
      onClose: (error) => this.finish(error),
    });
  }

  /** The client's capabilities once VERSION is done. */
  get peer(): Capabilities | undefined {
    return this.negotiated?.capabilities;
  }

  get nativeReads(): number {
    return this.channel.nativeReads;
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

  // ---- ordering ----

  private receive(message: Message): boolean {
    if (this.running || this.queue.length > 0) {
      this.queued += message.payload.length;
      if (this.queued > MAX_QUEUED_BYTES) {
        // A client that keeps sending while a handler is pending would grow the queue without bound.
        closeFds(message.fds);
        this.channel.close(`more than ${MAX_QUEUED_BYTES} bytes queued behind a pending handler`);
        this.finish(new PeerProtocolError(`the client queued more than ${MAX_QUEUED_BYTES} bytes behind a pending handler`));
        return false;
      }
      this.queue.push(message);
      return true;
    }
    return this.run(message);
  }

  /** Handles one message; true if it finishes later (then `done()` follows). */
  private run(message: Message): boolean {
    let result: Reply | Promise<Reply>;
    try {
      result = this.dispatch(message);
    } catch (error) {
      this.answer(message, undefined, error);
      return false;
    }
    if (!(result instanceof Promise)) {
      this.answer(message, result);
      return false;
    }
    this.running = true;
    result.then(
      (reply) => this.answer(message, reply),
      (error) => this.answer(message, undefined, error),
    ).finally(() => {
      this.running = false;
      this.channel.done();
      this.drain();
    });
    return true;
  }

  private drain(): void {
    while (!this.running && this.queue.length > 0 && !this.channel.closed) {
      const next = this.queue.shift()!;
      this.queued -= next.payload.length;
      if (!this.run(next)) this.channel.done();
    }
  }

  private answer(message: Message, reply: Reply, error?: unknown): void {
    closeFds(message.fds);
    const { header } = message;
    if (error !== undefined && !(error instanceof ProtocolError)) {
      this.events.onDeviceError(error instanceof Error ? error : new Error(String(error)), header.command);
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

  private dispatch(message: Message): Reply | Promise<Reply> {
    const { header } = message;
    if (message.fdsTruncated) throw fail(Errno.EINVAL, header.command, 'more fds than max_msg_fds');
    if (!this.negotiated && header.command !== Command.VERSION) {
      throw fail(Errno.EINVAL, header.command, 'VERSION must come first');
    }
    this.migration?.check(header.command);
    switch (header.command) {
      case Command.VERSION: return this.version(message);
      case Command.DMA_MAP: return this.dmaMap(message);
      case Command.DMA_UNMAP: return this.dmaUnmap(message);
      case Command.DEVICE_GET_INFO: return this.deviceGetInfo(message);
      case Command.DEVICE_GET_REGION_INFO: return this.regionInfo(message);
      case Command.DEVICE_GET_REGION_IO_FDS: return this.regionIoFds(message);
      case Command.DEVICE_GET_IRQ_INFO: return this.irqInfo(message);
      case Command.DEVICE_SET_IRQS: return this.setIrqs(message);
      case Command.REGION_READ: return this.regionRead(message);
      case Command.REGION_WRITE: return this.regionWrite(message);
      case Command.REGION_WRITE_MULTI: return this.regionWriteMulti(message);
      case Command.DEVICE_RESET: return this.reset(message);
      case Command.DEVICE_FEATURE: return this.migrating(message).feature(message.payload).then((payload) => ({ payload }));
      case Command.MIG_DATA_READ: return this.migrating(message).dataRead(message.payload).then((payload) => ({ payload }));
      case Command.MIG_DATA_WRITE: return this.migrating(message).dataWrite(message.payload);
      default:
        // DMA_READ/DMA_WRITE go server to client; 14 was removed; the rest are unknown.
        throw fail(Errno.ENOSYS, header.command, `${commandName(header.command)} is not a command a server handles`);
    }
  }

  private noFds(message: Message): void {
    if (message.fds.length > 0) throw fail(Errno.EINVAL, message.header.command, 'unexpected fds');
  }

  /** The migration commands' handler; ENOTSUP for devices without migration. */
  private migrating(message: Message): MigrationSession {
    this.noFds(message);
    if (!this.migration) throw fail(Errno.ENOTSUP, message.header.command, 'the device does not support migration');
    return this.migration;
  }

  // ---- commands ----

  private version(message: Message): Reply {
    if (this.negotiated) throw fail(Errno.EINVAL, Command.VERSION, 'VERSION was already negotiated');
    let peer: Version;
    let reply: { major: number; minor: number };
    try {
      this.noFds(message);
      peer = decodeVersion(message.payload);
      reply = negotiateVersion(peer, SERVER_VERSION);
    } catch (error) {
      // A client we cannot talk to: tell it why, then serve the next one.
      setImmediate(() => this.close());
      throw error;
    }
    this.negotiated = peer;
    const frame = SERVER_CAPABILITIES.maxDataXferSize + INITIAL_MAX_FRAME;
    this.channel.setMaxFrame(frame);
    this.channel.setRegionReads(this.device.nativeReads(SERVER_CAPABILITIES.maxDataXferSize));
    const clientEnd = peer.capabilities.twinSocket.supported ? this.openTwin(frame) : undefined;
    // DMA_READ replies must fit our frame limit as well as the client's transfer limit.
    const chunk = Math.max(1, Math.min(peer.capabilities.maxDataXferSize, SERVER_CAPABILITIES.maxDataXferSize));
    this.dma.useMessages(new MessageDma(this.twin ?? this.channel, chunk));
    this.device.attach({ dma: this.dma });
    const capabilities: Partial<Capabilities> = { ...SERVER_CAPABILITIES };
    if (clientEnd !== undefined) capabilities.twinSocket = { supported: true, fdIndex: 0 };
    return {
      payload: encodeVersion({ ...reply, capabilities }),
      fds: clientEnd === undefined ? undefined : [clientEnd],
    };
  }

  /**
   * Creates the twin socket pair; keeps one end for server-to-client DMA and
   * returns the other for the VERSION reply. Nothing but replies should come
   * back on it; a command there is refused, and losing it ends the session.
   */
  private openTwin(frame: number): number {
    const [ours, theirs] = native.socketPair();
    this.twin = new Channel(ours, {
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
    return theirs;
  }

  private dmaMap(message: Message): Reply {
    const req = decodeDmaMapRequest(message.payload);
    if (message.fds.length > 1) throw fail(Errno.EINVAL, Command.DMA_MAP, 'at most one fd');
    if (req.flags & DmaMapFlags.FILE_IO) throw fail(Errno.ENOTSUP, Command.DMA_MAP, 'FILE_IO maps are not supported');
    const known = DmaMapFlags.READ | DmaMapFlags.WRITE | DmaMapFlags.MMAP;
    if (req.flags & ~known) throw fail(Errno.EINVAL, Command.DMA_MAP, `unknown flags 0x${req.flags.toString(16)}`);
    const fd = message.fds[0];
    if (fd === undefined && req.flags & DmaMapFlags.MMAP) throw fail(Errno.EINVAL, Command.DMA_MAP, 'MMAP without an fd');
    this.dma.map({
      iova: req.address,
      size: req.size,
      readable: (req.flags & DmaMapFlags.READ) !== 0,
      writable: (req.flags & DmaMapFlags.WRITE) !== 0,
      fd,
      fileOffset: fd === undefined ? 0n : req.offset,
    });
  }

  private dmaUnmap(message: Message): Reply {
    this.noFds(message);
    const req = decodeDmaUnmapRequest(message.payload);
    if (req.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) {
      throw fail(Errno.ENOTSUP, Command.DMA_UNMAP, 'migration v1 dirty bitmaps are not supported');
    }
    if (req.flags & DmaUnmapFlags.ALL) this.dma.unmapAll();
    else this.dma.unmap(req.address, req.size);
    return { payload: encodeDmaUnmapReply({ argsz: 24, flags: req.flags, address: req.address, size: req.size }) };
  }

  private deviceGetInfo(message: Message): Reply {
    this.noFds(message);
    decodeDeviceGetInfoRequest(message.payload);
    const d = this.device;
    return { payload: encodeDeviceGetInfoReply({ flags: d.flags, numRegions: d.numRegions, numIrqs: d.numIrqs }) };
  }

  private regionInfo(message: Message): Reply {
    this.noFds(message);
    const req = decodeRegionInfoRequest(message.payload);
    if (req.index >= this.device.numRegions) throw fail(Errno.EINVAL, Command.DEVICE_GET_REGION_INFO, `no region ${req.index}`);
    const region = this.device.regionInfo(req.index);
    const { payload, complete } = encodeRegionInfoReply(
      { flags: region.flags, index: req.index, size: region.size, offset: region.offset ?? 0n, caps: region.caps },
      req.argsz,
    );
    // The fd goes only with the complete reply (the one a client maps from).
    const withFd = complete && region.flags & RegionInfoFlags.MMAP && region.fd !== undefined;
    return { payload, fds: withFd ? [native.dupFd(region.fd!)] : undefined };
  }

  private regionIoFds(message: Message): Reply {
    this.noFds(message);
    const req = decodeRegionIoFdsRequest(message.payload);
    if (req.index >= this.device.numRegions) throw fail(Errno.EINVAL, Command.DEVICE_GET_REGION_IO_FDS, `no region ${req.index}`);
    const ioFds = this.device.regionIoFds?.(req.index) ?? [];
    // Entries sharing an eventfd share its fd_index.
    const fds: number[] = [];
    const entries: IoFdEntry[] = ioFds.map((e) => {
      let fdIndex = fds.indexOf(e.fd);
      if (fdIndex < 0) fdIndex = fds.push(e.fd) - 1;
      return { offset: e.offset, size: e.size, fdIndex, type: IoFdType.IOEVENTFD, flags: e.flags ?? 0, datamatch: e.datamatch ?? 0n };
    });
    const { payload, complete } = encodeRegionIoFdsReply({ index: req.index, entries }, req.argsz);
    // As for region info: fds only with the complete reply, and always dups.
    return { payload, fds: complete && fds.length > 0 ? fds.map((fd) => native.dupFd(fd)) : undefined };
  }

  private irqInfo(message: Message): Reply {
    this.noFds(message);
    const req = decodeIrqInfoRequest(message.payload);
    if (req.index >= this.device.numIrqs) throw fail(Errno.EINVAL, Command.DEVICE_GET_IRQ_INFO, `no IRQ index ${req.index}`);
    const info = this.device.irqInfo(req.index);
    return { payload: encodeIrqInfoReply({ index: req.index, count: info.count, flags: info.flags }) };
  }

  private setIrqs(message: Message): Reply {
    const req = decodeSetIrqsRequest(message.payload);
    const C = Command.DEVICE_SET_IRQS;
    if (req.index >= this.device.numIrqs) throw fail(Errno.EINVAL, C, `no IRQ index ${req.index}`);
    const errno = validateSetIrqs(req, message.fds.length, this.device.irqInfo(req.index).count);
    if (errno) throw fail(errno, C, 'invalid SET_IRQS');
    if ((req.flags & SetIrqsFlags.DATA_EVENTFD) && (req.flags & SetIrqsFlags.ACTION_TYPE_MASK) !== SetIrqsFlags.ACTION_TRIGGER) {
      throw fail(Errno.EINVAL, C, 'eventfds can only be attached for TRIGGER');
    }
    if (!message.fds.every((fd) => native.isEventfd(fd))) throw fail(Errno.EINVAL, C, 'every fd must be an eventfd');
    // The device owns the fds once setIrqs returns; if it throws, they are still ours to close.
    this.device.setIrqs(req, [...message.fds]);
    message.fds.length = 0;
  }

  /** Validates an access against the region and the transfer limit. */
  private checkAccess(command: number, region: number, offset: bigint, count: number, flag: number): number {
    if (region >= this.device.numRegions) throw fail(Errno.EINVAL, command, `no region ${region}`);
    if (count > SERVER_CAPABILITIES.maxDataXferSize) throw fail(Errno.E2BIG, command, `count ${count} exceeds max_data_xfer_size`);
    const info = this.device.regionInfo(region);
    if (!(info.flags & flag)) throw fail(Errno.EINVAL, command, `region ${region} does not allow this access`);
    if (offset + BigInt(count) > info.size) throw fail(Errno.EINVAL, command, `offset ${offset} + ${count} is past the region's ${info.size} bytes`);
    return Number(offset);
  }

  private regionRead(message: Message): Reply | Promise<Reply> {
    this.noFds(message);
    const a = decodeRegionReadRequest(message.payload, this.scratch);
    const offset = this.checkAccess(Command.REGION_READ, a.region, a.offset, a.count, RegionInfoFlags.READ);
    const reply = allocRegionReadReplyMessage(message.header.msgId, a);
    if (a.count === 0) return { message: reply };
    const data = this.device.read(a.region, offset, a.count);
    const fill = (bytes: Uint8Array): Reply => {
      if (bytes.length !== a.count) throw new Error(`the device returned ${bytes.length} bytes for a ${a.count}-byte read`);
      reply.set(bytes, REGION_READ_REPLY_DATA_OFFSET);
      return { message: reply };
    };
    return data instanceof Promise ? data.then(fill) : fill(data);
  }

  private regionWrite(message: Message): Reply | Promise<Reply> {
    this.noFds(message);
    const w = decodeRegionWriteRequest(message.payload);
    const offset = this.checkAccess(Command.REGION_WRITE, w.region, w.offset, w.count, RegionInfoFlags.WRITE);
    const ack = { payload: message.payload.subarray(0, 16) };
    if (w.count === 0) return ack;
    const done = this.device.write(w.region, offset, w.data);
    return done instanceof Promise ? done.then(() => ack) : ack;
  }

  private async regionWriteMulti(message: Message): Promise<Reply> {
    this.noFds(message);
    const entries = decodeRegionWriteMultiRequest(message.payload);
    for (const w of entries) {
      const offset = this.checkAccess(Command.REGION_WRITE_MULTI, w.region, w.offset, w.count, RegionInfoFlags.WRITE);
      await this.device.write(w.region, offset, w.data);
    }
    return { payload: encodeRegionWriteMultiReply(entries.length) };
  }

  private async reset(message: Message): Promise<Reply> {
    this.noFds(message);
    if (message.payload.length !== 0) throw fail(Errno.EINVAL, Command.DEVICE_RESET, 'DEVICE_RESET has no payload');
    await this.device.reset();
    await this.migration?.afterReset();
  }

  // ---- end ----

  private finished = false;

  private finish(error?: Error): void {
    if (this.finished) return;
    this.finished = true;
    for (const message of this.queue.splice(0)) closeFds(message.fds);
    this.twin?.close('the session ended');
    this.dma.useMessages(undefined);
    // Detaches every view before anything else can run.
    this.dma.unmapAll();
    if (this.negotiated) this.device.detach();
    this.migration?.end().catch((failure: Error) => this.events.onDeviceError(failure, Command.DEVICE_FEATURE));
    this.events.onClose(this, error);
  }
}
