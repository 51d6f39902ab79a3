/**
 * Admin commands (§5): Identify, queue creation and deletion, features,
 * log pages, asynchronous events, Abort and Doorbell Buffer Config.
 * Anything else (Keep Alive included: KAS is 0) is an Invalid Command
 * Opcode; a bad field gets the status the spec names for it.
 */
import { checkFlags, checkTransfer, CommandError, DEFERRED, MDTS, PAGE_SIZE, prpSegments, Status, writeSegments, type Command } from './command.js';
import type { NvmeController } from './controller.js';
import { ALL_NAMESPACES, BLOCK_SHIFT, NAMESPACE_ID } from './io.js';
import { CompletionQueue, SubmissionQueue } from './queues.js';
import { ShadowDoorbells } from './shadow.js';

export const AdminOpcode = {
  DELETE_IO_SQ: 0x00,
  CREATE_IO_SQ: 0x01,
  GET_LOG_PAGE: 0x02,
  DELETE_IO_CQ: 0x04,
  CREATE_IO_CQ: 0x05,
  IDENTIFY: 0x06,
  ABORT: 0x08,
  SET_FEATURES: 0x09,
  GET_FEATURES: 0x0a,
  ASYNC_EVENT_REQUEST: 0x0c,
  DOORBELL_BUFFER_CONFIG: 0x7c,
} as const;

/** The features offered: the mandatory ones of NVMe 1.4 (§5.21.1) and the volatile write cache. */
export const Feature = {
  ARBITRATION: 0x01,
  POWER_MANAGEMENT: 0x02,
  TEMPERATURE_THRESHOLD: 0x04,
  ERROR_RECOVERY: 0x05,
  VOLATILE_WRITE_CACHE: 0x06,
  NUMBER_OF_QUEUES: 0x07,
  INTERRUPT_COALESCING: 0x08,
  INTERRUPT_VECTOR_CONFIG: 0x09,
  WRITE_ATOMICITY: 0x0a,
  ASYNC_EVENT_CONFIG: 0x0b,
} as const;

export const LogPage = { ERROR: 0x01, SMART: 0x02, FIRMWARE_SLOT: 0x03 } as const;

/** Asynchronous event types and the information codes used here (§5.2). */
export const AsyncEvent = {
  ERROR: 0,
  INVALID_DOORBELL_REGISTER: 0x00,
  INVALID_DOORBELL_VALUE: 0x01,
} as const;

/** Red Hat's QEMU vendor ID (the device ID is ours: see controller.ts). */
export const VENDOR_ID = 0x1b36;
/** I/O queue pairs besides the admin pair; one MSI-X vector each, plus the admin queue's. */
export const MAX_IO_QUEUES = 31;
/** MSI-X vectors: the admin CQ's and one per I/O CQ. */
export const VECTORS = MAX_IO_QUEUES + 1;
/** CAP.MQES + 1: the largest queue. */
export const MAX_QUEUE_ENTRIES = 1024;
/** AERL + 1 and ACL + 1. */
export const AER_LIMIT = 4;
const ABORT_LIMIT = 4;
const ERROR_LOG_ENTRIES = 16;
const IDENTIFY_SIZE = 4096;
/** OACS bit 8: Doorbell Buffer Config is supported. */
const OACS_DOORBELL_BUFFER_CONFIG = 1 << 8;
/** LPA bit 2: Get Log Page takes NUMDU and LPOL/LPOU (extended data). */
const LPA_EXTENDED_DATA = 1 << 2;
const LOG_PAGE_SIZE = 512;
const FIRMWARE_REVISION = '1.0';
/** 40 °C and the default over-temperature threshold, in kelvins. */
const TEMPERATURE = 313;
const OVER_TEMPERATURE = 343;

/** Features whose value is one dword, as Set Features stores it, and their defaults. */
const SINGLE_DWORD_DEFAULTS: ReadonlyArray<[number, number]> = [
  [Feature.ARBITRATION, 0],
  [Feature.POWER_MANAGEMENT, 0],
  [Feature.ERROR_RECOVERY, 0],
  [Feature.VOLATILE_WRITE_CACHE, 1],
  [Feature.INTERRUPT_COALESCING, 0],
  [Feature.WRITE_ATOMICITY, 0],
  [Feature.ASYNC_EVENT_CONFIG, 0],
];

