/**
 * A readable view of any vfio-user message, for people debugging a session:
 * `vfio-user trace`, `serve --verbose` and `DEBUG=vfio-user` all print these.
 * Bodies are decoded by this module's own codec; a body the codec refuses is
 * shown with the reason instead of fields. Replies are decoded by the command
 * of the request they answer (matched by msg_id in the other direction).
 */
import {
  Command,
  commandName,
  DeviceFeatureFlags,
  DeviceInfoFlags,
  DmaMapFlags,
  DmaUnmapFlags,
  FeatureIndex,
  HEADER_SIZE,
  HeaderFlags,
  IoFdType,
  IrqIndex,
  IrqInfoFlags,
  KvmIoeventfdFlags,
  MigrationFlags,
  MigrationState,
  Region,
  RegionCapId,
  RegionInfoFlags,
  SetIrqsFlags,
} from './constants.js';
import { errnoName } from './errors.js';
import { decodeHeader, errorReplyErrno, isErrorReply, isReply, isValidType } from './header.js';
import { decodeVersion } from './version.js';
import { decodeDmaMapRequest, decodeDmaReadReply, decodeDmaReadRequest, decodeDmaUnmapReply, decodeDmaUnmapRequest, decodeDmaWriteReply, decodeDmaWriteRequest } from './dma.js';
import { decodeDeviceGetInfoReply, decodeDeviceGetInfoRequest } from './device.js';
import {
  decodeRegionInfoReply,
  decodeRegionInfoRequest,
  decodeRegionIoFdsReply,
  decodeRegionIoFdsRequest,
  decodeRegionReadReply,
  decodeRegionReadRequest,
  decodeRegionWriteMultiReply,
  decodeRegionWriteMultiRequest,
  decodeRegionWriteReply,
  decodeRegionWriteRequest,
  type RegionAccess,
} from './region.js';
import { decodeIrqInfoReply, decodeIrqInfoRequest, decodeSetIrqsRequest } from './irq.js';
import {
  decodeDeviceFeatureReply,
  decodeDeviceFeatureRequest,
  decodeDmaLoggingReportReply,
  decodeDmaLoggingReportRequest,
  decodeDmaLoggingStart,
  decodeMigDeviceState,
  decodeMigrationFeature,
  featureIndex,
  type DeviceFeature,
} from './feature.js';
import { decodeMigDataReadReply, decodeMigDataReadRequest, decodeMigDataWriteRequest } from './migration.js';

/** A decoded field: bigints are 64-bit addresses, sizes and offsets; bytes are payload data. */
export type FieldValue = number | bigint | string | boolean | Uint8Array | FieldValue[] | { [key: string]: FieldValue };
export type Fields = { [key: string]: FieldValue };

/** Which end of the connection sent a message. */
export type Side = 'client' | 'server';

export interface MessageView {
  from: Side;
  /** 'invalid': the type bits are neither command nor reply. */
  type: 'command' | 'reply' | 'error' | 'invalid';
  id: number;
  /** The command number (of the request, for a reply). */
  command: number;
  name: string;
  /** The header's flags word as sent. */
  flags: number;
  /** A command sent with No_reply. */
  noReply: boolean;
  /** An error reply's errno. */
  errno?: number;
  size: number;
  fds: number;
  fields: Fields;
  /** Why the body could not be decoded, or what is odd about the message. */
  problem?: string;
  /** Carried on the twin socket rather than the main one. */
  twin?: boolean;
}

/** Names of the bits set in `value` (unknown ones in hex), e.g. 'READ|WRITE'. */
function bitNames(value: number, bits: Record<string, number>): string {
  const names: string[] = [];
  let rest = value;
  for (const [name, bit] of Object.entries(bits)) {
    if (bit !== 0 && (bit & (bit - 1)) === 0 && (value & bit) !== 0) {
      names.push(name);
      rest &= ~bit;
    }
  }
  if (rest !== 0) names.push(`0x${rest.toString(16)}`);
  return names.length === 0 ? '0' : names.join('|');
}

function nameOf(value: number, names: Record<string, number>): string | number {
  return Object.entries(names).find(([, n]) => n === value)?.[0] ?? value;
}

const region = (index: number) => nameOf(index, Region);
const irq = (index: number) => nameOf(index, IrqIndex);
const access = (a: RegionAccess): Fields => ({ region: region(a.region), offset: a.offset, count: a.count });

