/**
 * `VfioUserClient`: the VMM's side of the protocol. It negotiates, queries
 * the device, reads and writes regions, declares guest memory (DMA_MAP),
 * wires interrupts to eventfds, and answers the server's DMA_READ/DMA_WRITE
 * from the memory it declared. Tests, the CLI and tools are built on it.
 */
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { Channel, type Message } from '../channel.js';
import { closeFds, native } from '../native.js';
import { ConnectionClosedError, TimeoutError, UsageError } from '../errors.js';
import { EventfdIrq } from './eventfd-irq.js';
import { GuestMemory, type GuestMemoryOptions } from './memory.js';
import { MigrationClient } from './migration.js';
import { PciConfigClient } from './pci.js';
import {
  Command,
  DEFAULT_CAPABILITIES,
  decodeDeviceFeatureReply,
  decodeDeviceGetInfoReply,
  decodeDmaReadRequest,
  decodeDmaUnmapReply,
  decodeDmaWriteRequest,
  decodeIrqInfoReply,
  decodeMigDataReadReply,
  decodeRegionInfoReply,
  decodeRegionIoFdsReply,
  decodeRegionReadReply,
  decodeVersion,
  DmaMapFlags,
  DmaUnmapFlags,
  encodeDeviceFeatureRequest,
  encodeDeviceGetInfoRequest,
  encodeDmaMapRequest,
  encodeDmaReadReply,
  encodeDmaUnmapRequest,
  encodeDmaWriteReply,
  encodeIrqInfoRequest,
  encodeMigDataReadRequest,
  encodeMigDataWriteRequest,
  encodeRegionInfoRequest,
  encodeRegionIoFdsRequest,
  encodeRegionReadRequest,
  encodeRegionWriteRequest,
  encodeSetIrqsRequest,
  encodeVersion,
  Errno,
  ioeventfdMatches,
  IoFdType,
  KvmIoeventfdFlags,
  ProtocolError,
  REGION_INFO_SIZE,
  REGION_IO_FDS_SIZE,
  SetIrqsFlags,
  type DeviceFeature,
  type DeviceInfo,
  type IoFdEntry,
  type IrqInfo,
  type RegionInfo,
  type RegionIoFdsReply,
  type Version,
} from '../protocol/index.js';

export interface ConnectOptions {
  /** Reply timeout for every request, in ms (QEMU's default is 5000). 0 waits forever. */
  timeoutMs?: number;
  /** Largest REGION/DMA transfer this client accepts. */
  maxDataXferSize?: number;
  /** Offer the twin socket (§4): the server's DMA_READ/DMA_WRITE then use a socket of their own. */
  twinSocket?: boolean;
}

/** What the client proposes in VERSION. */
export const CLIENT_VERSION = { major: 0, minor: 2 } as const;
const CLIENT_MAX_MSG_FDS = 16;

export interface RegionInfoWithFd extends RegionInfo {
  /** The region's fd when it is mappable; the caller owns and closes it. */
  fd?: number;
}

export interface DmaMapOptions {
  iova: bigint;
  /** The guest memory backing the window; DMA_READ/WRITE are served from it. */
  memory: GuestMemory;
  /** Offset of the window in `memory`; 0 by default. */
  offset?: number;
  /** Bytes; the rest of `memory` after `offset` by default. */
  size?: number;
  readable?: boolean;
  writable?: boolean;
  /**
   * Send the memfd so the server maps it (the default when the server takes
   * fds: `max_msg_fds` ≥ 1); false makes the server use DMA_READ/WRITE.
   */
  shareFd?: boolean;
}

export type IrqAction = 'trigger' | 'mask' | 'unmask';

export interface SetIrqsOptions {
  index: number;
  start?: number;
  count?: number;
  action?: IrqAction;
  /** Eventfds to attach (TRIGGER), by object or fd number; an empty array de-assigns the vectors. */
  eventfds?: readonly (EventfdIrq | number)[];
  /** DATA_BOOL: which vectors the action applies to. */
  bools?: boolean[];
}

interface ClientWindow {
  iova: bigint;
  size: number;
  memory: GuestMemory;
  offset: number;
  readable: boolean;
  writable: boolean;
}