/**
 * The bits of each single-dword feature a host may set (the rest are
 * reserved, or name what this controller does not do: DULBE, event notices
 * it never sends): a value with others set is Invalid Field.
 */
export const FEATURE_BITS: ReadonlyMap<number, number> = new Map([
  [Feature.ARBITRATION, 0xffffff07], // AB, LPW, MPW, HPW
  [Feature.POWER_MANAGEMENT, 0x000000e0], // WH; PS 0 only (NPSS 0)
  [Feature.ERROR_RECOVERY, 0x0000ffff], // TLER
  [Feature.VOLATILE_WRITE_CACHE, 0x00000001], // WCE
  [Feature.INTERRUPT_COALESCING, 0x0000ffff], // THR, TIME
  [Feature.WRITE_ATOMICITY, 0x00000001], // DN
  [Feature.ASYNC_EVENT_CONFIG, 0x000000ff], // SMART / Health critical warnings
]);

/** The values Set Features stores; Number of Queues is the pairs allocated (1-based here). */
export class Features {
  values = new Map<number, number>(SINGLE_DWORD_DEFAULTS);
  /** Temperature Threshold of the composite sensor (the only one), kelvins. */
  temperature = { over: OVER_TEMPERATURE, under: 0 };
  /** Interrupt Vector Configuration: bit v set when vector v has coalescing disabled (CD). */
  coalescingDisabled = 0;
  ioQueues = MAX_IO_QUEUES;

  reset(): void {
    this.values = new Map(SINGLE_DWORD_DEFAULTS);
    this.temperature = { over: OVER_TEMPERATURE, under: 0 };
    this.coalescingDisabled = 0;
    this.ioQueues = MAX_IO_QUEUES;
  }

  get writeCacheEnabled(): boolean {
    return (this.values.get(Feature.VOLATILE_WRITE_CACHE)! & 1) === 1;
  }
}

/** A completed command that failed, for the Error Information log. */
export interface ErrorEntry {
  count: number;
  sqid: number;
  cid: number;
  status: number;
}

const ADMIN_OPCODES: ReadonlySet<number> = new Set(Object.values(AdminOpcode));

export function executeAdmin(ctrl: NvmeController, command: Command): number | Promise<number> {
  const op = command.opcode;
  if (!ADMIN_OPCODES.has(op) || (op === AdminOpcode.DOORBELL_BUFFER_CONFIG && !ctrl.offersShadowDoorbells)) return Status.INVALID_OPCODE;
  checkFlags(command);
  switch (op) {
    case AdminOpcode.IDENTIFY: return identify(ctrl, command);
    case AdminOpcode.CREATE_IO_CQ: return createCompletionQueue(ctrl, command);
    case AdminOpcode.CREATE_IO_SQ: return createSubmissionQueue(ctrl, command);
    case AdminOpcode.DELETE_IO_SQ: return deleteSubmissionQueue(ctrl, command);
    case AdminOpcode.DELETE_IO_CQ: return deleteCompletionQueue(ctrl, command);
    case AdminOpcode.GET_FEATURES: return getFeatures(ctrl, command);
    case AdminOpcode.SET_FEATURES: return setFeatures(ctrl, command);
    case AdminOpcode.GET_LOG_PAGE: return getLogPage(ctrl, command);
    case AdminOpcode.ASYNC_EVENT_REQUEST:
      if (ctrl.events.requests.length >= AER_LIMIT) return Status.AER_LIMIT_EXCEEDED;
      ctrl.events.requests.push(command.cid);
      return DEFERRED;
    case AdminOpcode.ABORT: return abort(ctrl, command);
    default: return doorbellBufferConfig(ctrl, command);
  }
}

/**
 * Abort (§5.1): an Asynchronous Event Request is completed as Aborted by
 * Request, and dword 0 bit 0 clear says so; for any other command it is set
 * (not aborted): the rest run to completion as they are fetched, or, once
 * their store operation has started, when it finishes. An SQID that names no queue is
 * Invalid Field, as QEMU answers.
 */