function version(payload: Buffer): Fields {
  const v = decodeVersion(payload);
  const fields: Fields = { version: `${v.major}.${v.minor}` };
  // What the peer sent, not the defaults filled in for absent keys.
  const caps = v.capabilities as unknown as Record<string, FieldValue>;
  for (const key of v.presentKeys) {
    const name = key.replace(/_(\w)/g, (_, c: string) => c.toUpperCase());
    fields[name] = caps[name];
  }
  if (v.unknownKeys.length > 0) fields.unknownKeys = v.unknownKeys;
  return fields;
}

const featureOps = { GET: DeviceFeatureFlags.GET, SET: DeviceFeatureFlags.SET, PROBE: DeviceFeatureFlags.PROBE };

function feature(f: DeviceFeature, isReplyData: boolean): Fields {
  const index = featureIndex(f.flags);
  const fields: Fields = { feature: nameOf(index, FeatureIndex), op: bitNames(f.flags & ~DeviceFeatureFlags.MASK, featureOps) };
  if (f.data.length === 0) return fields;
  switch (index) {
    case FeatureIndex.MIG_DEVICE_STATE:
      fields.state = nameOf(decodeMigDeviceState(f.data).deviceState, MigrationState);
      break;
    case FeatureIndex.MIGRATION:
      if (isReplyData) fields.migrationFlags = bitNames(Number(decodeMigrationFeature(f.data).flags), MigrationFlags);
      else fields.data = f.data;
      break;
    case FeatureIndex.DMA_LOGGING_START: {
      const start = decodeDmaLoggingStart(f.data);
      fields.pageSize = start.pageSize;
      fields.ranges = start.ranges.map((range) => ({ iova: range.iova, length: range.length }));
      break;
    }
    case FeatureIndex.DMA_LOGGING_REPORT:
      Object.assign(fields, isReplyData ? decodeDmaLoggingReportReply(f.data) : decodeDmaLoggingReportRequest(f.data));
      break;
    default:
      fields.data = f.data;
  }
  return fields;
}

interface BodyDecoders {
  request?(payload: Buffer): Fields;
  reply?(payload: Buffer): Fields;
}

