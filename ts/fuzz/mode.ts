/**
 * What a fuzz mode is: the part of the fuzzer that knows one device class
 * and plays its driver, badly on purpose. The runner (runner.ts) picks each
 * operation from one of the run's modes, performs it, checks the device
 * after it, and on a finding shrinks the sequence and prints it. A mode only
 * generates operations and performs them; see docs/testing.md, "Writing a
 * fuzz mode".
 *
 * Operations are plain JSON data, generated from the seeded `Random` and the
 * device's profile alone (never from what the device answered), so a seed
 * names one sequence, and a sequence saved to a file replays without the
 * generator.
 */
import type { GuestMemory, VfioUserClient } from '../client/client.js';
import type { EventfdIrq } from '../client/eventfd-irq.js';
import type { DeviceInfo, IrqInfo, RegionCap } from '../protocol/index.js';
import type { Random } from './random.js';

/** What an operation may carry: JSON. 64-bit values travel as "0x..." strings (see `hex`). */
export type OpValue = number | string | boolean | null | readonly OpValue[] | { readonly [field: string]: OpValue };

/** One operation: `mode` names the mode that performs it, `kind` what it does; the rest is the mode's. */
export interface FuzzOp {
  readonly mode: string;
  readonly kind: string;
  readonly [field: string]: OpValue;
}

/**
 * The guest RAM every run gives the device: a memfd of `size` bytes the
 * runner maps at `iova` (the pci mode moves, overlaps and drops windows of
 * it; `restart` puts it back).
 */
export const GUEST_MEMORY = { iova: 0x1_0000_0000n, size: 4 << 20 } as const;

/** A region as the device declared it (DEVICE_GET_REGION_INFO). */
export interface RegionProfile {
  index: number;
  size: bigint;
  /** RegionInfoFlags. */
  flags: number;
  caps: RegionCap[];
}

/** Where MSI-X keeps its table and PBA. */
export interface MsixProfile {
  /** Config offset of the capability. */
  offset: number;
  vectors: number;
  tableRegion: number;
  tableOffset: number;
  pbaRegion: number;
  pbaOffset: number;
}

/**
 * What the fuzzer learned about the device before the first operation, by
 * the same requests for every seed: modes generate from it.
 */
export interface DeviceProfile {
  info: DeviceInfo;
  /** Regions 0 to info.numRegions - 1 (a region of size 0 is not implemented). */
  regions: RegionProfile[];
  /** IRQ indexes 0 to info.numIrqs - 1. */
  irqs: IrqInfo[];
  /** Config space as read at the start: 256 bytes, or 4096 for PCI Express. */
  config: Buffer;
  /** Standard capabilities in list order. */
  capabilities: { id: number; offset: number }[];
  /** Extended capabilities in list order (PCI Express). */
  extendedCapabilities: { id: number; offset: number }[];
  msi?: { offset: number; is64: boolean; maskable: boolean };
  msix?: MsixProfile;
  /** The PCI Express capability, and whether it advertises Function Level Reset. */
  express?: { offset: number; flr: boolean };
  /** Whether the device offers migration (DEVICE_FEATURE MIGRATION). */
  migration: boolean;
}

/** What a mode works with while it performs an operation. */
export interface FuzzContext {
  /**
   * The connection to the device. A disconnect (an operation's, or the
   * runner's) replaces it: read it again after every await.
   */
  readonly client: VfioUserClient;
  readonly device: DeviceProfile;
  /** Guest RAM, a memfd of `memory.size` bytes mapped into the device at `memoryIova` (after `restart`). */
  readonly memory: GuestMemory;
  readonly memoryIova: bigint;
  /** Eventfds the fuzzer owns for SET_IRQS; a mode never closes them. */
  readonly eventfds: readonly EventfdIrq[];
  /** How long the device may take to answer anything it owes: a reply, a completion, a ready bit. */
  readonly deadlineMs: number;
  /**
   * Resolves once `done()` holds (checked on every event loop turn); throws
   * a 'stalled' FuzzFinding naming `what` when the deadline passes first.
   */
  waitFor(what: string, done: () => boolean | Promise<boolean>): Promise<void>;
  /** Closes the connection (a request may be in flight) and connects again; guest memory is mapped again. */
  reconnect(): Promise<void>;
  /** Counts an answer the device gave (a status, say) under `answer`, for the report: what the run reached. */
  tally(answer: string): void;
}

/**
 * A device class's hostile driver. The runner keeps one instance per run;
 * `restart` is its cue to forget what it knew about the device.
 */
export interface FuzzMode<Op extends FuzzOp = FuzzOp> {
  /** Names the mode on the command line (--mode) and in the ops it makes (`op.mode`). */
  readonly name: string;
  /** Its share of the operations against the other modes of a run (1 by default; the generic 'pci' mode has 1). */
  readonly weight?: number;
  /** Undefined when the mode can drive this device, else why not (a run with such a mode fails at once). */
  refuses?(device: DeviceProfile): string | undefined;
  /**
   * The next operation, from `random` and `device` only: the same seed and
   * device give the same sequence, whatever the device answers.
   */
  generate(random: Random, device: DeviceProfile): Op;
  /**
   * Performs `op`. The device's error replies (a ProtocolError with an errno)
   * are answers, not findings: let them propagate or catch them. Throw a
   * `FuzzFinding` when the device broke a promise (a command never
   * completed, a status the spec forbids). `op` may come from a replay file
   * or from a shrunk sequence: check what it refers to still exists.
   */
  run(op: Op, ctx: FuzzContext): Promise<void>;
  /**
   * Before this mode's next `run`, after anything that may have changed the
   * device behind its back (the start of a run, a reset, another mode's
   * operation, a reconnect): the runner has just put the connection, guest
   * memory (mapped at `memoryIova`), the command register (memory space and
   * bus master on) and the migration state (RUNNING) back; the mode brings
   * the device back to where its operations start (an NVMe host enables the
   * controller and creates its queues).
   */
  restart?(ctx: FuzzContext): Promise<void>;
  /**
   * Whether `op` may have changed the device under the other modes (so they
   * restart before their next operation); true when absent. Reads say no.
   */
  disturbs?(op: Op): boolean;
  /** The run (or a replay) is over: release what the mode holds (a mapped page, its own fds). */
  close?(): void;
}

/** What the runner reports as wrong with the device. */
export type FindingKind =
  /** A request had no reply within the deadline. */
  | 'unanswered'
  /** Device work the mode waited for (a completion, a ready bit) did not happen within the deadline. */
  | 'stalled'
  /** A device callback threw (a `deviceError` event, or an EIO reply over a socket). */
  | 'device-error'
  /** The server closed the connection, or its process died. */
  | 'disconnected'
  /** The server process's fds or memory grew without bound. */
  | 'leak'
  /** An answer the protocol or the device's spec does not allow. */
  | 'wrong-answer';

/** A device misbehaviour, thrown by a mode or raised by the runner's checks. */
export class FuzzFinding extends Error {
  constructor(readonly kind: FindingKind, message: string) {
    super(message);
    this.name = 'FuzzFinding';
  }
}

/** A 64-bit value as ops carry it. */
export const hex = (value: bigint | number): string => `0x${BigInt(value).toString(16)}`;
/** Reads a value written by `hex` (or a plain number). */
export const big = (value: OpValue): bigint => BigInt(value as string | number);