function abort(ctrl: NvmeController, command: Command): number {
  const sqid = command.dw(10) & 0xffff;
  const cid = command.dw(10) >>> 16;
  if (!ctrl.sqs[sqid]) return Status.INVALID_FIELD;
  command.result = 1;
  if (sqid === 0 && ctrl.events.abort(cid)) command.result = 0;
  return Status.SUCCESS;
}

// ---- Identify (§5.15) ----

const Cns = { NAMESPACE: 0x00, CONTROLLER: 0x01, ACTIVE_NAMESPACES: 0x02, NAMESPACE_DESCRIPTORS: 0x03, COMMAND_SET_CONTROLLER: 0x06 } as const;

function identify(ctrl: NvmeController, command: Command): number {
  const cns = command.dw(10) & 0xff;
  let data: Buffer;
  switch (cns) {
    case Cns.CONTROLLER: data = identifyController(ctrl); break;
    case Cns.NAMESPACE:
      if (command.nsid !== NAMESPACE_ID) return Status.INVALID_NAMESPACE;
      data = identifyNamespace(ctrl);
      break;
    case Cns.ACTIVE_NAMESPACES:
      data = Buffer.alloc(IDENTIFY_SIZE);
      // Namespace IDs greater than the one given; 0xFFFFFFFE and up are invalid here.
      if (command.nsid >= 0xfffffffe) return Status.INVALID_NAMESPACE;
      if (command.nsid < NAMESPACE_ID) data.writeUInt32LE(NAMESPACE_ID, 0);
      break;
    case Cns.NAMESPACE_DESCRIPTORS:
      if (command.nsid !== NAMESPACE_ID) return Status.INVALID_NAMESPACE;
      data = namespaceDescriptors(ctrl);
      break;
    case Cns.COMMAND_SET_CONTROLLER:
      // The NVM command set's controller limits (CSI 0): all zeros, no limits beyond MDTS.
      if (command.dw(11) >>> 24 !== 0) return Status.INVALID_FIELD;
      data = Buffer.alloc(IDENTIFY_SIZE);
      break;
    default:
      return Status.INVALID_FIELD;
  }
  writeSegments(ctrl.dma, prpSegments(ctrl.dma, command, IDENTIFY_SIZE), data);
  return Status.SUCCESS;
}

function ascii(into: Buffer, offset: number, length: number, text: string): void {
  into.fill(0x20, offset, offset + length);
  into.write(text.slice(0, length), offset, 'ascii');
}

function identifyController(ctrl: NvmeController): Buffer {
  const d = Buffer.alloc(IDENTIFY_SIZE);
  d.writeUInt16LE(VENDOR_ID, 0); // VID
  d.writeUInt16LE(VENDOR_ID, 2); // SSVID
  ascii(d, 4, 20, ctrl.serial); // SN
  ascii(d, 24, 40, 'vfio-user TypeScript NVMe'); // MN
  ascii(d, 64, 8, FIRMWARE_REVISION); // FR
  d[72] = 6; // RAB
  d[77] = MDTS;
  d.writeUInt16LE(0, 78); // CNTLID
  d.writeUInt32LE(0x00010400, 80); // VER 1.4
  d[111] = 1; // CNTRLTYPE: I/O controller
  d.writeUInt16LE(ctrl.offersShadowDoorbells ? OACS_DOORBELL_BUFFER_CONFIG : 0, 256); // OACS
  d[258] = ABORT_LIMIT - 1; // ACL
  d[259] = AER_LIMIT - 1; // AERL
  d[260] = 0x03; // FRMW: one slot, read-only
  d[261] = LPA_EXTENDED_DATA; // LPA
  d[262] = ERROR_LOG_ENTRIES - 1; // ELPE
  d.writeUInt16LE(OVER_TEMPERATURE, 266); // WCTEMP
  d.writeUInt16LE(OVER_TEMPERATURE + 20, 268); // CCTEMP
  // KAS (320) 0: Keep Alive is not supported (optional over PCIe; nothing here would act on a missed one).
  d[512] = 0x66; // SQES: 64 bytes
  d[513] = 0x44; // CQES: 16 bytes
  d.writeUInt16LE(MAX_QUEUE_ENTRIES, 514); // MAXCMD
  d.writeUInt32LE(1, 516); // NN
  d.writeUInt16LE(0x000c, 520); // ONCS: Dataset Management, Write Zeroes
  d[525] = 0x07; // VWC: a volatile write cache (the page cache), flushed by Flush, also with the broadcast NSID
  d.write(`nqn.2026-12.io.github.vfio-user:nvme:${ctrl.serial}`, 768, 'ascii'); // SUBNQN
  return d;
}