/** An ioeventfd the client signals instead of sending matching REGION_WRITEs (wireIoEventfds). */
interface IoEventfdRoute {
  offset: number;
  size: number;
  datamatch: bigint | undefined;
  eventfd: InstanceType<typeof native.NativeEventfd>;
}

export interface VfioUserClientEvents {
  /** The connection ended; `error` when it was not a clean close by the server. */
  close: [error?: Error];
}

export class VfioUserClient extends EventEmitter<VfioUserClientEvents> {
  private readonly channel: Channel;
  /** The twin socket, once the server agreed to one. */
  private twin: Channel | undefined;
  private readonly windows: ClientWindow[] = [];
  /** Per region index, the ioeventfds that take matching writes. */
  private readonly ioEventfds = new Map<number, IoEventfdRoute[]>();
  private serverVersion: Version | undefined;
  readonly timeoutMs: number;
  readonly maxDataXferSize: number;
  private readonly offerTwinSocket: boolean;
  /** Live migration: device state, its data stream and dirty logging (docs/migration.md). */
  readonly migration: MigrationClient = new MigrationClient(this);
  /** PCI config space as a VMM drives it: capabilities, bus mastering, MSI/MSI-X, BAR sizing. */
  readonly pci: PciConfigClient = new PciConfigClient(this);

  /** Use `connect()`; this wraps an already connected fd. */
  constructor(fd: number, options: ConnectOptions = {}) {
    super();
    this.timeoutMs = options.timeoutMs ?? 5000;
    this.maxDataXferSize = options.maxDataXferSize ?? DEFAULT_CAPABILITIES.maxDataXferSize;
    this.offerTwinSocket = options.twinSocket ?? false;
    this.channel = new Channel(fd, {
      side: 'client',
      onCommand: (message) => this.serve(this.channel, message),
      onClose: (error) => {
        this.twin?.close('the main socket closed');
        this.emit('close', error);
      },
    });
    this.channel.setMaxFds(CLIENT_MAX_MSG_FDS);
  }

  /** Whether the server's DMA_READ/DMA_WRITE arrive on a twin socket. */
  get twinSocket(): boolean {
    return this.twin !== undefined;
  }

  /** The server's version and capabilities. */
  get server(): Version {
    if (!this.serverVersion) throw new UsageError('VERSION has not been negotiated');
    return this.serverVersion;
  }

  get closed(): boolean {
    return this.channel.closed;
  }

  /** Sends VERSION and records the server's answer (done by connect()). */
  async negotiate(): Promise<Version> {
    const payload = encodeVersion({
      ...CLIENT_VERSION,
      capabilities: {
        maxMsgFds: CLIENT_MAX_MSG_FDS,
        maxDataXferSize: this.maxDataXferSize,
        ...(this.offerTwinSocket ? { twinSocket: { supported: true } } : {}),
      },
    });
    const reply = await this.request(Command.VERSION, payload);
    const fds = reply.fds.splice(0);
    let version: Version;
    let twinFd: number | undefined;
    try {
      version = decodeVersion(reply.payload);
      if (version.major !== CLIENT_VERSION.major || version.minor > CLIENT_VERSION.minor) {
        throw new ProtocolError(Errno.EINVAL, Command.VERSION, `the server answered ${version.major}.${version.minor}`);
      }
      twinFd = this.twinSocketFd(version, fds);
    } catch (error) {
      closeFds(fds);
      this.close();
      throw error;
    }
    closeFds(fds.filter((fd) => fd !== twinFd));
    const frame = this.maxDataXferSize + 64 * 1024;
    if (twinFd !== undefined) {
      this.twin = new Channel(twinFd, {
        side: 'client',
        twin: true,
        onCommand: (message) => this.serve(this.twin!, message),
        onClose: (error) => {
          if (this.channel.closed) return;
          this.channel.close('the twin socket closed');
          this.emit('close', error ?? new ConnectionClosedError('the server closed the twin socket'));
        },
      }, frame);
      this.twin.setMaxFds(CLIENT_MAX_MSG_FDS);
    }
    this.serverVersion = version;
    this.channel.setMaxFrame(frame);
    return version;
  }