const bodies: Record<number, BodyDecoders> = {
  [Command.VERSION]: { request: version, reply: version },
  [Command.DMA_MAP]: {
    request(p) {
      const m = decodeDmaMapRequest(p);
      return { flags: bitNames(m.flags, DmaMapFlags), address: m.address, size: m.size, offset: m.offset };
    },
  },
  [Command.DMA_UNMAP]: {
    request(p) {
      const u = decodeDmaUnmapRequest(p);
      return { flags: bitNames(u.flags, DmaUnmapFlags), address: u.address, size: u.size };
    },
    reply(p) {
      const u = decodeDmaUnmapReply(p);
      return { flags: bitNames(u.flags, DmaUnmapFlags), address: u.address, size: u.size, ...(u.bitmapData ? { bitmap: u.bitmapData } : {}) };
    },
  },
  [Command.DEVICE_GET_INFO]: {
    request: (p) => ({ argsz: decodeDeviceGetInfoRequest(p).argsz }),
    reply(p) {
      const d = decodeDeviceGetInfoReply(p);
      return { flags: bitNames(d.flags, DeviceInfoFlags), regions: d.numRegions, irqs: d.numIrqs };
    },
  },
  [Command.DEVICE_GET_REGION_INFO]: {
    request(p) {
      const r = decodeRegionInfoRequest(p);
      return { region: region(r.index), argsz: r.argsz };
    },
    reply(p) {
      const r = decodeRegionInfoReply(p);
      const fields: Fields = { region: region(r.index), flags: bitNames(r.flags, RegionInfoFlags), size: r.size, offset: r.offset, argsz: r.argsz };
      for (const cap of r.caps) {
        if (cap.id === RegionCapId.SPARSE_MMAP) fields.sparseMmap = cap.areas.map((area) => ({ offset: area.offset, size: area.size }));
        else fields.regionType = { type: cap.type, subtype: cap.subtype };
      }
      return fields;
    },
  },
  [Command.DEVICE_GET_REGION_IO_FDS]: {
    request(p) {
      const r = decodeRegionIoFdsRequest(p);
      return { region: region(r.index), argsz: r.argsz };
    },
    reply(p) {
      const r = decodeRegionIoFdsReply(p);
      return {
        region: region(r.index),
        count: r.count,
        entries: r.entries.map((e) => ({
          offset: e.offset,
          size: e.size,
          fdIndex: e.fdIndex,
          type: nameOf(e.type, IoFdType),
          flags: bitNames(e.flags, KvmIoeventfdFlags),
          datamatch: e.datamatch,
        })),
      };
    },
  },
  [Command.DEVICE_GET_IRQ_INFO]: {
    request: (p) => ({ index: irq(decodeIrqInfoRequest(p).index) }),
    reply(p) {
      const i = decodeIrqInfoReply(p);
      return { index: irq(i.index), count: i.count, flags: bitNames(i.flags, IrqInfoFlags) };
    },
  },
  [Command.DEVICE_SET_IRQS]: {
    request(p) {
      const s = decodeSetIrqsRequest(p);
      const names = { ...SetIrqsFlags, DATA_TYPE_MASK: 0, ACTION_TYPE_MASK: 0 };
      return { index: irq(s.index), flags: bitNames(s.flags, names), start: s.start, count: s.count, ...(s.bools ? { bools: s.bools } : {}) };
    },
  },
  [Command.REGION_READ]: {
    request: (p) => access(decodeRegionReadRequest(p)),
    reply(p) {
      const r = decodeRegionReadReply(p);
      return { ...access(r), data: r.data };
    },
  },
  [Command.REGION_WRITE]: {
    request(p) {
      const w = decodeRegionWriteRequest(p);
      return { ...access(w), data: w.data };
    },
    reply: (p) => access(decodeRegionWriteReply(p)),
  },
  [Command.DMA_READ]: {
    request: (p) => ({ ...decodeDmaReadRequest(p) }),
    reply: (p) => ({ ...decodeDmaReadReply(p) }),
  },
  [Command.DMA_WRITE]: {
    request: (p) => ({ ...decodeDmaWriteRequest(p) }),
    reply: (p) => ({ ...decodeDmaWriteReply(p) }),
  },
  [Command.REGION_WRITE_MULTI]: {
    request: (p) => ({ writes: decodeRegionWriteMultiRequest(p).map((w) => ({ ...access(w), data: w.data })) }),
    reply: (p) => ({ count: decodeRegionWriteMultiReply(p) }),
  },
  [Command.DEVICE_FEATURE]: {
    request: (p) => feature(decodeDeviceFeatureRequest(p), false),
    reply: (p) => feature(decodeDeviceFeatureReply(p), true),
  },
  [Command.MIG_DATA_READ]: {
    request: (p) => ({ size: decodeMigDataReadRequest(p).size }),
    reply(p) {
      const m = decodeMigDataReadReply(p);
      return { size: m.size, data: m.data };
    },
  },
  [Command.MIG_DATA_WRITE]: {
    request(p) {
      const m = decodeMigDataWriteRequest(p);
      return { size: m.size, data: m.data };
    },
  },
};

const other = (side: Side): Side => (side === 'client' ? 'server' : 'client');

/**
 * Describes the messages of one connection (one per socket: msg_ids of the
 * main and the twin socket are separate spaces). Remembers the command of
 * each request until its reply has been seen.
 */
export class MessageDescriber {
  /** Requests awaiting a reply, by the side that sent them: msg_id → command. */
  private readonly awaiting = { client: new Map<number, number>(), server: new Map<number, number>() };

  constructor(private readonly options: { twin?: boolean } = {}) {}

  /** `message` is a whole message, header included; `fds` how many fds came with it. */
  describe(from: Side, message: Buffer, fds: number): MessageView {
    const header = decodeHeader(message);
    const view: MessageView = {
      from,
      type: 'command',
      id: header.msgId,
      command: header.command,
      name: commandName(header.command),
      flags: header.flags,
      noReply: false,
      size: header.size,
      fds,
      fields: {},
      ...(this.options.twin ? { twin: true } : {}),
    };
    if (!isValidType(header.flags)) {
      view.type = 'invalid';
      view.problem = `message type ${header.flags & HeaderFlags.TYPE_MASK} is neither command nor reply`;
      return view;
    }
    const payload = message.subarray(HEADER_SIZE);
    if (isReply(header)) {
      const awaiting = this.awaiting[other(from)];
      const request = awaiting.get(header.msgId);
      awaiting.delete(header.msgId);
      if (request === undefined) view.problem = 'no request with this msg_id is awaiting a reply';
      else if (request !== header.command) view.problem = `answers ${commandName(request)} but says ${view.name}`;
      view.command = request ?? header.command;
      view.name = commandName(view.command);
      if (isErrorReply(header)) {
        view.type = 'error';
        view.errno = errorReplyErrno(header);
        return view;
      }
      view.type = 'reply';
      this.decode(view, bodies[view.command]?.reply, payload);
      return view;
    }
    view.noReply = (header.flags & HeaderFlags.NO_REPLY) !== 0;
    if (!view.noReply) this.awaiting[from].set(header.msgId, header.command);
    this.decode(view, bodies[view.command]?.request, payload);
    return view;
  }