function identifyNamespace(ctrl: NvmeController): Buffer {
  const d = Buffer.alloc(IDENTIFY_SIZE);
  const blocks = BigInt(ctrl.blocks);
  d.writeBigUInt64LE(blocks, 0); // NSZE
  d.writeBigUInt64LE(blocks, 8); // NCAP
  d.writeBigUInt64LE(blocks, 16); // NUSE
  d[25] = 0; // NLBAF: one format
  d[26] = 0; // FLBAS: format 0
  d[33] = 0x01; // DLFEAT: deallocated blocks read as zeros
  ctrl.nguid.copy(d, 104); // NGUID
  d.writeUInt32LE(BLOCK_SHIFT << 16, 128); // LBAF0: no metadata, 2^9-byte blocks
  return d;
}

function namespaceDescriptors(ctrl: NvmeController): Buffer {
  const d = Buffer.alloc(IDENTIFY_SIZE);
  // NIDT 2 (NGUID) and 3 (UUID), 16 bytes each.
  d[0] = 2; d[1] = 16; ctrl.nguid.copy(d, 4);
  d[20] = 3; d[21] = 16; ctrl.nguid.copy(d, 24);
  return d;
}

// ---- Queues (§5.3-5.7) ----

/** Create I/O CQ and SQ: QID within the pairs allocated, QSIZE within CAP.MQES, PC set (CAP.CQR), the ring starting a page. */
function queueIdAndSize(ctrl: NvmeController, command: Command): { id: number; size: number } {
  const id = command.dw(10) & 0xffff;
  const size = (command.dw(10) >>> 16) + 1;
  if (id === 0 || id > ctrl.features.ioQueues) throw new CommandError(Status.INVALID_QUEUE_ID, `queue ${id} is not one of the ${ctrl.features.ioQueues} allocated`);
  if (size < 2 || size > MAX_QUEUE_ENTRIES) throw new CommandError(Status.INVALID_QUEUE_SIZE, `${size} entries`);
  if ((command.dw(11) & 1) === 0) throw new CommandError(Status.INVALID_FIELD, 'queues must be physically contiguous');
  if ((command.prp1 & BigInt(PAGE_SIZE - 1)) !== 0n) throw new CommandError(Status.PRP_OFFSET_INVALID, 'a queue starts on a page');
  return { id, size };
}

function createCompletionQueue(ctrl: NvmeController, command: Command): number {
  const { id, size } = queueIdAndSize(ctrl, command);
  if (ctrl.cqs[id]) return Status.INVALID_QUEUE_ID;
  const vector = command.dw(11) >>> 16;
  if (vector >= VECTORS) return Status.INVALID_INTERRUPT_VECTOR;
  ctrl.addCompletionQueue(new CompletionQueue(id, command.prp1, size, vector, (command.dw(11) & 2) !== 0));
  return Status.SUCCESS;
}

function createSubmissionQueue(ctrl: NvmeController, command: Command): number {
  const { id, size } = queueIdAndSize(ctrl, command);
  if (ctrl.sqs[id]) return Status.INVALID_QUEUE_ID;
  const cqid = command.dw(11) >>> 16;
  const cq = ctrl.cqs[cqid];
  if (cqid === 0 || !cq) return Status.COMPLETION_QUEUE_INVALID;
  ctrl.addSubmissionQueue(new SubmissionQueue(id, command.prp1, size, cq));
  return Status.SUCCESS;
}

function deleteSubmissionQueue(ctrl: NvmeController, command: Command): number {
  const id = command.dw(10) & 0xffff;
  if (id === 0 || !ctrl.sqs[id]) return Status.INVALID_QUEUE_ID;
  ctrl.deleteSubmissionQueue(id);
  return Status.SUCCESS;
}