  /**
   * The twin socket fd the server's reply designates, if any. §4: `supported`
   * false or absent turns twin mode off; true needs a valid `fd_index`, and
   * a server may not agree to what we did not offer. Anything else is
   * inconsistent and ends the connection.
   */
  private twinSocketFd(version: Version, fds: number[]): number | undefined {
    const twin = version.capabilities.twinSocket;
    if (!twin.supported) return undefined;
    const fd = twin.fdIndex === undefined ? undefined : fds[twin.fdIndex];
    if (!this.offerTwinSocket || fd === undefined) {
      const why = this.offerTwinSocket ? `fd_index ${twin.fdIndex} names none of the ${fds.length} fds sent` : 'twin_socket was not offered';
      throw new ProtocolError(Errno.EPROTO, Command.VERSION, `inconsistent twin_socket reply: ${why}`);
    }
    return fd;
  }

  private request(command: number, payload?: Uint8Array, fds?: number[]): Promise<Message> {
    return this.channel.request(command, payload, fds, this.timeoutMs);
  }

  /** Largest transfer in one message: what the server accepts and what we can receive. */
  private get chunk(): number {
    // Both limits bind: the server's for what it accepts, ours for the replies we can receive.
    return Math.min(this.server.capabilities.maxDataXferSize, this.maxDataXferSize);
  }

  async getDeviceInfo(): Promise<DeviceInfo> {
    const reply = await this.request(Command.DEVICE_GET_INFO, encodeDeviceGetInfoRequest());
    return decodeDeviceGetInfoReply(reply.payload);
  }

  /** Region info with its capabilities (asking again with a larger argsz when needed). */
  async getRegionInfo(index: number): Promise<RegionInfoWithFd> {
    let argsz = REGION_INFO_SIZE;
    for (;;) {
      const reply = await this.request(Command.DEVICE_GET_REGION_INFO, encodeRegionInfoRequest({ index, argsz }));
      // §6.5: a reply whose argsz exceeds ours is truncated (no capabilities, no fd): retry
      // before decoding, since such a reply may still carry a cap_offset pointing past its
      // end (rust-vmm's Server sets cap_offset 32 and CAPS; QEMU also retries first).
      const needed = reply.payload.length >= REGION_INFO_SIZE ? reply.payload.readUInt32LE(0) : 0;
      if (needed > argsz && reply.payload.length < needed) {
        closeFds(reply.fds);
        // One retry with what the server asked for; a server that keeps moving the goalposts is broken.
        if (argsz !== REGION_INFO_SIZE) throw new ProtocolError(Errno.EPROTO, Command.DEVICE_GET_REGION_INFO, `the reply is still truncated at argsz ${argsz}`);
        argsz = needed;
        continue;
      }
      const info = decodeRegionInfoReply(reply.payload);
      const [fd, ...extra] = reply.fds;
      closeFds(extra);
      return fd === undefined ? info : { ...info, fd };
    }
  }

  async getRegionIoFds(index: number): Promise<RegionIoFdsReply & { fds: number[] }> {
    let argsz = REGION_IO_FDS_SIZE;
    for (;;) {
      const reply = await this.request(Command.DEVICE_GET_REGION_IO_FDS, encodeRegionIoFdsRequest({ index, argsz }));
      const decoded = decodeRegionIoFdsReply(reply.payload);
      if (decoded.argsz <= argsz || decoded.entries.length === decoded.count) return { ...decoded, fds: reply.fds };
      closeFds(reply.fds);
      argsz = decoded.argsz;
    }
  }

