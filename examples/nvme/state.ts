/**
 * The controller's migration state: what saveState writes (JSON, 64-bit
 * addresses as decimal strings), and the checks a loaded one passes before
 * anything of it is applied. The state comes from a client, so it is input
 * like any other: whatever this controller could not have saved itself (a
 * queue past CAP.MQES, a head past its ring, an SQ on a missing CQ, a
 * vector past MSI-X, a reserved register bit) is refused with an
 * NvmeStateError, and the device stays as it was.
 */
import { Command, Errno, ProtocolError } from 'vfio-user';
import { AER_LIMIT, FEATURE_BITS, MAX_IO_QUEUES, MAX_QUEUE_ENTRIES, VECTORS, type ErrorEntry } from './admin.js';
import { PAGE_SIZE } from './command.js';

export const STATE_VERSION = 3;

export interface CompletionQueueState {
  id: number;
  base: string;
  size: number;
  head: number;
  tail: number;
  phase: number;
  vector: number;
  interrupts: boolean;
}

export interface SubmissionQueueState {
  id: number;
  base: string;
  size: number;
  head: number;
  tail: number;
  cq: number;
}

export interface SavedState {
  version: typeof STATE_VERSION;
  registers: { cc: number; csts: number; aqa: number; asq: string; acq: string; intms: number };
  features: {
    values: [number, number][];
    temperature: { over: number; under: number };
    coalescingDisabled: number;
    ioQueues: number;
  };
  cqs: CompletionQueueState[];
  sqs: SubmissionQueueState[];
  events: { requests: number[]; aborted: number[]; queued: number[]; masked: number[] };
  errors: ErrorEntry[];
  errorCount: number;
  smart: { blocksRead: number; blocksWritten: number; readCommands: number; writeCommands: number };
  /** Doorbell Buffer Config's pages, when the host set them. */
  shadowDoorbells: { shadow: string; eventIdx: string } | null;
}

/**
 * Migration state this controller refuses to load; the message says which
 * value and why. A ProtocolError: the client's bad input is refused (EINVAL
 * for the state transition that loads it), not a failure of the device.
 */
export class NvmeStateError extends ProtocolError {
  constructor(why: string) {
    super(Errno.EINVAL, Command.DEVICE_FEATURE, `NVMe controller state refused: ${why}`);
    this.name = 'NvmeStateError';
  }
}

/** What a loaded state is checked against: the destination's own configuration. */
export interface StateLimits {
  /** CC bits a host may set. */
  ccWritable: number;
  /** CSTS bits the controller sets. */
  cstsBits: number;
  /** CSTS.RDY: the admin queues exist exactly when it is set. */
  ready: number;
  /** Whether Doorbell Buffer Config is offered here. */
  shadowDoorbells: boolean;
  /** Error Information entries kept. */
  errorsKept: number;
}

const U16 = 0xffff;
const U32 = 0xffffffff;
/** AQA's 12-bit 0-based sizes. */
const MAX_ADMIN_ENTRIES = 4096;
const MAX_QUEUED_EVENTS = 16;
/** Completion status: Status Code Type and Status Code, 11 bits. */
const MAX_STATUS = 0x7ff;

function fail(why: string): never {
  throw new NvmeStateError(why);
}

function record(value: unknown, what: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(`${what} is not an object`);
  return value as Record<string, unknown>;
}

function list(value: unknown, max: number, what: string): unknown[] {
  if (!Array.isArray(value) || value.length > max) fail(`${what} is not a list of at most ${max}`);
  return value;
}

function int(value: unknown, min: number, max: number, what: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) fail(`${what} is ${JSON.stringify(value)}, not an integer in [${min}, ${max}]`);
  return value;
}

function bits(value: unknown, allowed: number, what: string): number {
  const n = int(value, 0, U32, what);
  if ((n & ~allowed) !== 0) fail(`${what} 0x${n.toString(16)} sets bits outside 0x${(allowed >>> 0).toString(16)}`);
  return n;
}