function deleteCompletionQueue(ctrl: NvmeController, command: Command): number {
  const id = command.dw(10) & 0xffff;
  const cq = ctrl.cqs[id];
  if (id === 0 || !cq) return Status.INVALID_QUEUE_ID;
  if (cq.submissionQueues.size > 0) return Status.INVALID_QUEUE_DELETION;
  ctrl.deleteCompletionQueue(id);
  return Status.SUCCESS;
}

// ---- Doorbell Buffer Config (§5.7) ----

/** PRP1 is the shadow doorbell page, PRP2 the EventIdx page: both page aligned, both guest memory. */
function doorbellBufferConfig(ctrl: NvmeController, command: Command): number {
  const shadow = command.prp1;
  const eventIdx = command.prp2;
  if (shadow % BigInt(PAGE_SIZE) !== 0n || eventIdx % BigInt(PAGE_SIZE) !== 0n) return Status.INVALID_FIELD;
  return ctrl.useShadowDoorbells(new ShadowDoorbells(() => ctrl.dma, shadow, eventIdx)) ? Status.SUCCESS : Status.DATA_TRANSFER_ERROR;
}

// ---- Features (§5.21, §5.9) ----

const Select = { CURRENT: 0, DEFAULT: 1, SAVED: 2, CAPABILITIES: 3 } as const;
/** Supported capabilities (SEL 3): changeable, not saveable; bit 1 when namespace specific. */
const CHANGEABLE = 0x4;
const NAMESPACE_SPECIFIC = 0x2;
/** Temperature Threshold's fields (dword 11): TMPTH 15:0, TMPSEL 19:16, THSEL 21:20. */
const TMPSEL_COMPOSITE = 0x0;
const TMPSEL_ALL = 0xf;
const THSEL_OVER = 0;
const THSEL_UNDER = 1;
/** Interrupt Vector Configuration's CD bit: coalescing disabled for the vector in bits 15:0. */
const COALESCING_DISABLED = 1 << 16;

/**
 * Error Recovery is per namespace (§5.21.1.5): Get names namespace 1, Set
 * namespace 1 or all of them. The other features are the controller's:
 * NSID 0 or the broadcast NSID, and namespace 1 is Feature Not Namespace
 * Specific. Any other NSID is Invalid Namespace.
 */
function checkFeatureNamespace(fid: number, nsid: number, set: boolean): number {
  if (fid === Feature.ERROR_RECOVERY) return nsid === NAMESPACE_ID || (set && nsid === ALL_NAMESPACES) ? Status.SUCCESS : Status.INVALID_NAMESPACE;
  if (nsid === 0 || nsid === ALL_NAMESPACES) return Status.SUCCESS;
  return nsid === NAMESPACE_ID ? Status.FEATURE_NOT_NAMESPACE_SPECIFIC : Status.INVALID_NAMESPACE;
}

function isFeature(fid: number): boolean {
  return FEATURE_BITS.has(fid) || fid === Feature.TEMPERATURE_THRESHOLD || fid === Feature.NUMBER_OF_QUEUES || fid === Feature.INTERRUPT_VECTOR_CONFIG;
}

function getFeatures(ctrl: NvmeController, command: Command): number {
  const fid = command.dw(10) & 0xff;
  const select = (command.dw(10) >>> 8) & 7;
  if (!isFeature(fid) || select > Select.CAPABILITIES) return Status.INVALID_FIELD;
  const nsid = checkFeatureNamespace(fid, command.nsid, false);
  if (nsid !== Status.SUCCESS) return nsid;
  if (select === Select.CAPABILITIES) {
    command.result = CHANGEABLE | (fid === Feature.ERROR_RECOVERY ? NAMESPACE_SPECIFIC : 0);
    return Status.SUCCESS;
  }
  // Nothing is saveable: the saved value is the default.
  const features = select === Select.CURRENT ? ctrl.features : new Features();
  const dw11 = command.dw(11);
  switch (fid) {
    case Feature.NUMBER_OF_QUEUES:
      command.result = (features.ioQueues - 1) * 0x10001;
      break;
    case Feature.TEMPERATURE_THRESHOLD: {
      const sensor = (dw11 >>> 16) & 0xf;
      const threshold = (dw11 >>> 20) & 3;
      if (threshold > THSEL_UNDER || (sensor !== TMPSEL_COMPOSITE && sensor !== TMPSEL_ALL)) return Status.INVALID_FIELD;
      command.result = threshold === THSEL_OVER ? features.temperature.over : features.temperature.under;
      break;
    }
    case Feature.INTERRUPT_VECTOR_CONFIG: {
      const vector = dw11 & 0xffff;
      if (vector >= VECTORS) return Status.INVALID_FIELD;
      // The admin CQ's vector is never coalesced.
      const disabled = vector === 0 || ((features.coalescingDisabled >>> vector) & 1) === 1;
      command.result = vector | (disabled ? COALESCING_DISABLED : 0);
      break;
    }
    default:
      command.result = features.values.get(fid)!;
  }
  return Status.SUCCESS;
}