  /**
   * Does with GET_REGION_IO_FDS what a VMM does with KVM: from now on a
   * write to `region` that one of its ioeventfds matches (same offset; its
   * size, or any size for 0; its datamatch, if it has one) signals that
   * eventfd instead of going out as a REGION_WRITE, and the value written is
   * not sent. Replaces what an earlier call wired for the region. Only
   * ioeventfd entries are wired (ioregionfds and shadow ioeventfds need
   * kernel support this client does not stand in for: their writes stay
   * messages, and their fds are closed). Returns the entries wired.
   */
  async wireIoEventfds(region: number): Promise<IoFdEntry[]> {
    const reply = await this.getRegionIoFds(region);
    this.unwireIoEventfds(region);
    const wired: IoFdEntry[] = [];
    const routes: IoEventfdRoute[] = [];
    // One owner per fd, however many entries share it.
    const eventfds = new Map<number, IoEventfdRoute['eventfd']>();
    try {
      for (const entry of reply.entries) {
        const fd = reply.fds[entry.fdIndex];
        if (entry.type !== IoFdType.IOEVENTFD || fd === undefined) continue;
        let eventfd = eventfds.get(fd);
        if (!eventfd) eventfds.set(fd, (eventfd = native.NativeEventfd.fromFd(fd)));
        const datamatch = entry.flags & KvmIoeventfdFlags.DATAMATCH ? entry.datamatch : undefined;
        routes.push({ offset: Number(entry.offset), size: Number(entry.size), datamatch, eventfd });
        wired.push(entry);
      }
    } catch (error) {
      // Every fd the reply brought is ours: the adopted ones close with their eventfds, the rest here.
      for (const eventfd of eventfds.values()) eventfd.close();
      closeFds(reply.fds.filter((fd) => !eventfds.has(fd)));
      throw error;
    }
    closeFds(reply.fds.filter((fd) => !eventfds.has(fd)));
    if (routes.length > 0) this.ioEventfds.set(region, routes);
    return wired;
  }

  private unwireIoEventfds(region: number): void {
    for (const eventfd of new Set(this.ioEventfds.get(region)?.map((r) => r.eventfd))) eventfd.close();
    this.ioEventfds.delete(region);
  }

  /** Reads `count` bytes, split at the server's max_data_xfer_size. */
  async regionRead(region: number, offset: bigint, count: number): Promise<Buffer> {
    if (count <= this.chunk) return this.readChunk(region, offset, count);
    const parts: Buffer[] = [];
    for (let done = 0; done < count; done += this.chunk) {
      parts.push(await this.readChunk(region, offset + BigInt(done), Math.min(this.chunk, count - done)));
    }
    return Buffer.concat(parts);
  }

  private async readChunk(region: number, offset: bigint, count: number): Promise<Buffer> {
    const reply = await this.request(Command.REGION_READ, encodeRegionReadRequest({ offset, region, count }));
    const data = decodeRegionReadReply(reply.payload);
    if (data.count !== count) throw new ProtocolError(Errno.EIO, Command.REGION_READ, `asked ${count} bytes, got ${data.count}`);
    return data.data;
  }

  /**
   * Writes `data`; `posted` sends it with No_reply (QEMU's default for BAR
   * writes). A write an ioeventfd wired by wireIoEventfds matches signals it
   * instead, before this returns.
   */
  async regionWrite(region: number, offset: bigint, data: Uint8Array, options: { posted?: boolean } = {}): Promise<void> {
    const route = this.ioEventfds.get(region)?.find((r) => ioeventfdMatches(r.offset, r.size, r.datamatch, Number(offset), data));
    if (route) return route.eventfd.signal();
    for (let done = 0; done < data.length || done === 0; done += this.chunk) {
      const part = data.subarray(done, done + this.chunk);
      const payload = encodeRegionWriteRequest({ offset: offset + BigInt(done), region }, part);
      if (options.posted) this.channel.post(Command.REGION_WRITE, payload);
      else await this.request(Command.REGION_WRITE, payload);
      if (data.length === 0) break;
    }
  }