/** A guest address that starts a page, as a decimal string. */
function pageAddress(value: unknown, what: string): bigint {
  if (typeof value !== 'string' || !/^\d{1,20}$/.test(value)) fail(`${what} is not a decimal address`);
  const address = BigInt(value);
  if (address >= 1n << 64n || address % BigInt(PAGE_SIZE) !== 0n) fail(`${what} 0x${address.toString(16)} is not a page-aligned 64-bit address`);
  return address;
}

function unique(ids: number[], what: string): void {
  if (new Set(ids).size !== ids.length) fail(`${what} repeat`);
}

/** Parses and checks `data` as this controller's state; throws NvmeStateError on anything it could not have saved. */
export function parseState(data: Uint8Array, limits: StateLimits): SavedState {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString());
  } catch (error) {
    fail(`not JSON (${(error as Error).message})`);
  }
  const state = record(json, 'the state');
  if (state.version !== STATE_VERSION) fail(`version ${JSON.stringify(state.version)}, not ${STATE_VERSION}`);

  const r = record(state.registers, 'registers');
  const registers = {
    cc: bits(r.cc, limits.ccWritable, 'CC'),
    csts: bits(r.csts, limits.cstsBits, 'CSTS'),
    aqa: bits(r.aqa, 0x0fff0fff, 'AQA'),
    asq: pageAddress(r.asq, 'ASQ').toString(),
    acq: pageAddress(r.acq, 'ACQ').toString(),
    intms: int(r.intms, 0, U32, 'INTMS'),
  };

  const f = record(state.features, 'features');
  const values = list(f.values, FEATURE_BITS.size, 'feature values').map((entry, i) => {
    const pair = list(entry, 2, `feature value ${i}`);
    const fid = int(pair[0], 0, 0xff, `feature value ${i}'s FID`);
    const allowed = FEATURE_BITS.get(fid);
    if (allowed === undefined) fail(`feature 0x${fid.toString(16)} is not one kept as a value`);
    return [fid, bits(pair[1], allowed, `feature 0x${fid.toString(16)}`)] as [number, number];
  });
  unique(values.map(([fid]) => fid), 'feature values');
  if (values.length !== FEATURE_BITS.size) fail(`${values.length} feature values, not ${FEATURE_BITS.size}`);
  const temperature = record(f.temperature, 'temperature thresholds');
  const ioQueues = int(f.ioQueues, 1, MAX_IO_QUEUES, 'Number of Queues');
  const features = {
    values,
    temperature: { over: int(temperature.over, 0, U16, 'over-temperature threshold'), under: int(temperature.under, 0, U16, 'under-temperature threshold') },
    coalescingDisabled: int(f.coalescingDisabled, 0, U32, 'Interrupt Vector Configuration'),
    ioQueues,
  };

  // Queues: the admin pair exactly while CSTS.RDY is set, as AQA/ASQ/ACQ made them; I/O queues within the pairs allocated.
  const ready = (registers.csts & limits.ready) !== 0;
  const adminSizes = { sq: (registers.aqa & 0xfff) + 1, cq: ((registers.aqa >>> 16) & 0xfff) + 1 };
  const queue = (value: unknown, what: string) => {
    const q = record(value, what);
    const id = int(q.id, 0, ioQueues, `${what}'s ID`);
    const size = int(q.size, 2, id === 0 ? MAX_ADMIN_ENTRIES : MAX_QUEUE_ENTRIES, `${what} ${id}'s size`);
    return {
      q, id, size,
      base: pageAddress(q.base, `${what} ${id}'s base`).toString(),
      head: int(q.head, 0, size - 1, `${what} ${id}'s head`),
      tail: int(q.tail, 0, size - 1, `${what} ${id}'s tail`),
    };
  };
  const cqs = list(state.cqs, ioQueues + 1, 'CQs').map((value): CompletionQueueState => {
    const { q, id, size, base, head, tail } = queue(value, 'CQ');
    const vector = int(q.vector, 0, VECTORS - 1, `CQ ${id}'s vector`);
    if (typeof q.interrupts !== 'boolean') fail(`CQ ${id}'s interrupts is not a boolean`);
    if (id === 0 && (base !== registers.acq || size !== adminSizes.cq || vector !== 0 || !q.interrupts)) fail('the admin CQ is not the one ACQ and AQA describe');
    return { id, base, size, head, tail, phase: int(q.phase, 0, 1, `CQ ${id}'s phase`), vector, interrupts: q.interrupts };
  });
  unique(cqs.map((q) => q.id), 'CQ IDs');
  const sqs = list(state.sqs, ioQueues + 1, 'SQs').map((value): SubmissionQueueState => {
    const { q, id, size, base, head, tail } = queue(value, 'SQ');
    const cq = int(q.cq, 0, ioQueues, `SQ ${id}'s CQ`);
    if ((id === 0) !== (cq === 0) || !cqs.some((c) => c.id === cq)) fail(`SQ ${id} is on CQ ${cq}`);
    if (id === 0 && (base !== registers.asq || size !== adminSizes.sq)) fail('the admin SQ is not the one ASQ and AQA describe');
    return { id, base, size, head, tail, cq };
  });
  unique(sqs.map((q) => q.id), 'SQ IDs');
  const admin = cqs.some((q) => q.id === 0) && sqs.some((q) => q.id === 0);
  if (ready && !admin) fail('CSTS.RDY is set without admin queues');
  if (!ready && (cqs.length > 0 || sqs.length > 0)) fail('queues exist while CSTS.RDY is clear');

  const e = record(state.events, 'events');
  const u16s = (value: unknown, max: number, what: string) => list(value, max, what).map((v, i) => int(v, 0, U16, `${what} ${i}`));
  const events = {
    requests: u16s(e.requests, AER_LIMIT, 'outstanding event requests'),
    aborted: u16s(e.aborted, AER_LIMIT, 'aborted event requests'),
    queued: list(e.queued, MAX_QUEUED_EVENTS, 'queued events').map((v, i) => bits(v, 0xffff07, `queued event ${i}`)),
    masked: list(e.masked, 8, 'masked event types').map((v, i) => int(v, 0, 7, `masked event type ${i}`)),
  };
  unique(events.requests, 'outstanding event requests');
  unique(events.masked, 'masked event types');
  if (!ready && (events.requests.length > 0 || events.aborted.length > 0)) fail('event requests are outstanding while CSTS.RDY is clear');

  const errorCount = int(state.errorCount, 0, Number.MAX_SAFE_INTEGER, 'error count');
  const errors = list(state.errors, limits.errorsKept, 'errors').map((value, i): ErrorEntry => {
    const entry = record(value, `error ${i}`);
    return {
      count: int(entry.count, 1, errorCount, `error ${i}'s count`),
      sqid: int(entry.sqid, 0, MAX_IO_QUEUES, `error ${i}'s SQ`),
      cid: int(entry.cid, 0, U16, `error ${i}'s CID`),
      status: int(entry.status, 1, MAX_STATUS, `error ${i}'s status`),
    };
  });

  const s = record(state.smart, 'SMART counters');
  const counter = (name: string) => int(s[name], 0, Number.MAX_SAFE_INTEGER, `SMART ${name}`);
  const smart = { blocksRead: counter('blocksRead'), blocksWritten: counter('blocksWritten'), readCommands: counter('readCommands'), writeCommands: counter('writeCommands') };

  let shadowDoorbells: SavedState['shadowDoorbells'] = null;
  if (state.shadowDoorbells !== null) {
    if (!limits.shadowDoorbells) fail('shadow doorbells are set, and this controller does not offer them');
    if (!ready) fail('shadow doorbells are set while CSTS.RDY is clear');
    const pages = record(state.shadowDoorbells, 'shadow doorbells');
    shadowDoorbells = { shadow: pageAddress(pages.shadow, 'the shadow doorbell page').toString(), eventIdx: pageAddress(pages.eventIdx, 'the EventIdx page').toString() };
  }

  return { version: STATE_VERSION, registers, features, cqs, sqs, events, errors, errorCount, smart, shadowDoorbells };
}