function setFeatures(ctrl: NvmeController, command: Command): number | Promise<number> {
  const fid = command.dw(10) & 0xff;
  const value = command.dw(11);
  if (!isFeature(fid)) return Status.INVALID_FIELD;
  if (command.dw(10) & 0x80000000) return Status.FEATURE_NOT_SAVEABLE;
  const nsid = checkFeatureNamespace(fid, command.nsid, true);
  if (nsid !== Status.SUCCESS) return nsid;
  const features = ctrl.features;
  switch (fid) {
    case Feature.NUMBER_OF_QUEUES: {
      const sqs = value & 0xffff;
      const cqs = value >>> 16;
      if (sqs === 0xffff || cqs === 0xffff) return Status.INVALID_FIELD;
      if (ctrl.sqs.some((q, id) => id > 0 && q) || ctrl.cqs.some((q, id) => id > 0 && q)) return Status.COMMAND_SEQUENCE_ERROR;
      // One count for both: each I/O CQ has its own vector, so pairs are what the controller has.
      features.ioQueues = Math.min(MAX_IO_QUEUES, Math.max(sqs, cqs) + 1);
      command.result = (features.ioQueues - 1) * 0x10001;
      return Status.SUCCESS;
    }
    case Feature.TEMPERATURE_THRESHOLD: {
      const sensor = (value >>> 16) & 0xf;
      const threshold = (value >>> 20) & 3;
      if ((value >>> 22) !== 0 || threshold > THSEL_UNDER || (sensor !== TMPSEL_COMPOSITE && sensor !== TMPSEL_ALL)) return Status.INVALID_FIELD;
      if (threshold === THSEL_OVER) features.temperature.over = value & 0xffff;
      else features.temperature.under = value & 0xffff;
      return Status.SUCCESS;
    }
    case Feature.INTERRUPT_VECTOR_CONFIG: {
      const vector = value & 0xffff;
      if (vector >= VECTORS || (value >>> 17) !== 0) return Status.INVALID_FIELD;
      if (value & COALESCING_DISABLED) features.coalescingDisabled = (features.coalescingDisabled | (1 << vector)) >>> 0;
      else features.coalescingDisabled = (features.coalescingDisabled & ~(1 << vector)) >>> 0;
      ctrl.coalescingChanged();
      return Status.SUCCESS;
    }
  }
  if ((value & ~FEATURE_BITS.get(fid)!) !== 0) return Status.INVALID_FIELD;
  features.values.set(fid, value);
  if (fid === Feature.INTERRUPT_COALESCING) ctrl.coalescingChanged();
  // Turning the write cache off writes back what it holds before the command completes.
  if (fid === Feature.VOLATILE_WRITE_CACHE && value === 0) return ctrl.store.flush().then(() => Status.SUCCESS);
  return Status.SUCCESS;
}

// ---- Log pages (§5.14) ----

/**
 * Get Log Page: NUMD (NUMDU:NUMDL, unsigned, 0-based dwords) is the host's
 * buffer, bounded by MDTS (Invalid Field); LPOL/LPOU a dword-aligned offset
 * into the log, which must lie inside it (Invalid Field). What is returned is
 * the log from that offset, as much of it as fits the buffer: the PRPs are
 * walked for that many bytes, never more than the log holds. SMART / Health
 * is kept for the whole controller only (LPA bit 0 clear): its NSID is 0 or
 * the broadcast NSID, else Invalid Field.
 */