  /** Declares guest memory to the server; DMA_READ/WRITE for it are served from `memory`. */
  async dmaMap(options: DmaMapOptions): Promise<void> {
    const offset = options.offset ?? 0;
    const size = options.size ?? options.memory.size - offset;
    if (offset < 0 || size <= 0 || offset + size > options.memory.size) {
      throw new UsageError(`window of ${size} bytes at offset ${offset} is outside the ${options.memory.size}-byte memory`);
    }
    const readable = options.readable ?? true;
    const writable = options.writable ?? true;
    const flags = (readable ? DmaMapFlags.READ : 0) | (writable ? DmaMapFlags.WRITE : 0);
    const takesFds = this.server.capabilities.maxMsgFds > 0;
    const share = options.shareFd ?? takesFds;
    if (share && !takesFds) throw new UsageError('shareFd: the server takes no fds (max_msg_fds 0)');
    const payload = encodeDmaMapRequest({ flags, offset: share ? BigInt(offset) : 0n, address: options.iova, size: BigInt(size) });
    await this.request(Command.DMA_MAP, payload, share ? [options.memory.fd] : undefined);
    this.windows.push({ iova: options.iova, size, memory: options.memory, offset, readable, writable });
  }

  async dmaUnmap(iova: bigint, size: bigint): Promise<void> {
    const reply = await this.request(Command.DMA_UNMAP, encodeDmaUnmapRequest({ flags: 0, address: iova, size }));
    decodeDmaUnmapReply(reply.payload);
    const at = this.windows.findIndex((w) => w.iova === iova && BigInt(w.size) === size);
    if (at >= 0) this.windows.splice(at, 1);
  }

  /** UNMAP_ALL (flag 0x2), as QEMU sends it. */
  async dmaUnmapAll(): Promise<void> {
    await this.request(Command.DMA_UNMAP, encodeDmaUnmapRequest({ flags: DmaUnmapFlags.ALL, address: 0n, size: 0n }));
    this.windows.length = 0;
  }

  async getIrqInfo(index: number): Promise<IrqInfo> {
    const reply = await this.request(Command.DEVICE_GET_IRQ_INFO, encodeIrqInfoRequest({ index }));
    return decodeIrqInfoReply(reply.payload);
  }

  /**
   * SET_IRQS. Eventfds are sent in chunks of the server's max_msg_fds, as
   * QEMU does; the fds stay the caller's (the server gets copies).
   */
  async setIrqs(options: SetIrqsOptions): Promise<void> {
    const action = { trigger: SetIrqsFlags.ACTION_TRIGGER, mask: SetIrqsFlags.ACTION_MASK, unmask: SetIrqsFlags.ACTION_UNMASK }[options.action ?? 'trigger'];
    const start = options.start ?? 0;
    if (options.eventfds && options.eventfds.length > 0) {
      const eventfds = options.eventfds.map((e) => (typeof e === 'number' ? e : e.fd));
      const per = this.server.capabilities.maxMsgFds;
      if (per === 0) throw new UsageError('eventfds: the server takes no fds (max_msg_fds 0)');
      for (let i = 0; i < eventfds.length; i += per) {
        const fds = eventfds.slice(i, i + per);
        const payload = encodeSetIrqsRequest({ flags: SetIrqsFlags.DATA_EVENTFD | action, index: options.index, start: start + i, count: fds.length });
        await this.request(Command.DEVICE_SET_IRQS, payload, fds);
      }
      return;
    }
    const data = options.eventfds ? SetIrqsFlags.DATA_EVENTFD : options.bools ? SetIrqsFlags.DATA_BOOL : SetIrqsFlags.DATA_NONE;
    const count = options.count ?? options.bools?.length ?? 0;
    await this.request(Command.DEVICE_SET_IRQS, encodeSetIrqsRequest({ flags: data | action, index: options.index, start, count, bools: options.bools }));
  }

  /**
   * Wires every vector of IRQ `index` to a new `EventfdIrq` in one call (as
   * many as GET_IRQ_INFO reports), in vector order; the caller closes them.
   */
  async wireIrqs(index: number): Promise<EventfdIrq[]> {
    const { count } = await this.getIrqInfo(index);
    const irqs = Array.from({ length: count }, () => new EventfdIrq());
    try {
      if (count > 0) await this.setIrqs({ index, eventfds: irqs });
    } catch (error) {
      irqs.forEach((irq) => irq.close());
      throw error;
    }
    return irqs;
  }

  async reset(): Promise<void> {
    await this.request(Command.DEVICE_RESET);
  }

  async deviceFeature(flags: number, data?: Uint8Array, argsz?: number): Promise<DeviceFeature> {
    const reply = await this.request(Command.DEVICE_FEATURE, encodeDeviceFeatureRequest({ flags, data, argsz }));
    return decodeDeviceFeatureReply(reply.payload);
  }