  private decode(view: MessageView, decoder: ((payload: Buffer) => Fields) | undefined, payload: Buffer): void {
    if (decoder === undefined) {
      if (payload.length > 0) view.fields = { payload };
      return;
    }
    try {
      view.fields = decoder(payload);
    } catch (error) {
      view.problem = `undecodable body: ${(error as Error).message}`;
      view.fields = { payload };
    }
  }
}

// ---- formatting ----

/** Bytes shown in a text line before the rest is elided. */
const TEXT_BYTES = 16;
/** Bytes of hex in a JSON line before the rest is elided. */
const JSON_BYTES = 256;

const hex = (bytes: Uint8Array, max: number): string => Buffer.from(bytes.subarray(0, max)).toString('hex');

function textValue(value: FieldValue): string {
  if (typeof value === 'bigint') return `0x${value.toString(16)}`;
  if (value instanceof Uint8Array) {
    return value.length <= TEXT_BYTES ? hex(value, TEXT_BYTES) || '(none)' : `[${value.length} bytes] ${hex(value, TEXT_BYTES)}…`;
  }
  if (Array.isArray(value)) return `[${value.map(textValue).join(', ')}]`;
  if (typeof value === 'object') return `{${Object.entries(value).map(([k, v]) => `${k}=${textValue(v)}`).join(' ')}}`;
  return String(value);
}

const ansi = (code: number) => (text: string) => `\x1b[${code}m${text}\x1b[0m`;
const plain = (text: string) => text;

/** One line: `client→server REGION_READ #3 region=CONFIG offset=0x0 count=4`. */
export function formatMessage(view: MessageView, options: { color?: boolean } = {}): string {
  const c = options.color;
  const dim = c ? ansi(2) : plain;
  const name = c ? ansi(view.type === 'command' ? 36 : view.type === 'reply' ? 32 : 31) : plain;
  const warn = c ? ansi(33) : plain;
  const kind = view.type === 'command' ? '' : ` ${view.type === 'error' ? 'error' : view.type}`;
  const parts = [dim(`${view.twin ? 'twin ' : ''}${view.from}→${other(view.from)}`), name(`${view.name}${kind}`), `#${view.id}`];
  if (view.noReply) parts.push('no-reply');
  if (view.errno !== undefined) parts.push(name(`${errnoName(view.errno)} (${view.errno})`));
  for (const [key, value] of Object.entries(view.fields)) parts.push(`${dim(`${key}=`)}${textValue(value)}`);
  if (view.fds > 0) parts.push(`${dim('fds=')}${view.fds}`);
  if (view.problem) parts.push(warn(`(${view.problem})`));
  return parts.join(' ');
}

function jsonValue(value: FieldValue): unknown {
  if (typeof value === 'bigint') return `0x${value.toString(16)}`;
  if (value instanceof Uint8Array) return { bytes: value.length, hex: hex(value, JSON_BYTES), ...(value.length > JSON_BYTES ? { elided: true } : {}) };
  if (Array.isArray(value)) return value.map(jsonValue);
  if (typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, jsonValue(v)]));
  return value;
}

/**
 * A plain object for JSON.stringify: 64-bit values as "0x..." strings,
 * payload bytes as { bytes, hex } (hex of at most 256 bytes; `elided` when cut).
 */
export function messageJson(view: MessageView): Record<string, unknown> {
  return {
    from: view.from,
    to: other(view.from),
    ...(view.twin ? { socket: 'twin' } : {}),
    type: view.type,
    id: view.id,
    command: view.name,
    flags: view.flags,
    ...(view.noReply ? { noReply: true } : {}),
    ...(view.errno !== undefined ? { errno: view.errno, error: errnoName(view.errno) } : {}),
    size: view.size,
    fds: view.fds,
    fields: jsonValue(view.fields),
    ...(view.problem ? { problem: view.problem } : {}),
  };
}