function getLogPage(ctrl: NvmeController, command: Command): number {
  const lid = command.dw(10) & 0xff;
  const length = ((command.dw(11) & 0xffff) * 0x10000 + (command.dw(10) >>> 16) + 1) * 4;
  checkTransfer(length);
  const offset = command.dw12_13;
  if (offset % 4n !== 0n) return Status.INVALID_FIELD;
  let page: Buffer;
  switch (lid) {
    case LogPage.ERROR: page = errorLog(ctrl); break;
    case LogPage.SMART:
      if (command.nsid !== 0 && command.nsid !== ALL_NAMESPACES) return Status.INVALID_FIELD;
      page = smartLog(ctrl);
      break;
    case LogPage.FIRMWARE_SLOT:
      page = Buffer.alloc(LOG_PAGE_SIZE);
      page[0] = 1; // AFI: slot 1 active
      ascii(page, 8, 8, FIRMWARE_REVISION);
      break;
    default:
      return Status.INVALID_LOG_PAGE;
  }
  if (offset >= BigInt(page.length)) return Status.INVALID_FIELD;
  const data = page.subarray(Number(offset), Number(offset) + Math.min(length, page.length - Number(offset)));
  writeSegments(ctrl.dma, prpSegments(ctrl.dma, command, data.length), data);
  // Reading the page acknowledges its events, unless Retain Asynchronous Event says not to.
  if ((command.dw(10) & 0x8000) === 0 && lid === LogPage.ERROR) ctrl.events.masked.delete(AsyncEvent.ERROR);
  return Status.SUCCESS;
}

function errorLog(ctrl: NvmeController): Buffer {
  const page = Buffer.alloc(64 * ERROR_LOG_ENTRIES);
  ctrl.errors.slice(-ERROR_LOG_ENTRIES).reverse().forEach((e, i) => {
    page.writeBigUInt64LE(BigInt(e.count), 64 * i);
    page.writeUInt16LE(e.sqid, 64 * i + 8);
    page.writeUInt16LE(e.cid, 64 * i + 10);
    page.writeUInt16LE(e.status << 1, 64 * i + 12);
    page.writeUInt16LE(0xffff, 64 * i + 14); // parameter location: not given
  });
  return page;
}

function smartLog(ctrl: NvmeController): Buffer {
  const page = Buffer.alloc(LOG_PAGE_SIZE);
  const s = ctrl.smart;
  page.writeUInt16LE(TEMPERATURE, 1);
  page[3] = 100; // available spare
  page[4] = 10; // spare threshold
  // Data units are thousands of 512-byte blocks, rounded up.
  page.writeBigUInt64LE(BigInt(Math.ceil(s.blocksRead / 1000)), 32);
  page.writeBigUInt64LE(BigInt(Math.ceil(s.blocksWritten / 1000)), 48);
  page.writeBigUInt64LE(BigInt(s.readCommands), 64);
  page.writeBigUInt64LE(BigInt(s.writeCommands), 80);
  page.writeBigUInt64LE(1n, 112); // power cycles
  page.writeBigUInt64LE(BigInt(ctrl.errors.length === 0 ? 0 : ctrl.errors[ctrl.errors.length - 1].count), 176);
  return page;
}

/** Outstanding Asynchronous Event Requests and the events waiting for one. */
export class AsyncEvents {
  /** CIDs of outstanding requests, oldest first. */
  requests: number[] = [];
  /** CIDs of requests an Abort ended, to be completed as Aborted by Request. */
  aborted: number[] = [];
  /** Completion dword 0 of events not yet reported. */
  queued: number[] = [];
  /** Event types reported and not yet acknowledged by reading their log page. */
  masked = new Set<number>();

  /** Queues an event unless one of its type awaits acknowledgement. */
  raise(type: number, info: number, logPage: number): void {
    const event = type | (info << 8) | (logPage << 16);
    if (!this.masked.has(type) && !this.queued.includes(event)) this.queued.push(event);
  }

  /** Ends the outstanding request `cid`; returns whether there was one. */
  abort(cid: number): boolean {
    const at = this.requests.indexOf(cid);
    if (at < 0) return false;
    this.requests.splice(at, 1);
    this.aborted.push(cid);
    return true;
  }

  reset(): void {
    this.requests = [];
    this.aborted = [];
    this.queued = [];
    this.masked.clear();
  }
}