  /** Reads migration data; fewer bytes than asked means the end of the stream. */
  async migDataRead(size: number): Promise<Buffer> {
    const reply = await this.request(Command.MIG_DATA_READ, encodeMigDataReadRequest({ size }));
    return decodeMigDataReadReply(reply.payload).data;
  }

  async migDataWrite(data: Uint8Array): Promise<void> {
    await this.request(Command.MIG_DATA_WRITE, encodeMigDataWriteRequest(data));
  }

  /** Closes the connection; pending requests reject. Guest memory stays the caller's. */
  close(): void {
    this.channel.close('the client closed the connection');
    this.twin?.close('the client closed the connection');
    this.windows.length = 0;
    for (const region of [...this.ioEventfds.keys()]) this.unwireIoEventfds(region);
  }

  // ---- DMA_READ / DMA_WRITE from the server ----

  /** Answers a server-to-client command on the channel it came from (main or twin socket). */
  private serve(channel: Channel, message: Message): void {
    closeFds(message.fds);
    const { header } = message;
    try {
      if (message.fdsTruncated) throw new ProtocolError(Errno.EINVAL, header.command, 'more fds than max_msg_fds');
      if (header.command === Command.DMA_READ) {
        const req = decodeDmaReadRequest(message.payload);
        const { window, at } = this.locate(header.command, req.address, req.count, 'readable');
        channel.reply(header, encodeDmaReadReply(req.address, window.memory.read(at, req.count)));
      } else if (header.command === Command.DMA_WRITE) {
        const req = decodeDmaWriteRequest(message.payload);
        const { window, at } = this.locate(header.command, req.address, req.count, 'writable');
        window.memory.write(at, req.data);
        channel.reply(header, encodeDmaWriteReply({ address: req.address, count: req.count }));
      } else {
        throw new ProtocolError(Errno.ENOSYS, header.command, 'not a server-to-client command');
      }
    } catch (error) {
      const errno = error instanceof ProtocolError ? error.errno : Errno.EFAULT;
      if (!channel.closed) channel.replyError(header, errno);
    }
  }

  private locate(command: number, address: bigint, count: number, need: 'readable' | 'writable') {
    if (count > this.maxDataXferSize) throw new ProtocolError(Errno.E2BIG, command, `count ${count} > max_data_xfer_size`);
    const window = this.windows.find((w) => address >= w.iova && address + BigInt(count) <= w.iova + BigInt(w.size));
    if (!window) throw new ProtocolError(Errno.EFAULT, command, 'outside every DMA window');
    if (!window[need]) throw new ProtocolError(Errno.EPERM, command, `the window is not ${need}`);
    return { window, at: window.offset + Number(address - window.iova) };
  }
}

/** Connects to a vfio-user server at `path` and negotiates the version. */
export async function connect(path: string, options: ConnectOptions = {}): Promise<VfioUserClient> {
  const client = new VfioUserClient(await connectSocket(path, options.timeoutMs ?? 5000), options);
  try {
    await client.negotiate();
  } catch (error) {
    client.close();
    throw error;
  }
  return client;
}

/**
 * A UNIX connect never blocks here: when the server's backlog is full it
 * fails with EAGAIN at once, and the kernel offers nothing to wait on, so it
 * is retried on a timer (1 ms doubling to 100 ms) while the loop runs on,
 * until `timeoutMs` (0: forever).
 */
async function connectSocket(path: string, timeoutMs: number): Promise<number> {
  const deadline = timeoutMs > 0 ? Date.now() + timeoutMs : Infinity;
  for (let wait = 1; ; wait = Math.min(wait * 2, 100)) {
    try {
      return native.connectUnix(path);
    } catch (error) {
      if ((error as { code?: string }).code !== 'EAGAIN') throw error;
      if (Date.now() >= deadline) throw new TimeoutError(`connect to ${path}: the server's backlog stayed full for ${timeoutMs} ms`);
      await sleep(wait);
    }
  }
}

export { GuestMemory, type GuestMemoryOptions };
