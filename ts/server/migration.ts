/**
 * Live migration (migration v2) for a served device: the state machine of
 * §7, the data stream of MIG_DATA_READ/WRITE, DEVICE_FEATURE (§6.14) and
 * DMA dirty logging. The session only routes commands here; the device only
 * stops, starts, saves and loads (DeviceMigration). See docs/migration.md.
 */
import type { DeviceMigration, MigrationData, MigrationPhase, MigrationUnit, VfioUserDevice } from '../device.js';
import type { DmaSpace } from '../dma/space.js';
import { DIRTY_PAGE_SIZE } from '../dma/access.js';
import {
  Command,
  decodeDeviceFeatureRequest,
  decodeDmaLoggingReportRequest,
  decodeDmaLoggingStart,
  decodeMigDataReadRequest,
  decodeMigDataWriteRequest,
  decodeMigDeviceState,
  DEVICE_FEATURE_SIZE,
  DMA_LOGGING_REPORT_SIZE,
  DeviceFeatureFlags,
  dmaLoggingBitmapSize,
  encodeDeviceFeatureReply,
  encodeDmaLoggingReportReply,
  encodeMigDataReadReply,
  encodeMigDeviceState,
  encodeMigrationFeature,
  Errno,
  FeatureIndex,
  featureIndex,
  MigrationFlags,
  MigrationState,
  ProtocolError,
  type DmaLoggingRange,
} from '../protocol/index.js';

const S = MigrationState;
const stateNames = new Map<number, string>(Object.entries(MigrationState).map(([name, n]) => [n, name]));
const stateName = (n: number) => stateNames.get(n) ?? `state ${n}`;

// ---- the arcs of §7 and the path search ----

/**
 * The arcs a server implements directly (§7). Every other transition is a
 * path over these. PRE_COPY's arcs exist only when the device offers it.
 */
const ARCS: ReadonlyMap<MigrationState, readonly MigrationState[]> = new Map<MigrationState, MigrationState[]>([
  [S.RUNNING, [S.STOP, S.PRE_COPY]],
  [S.STOP, [S.RUNNING, S.STOP_COPY, S.RESUMING]],
  [S.STOP_COPY, [S.STOP]],
  [S.RESUMING, [S.STOP]],
  [S.PRE_COPY, [S.RUNNING, S.STOP_COPY]],
]);

const isSaving = (state: MigrationState) => state === S.PRE_COPY || state === S.STOP_COPY;

/**
 * The states a transition from `from` to `to` passes through, `to` last
 * ([] when they are equal), or undefined when it is not allowed: the
 * shortest path over ARCS whose inner states are not saving states (a path
 * through one would start or end a data session nobody asked for).
 * STOP_COPY→PRE_COPY has such a path (via STOP and RUNNING) but §7 forbids
 * it: the precopy stream it would start cannot follow a finished stop-copy.
 */
export function migrationPath(from: MigrationState, to: MigrationState, preCopy: boolean): MigrationState[] | undefined {
  const usable = (s: MigrationState) => ARCS.has(s) && (preCopy || s !== S.PRE_COPY);
  if (!usable(from) || !usable(to)) return undefined;
  if (from === to) return [];
  if (from === S.STOP_COPY && to === S.PRE_COPY) return undefined;
  // Breadth-first: the first time `to` is reached is along a shortest path.
  const previous = new Map<MigrationState, MigrationState>([[from, from]]);
  const queue = [from];
  while (queue.length > 0) {
    const state = queue.shift()!;
    if (state !== from && isSaving(state)) continue;
    for (const next of ARCS.get(state)!) {
      if (!usable(next) || previous.has(next)) continue;
      previous.set(next, state);
      if (next === to) {
        const path = [to];
        for (let at = state; at !== from; at = previous.get(at)!) path.unshift(at);
        return path;
      }
      queue.push(next);
    }
  }
  return undefined;
}

// ---- the data stream ----

/*
 * The stream the client carries from MIG_DATA_READ on the source to
 * MIG_DATA_WRITE on the destination is opaque to it, so we frame the device's
 * units in it: the destination can then hand each unit to load() whole and
 * in order, and reject a truncated or foreign stream before the device sees
 * any of it. A record is a 16-byte header, then `length` bytes:
 *   magic u32 'VFUM', version u8 1, phase u8 (1 precopy, 2 stopcopy),
 *   flags u8 (bit 0: last record of the unit), reserved u8, index u32, length u32.
 * A unit is its data records followed by an empty record with LAST set.
 */
const MAGIC = 0x4d554656;
const STREAM_VERSION = 1;
const RECORD_HEADER = 16;
const LAST = 1;
/** Device chunks above this are split: `length` is a u32. */
const MAX_RECORD = 1 << 30;
const PHASE_CODES: Record<MigrationPhase, number> = { precopy: 1, stopcopy: 2 };
const PHASES: readonly (MigrationPhase | undefined)[] = [undefined, 'precopy', 'stopcopy'];

function recordHeader(unit: MigrationUnit, flags: number, length: number): Buffer {
  const b = Buffer.alloc(RECORD_HEADER);
  b.writeUInt32LE(MAGIC, 0);
  b.writeUInt8(STREAM_VERSION, 4);
  b.writeUInt8(PHASE_CODES[unit.phase], 5);
  b.writeUInt8(flags, 6);
  b.writeUInt32LE(unit.index, 8);
  b.writeUInt32LE(length, 12);
  return b;
}

async function* framed(data: MigrationData, unit: MigrationUnit): AsyncGenerator<Uint8Array> {
  const chunks = data instanceof Uint8Array ? [data] : data;
  for await (const chunk of chunks) {
    for (let at = 0; at < chunk.length; at += MAX_RECORD) {
      const part = chunk.subarray(at, at + MAX_RECORD);
      yield recordHeader(unit, 0, part.length);
      yield part;
    }
  }
  yield recordHeader(unit, LAST, 0);
}

/** One save session (§7: from entering PRE_COPY or STOP_COPY until leaving them). */
class SaveStream {
  /** Framed units not yet read, oldest first. */
  private readonly queue: AsyncGenerator<Uint8Array>[] = [];
  private pending: Uint8Array = Buffer.alloc(0);
  private units = 0;

  constructor(private readonly device: DeviceMigration) {}

  /** Asks the device for the session's next unit; a failure leaves the session as it was. */
  async add(phase: MigrationPhase): Promise<void> {
    const unit = { phase, index: this.units };
    const data = await this.device.save(unit);
    this.units++;
    this.queue.push(framed(data, unit));
  }

  /** Whether everything saved so far has been read. */
  get drained(): boolean {
    return this.pending.length === 0 && this.queue.length === 0;
  }

  /** Up to `size` bytes; fewer means the end of what has been saved. */
  async read(size: number): Promise<Buffer> {
    const out = Buffer.allocUnsafe(size);
    let n = 0;
    while (n < size) {
      if (this.pending.length === 0) {
        const head = this.queue[0];
        if (!head) break;
        const next = await head.next();
        if (next.done) {
          this.queue.shift();
          continue;
        }
        this.pending = next.value;
      }
      const take = Math.min(size - n, this.pending.length);
      out.set(this.pending.subarray(0, take), n);
      this.pending = this.pending.subarray(take);
      n += take;
    }
    return out.subarray(0, n);
  }

  /** Ends the session: the device's iterators are told to finish. */
  close(): void {
    for (const unit of this.queue.splice(0)) unit.return(undefined).catch(() => undefined);
    this.pending = Buffer.alloc(0);
  }
}

interface LoadUnit {
  unit: MigrationUnit;
  data: Uint8Array;
}

/** Splits a received stream into units, or fails with EINVAL before any is loaded. */
function parseStream(stream: Buffer): LoadUnit[] {
  const bad = (why: string) => new ProtocolError(Errno.EINVAL, Command.DEVICE_FEATURE, `bad migration data: ${why}`);
  const units: LoadUnit[] = [];
  let parts: Uint8Array[] = [];
  let current: MigrationUnit | undefined;
  let at = 0;
  while (at < stream.length) {
    if (stream.length - at < RECORD_HEADER) throw bad(`${stream.length - at} bytes after the last record`);
    const phase = PHASES[stream.readUInt8(at + 5)];
    const flags = stream.readUInt8(at + 6);
    const index = stream.readUInt32LE(at + 8);
    const length = stream.readUInt32LE(at + 12);
    if (stream.readUInt32LE(at) !== MAGIC || stream.readUInt8(at + 4) !== STREAM_VERSION) throw bad(`no record header at byte ${at}`);
    if (!phase || (flags & ~LAST) !== 0 || stream.readUInt8(at + 7) !== 0) throw bad(`malformed record header at byte ${at}`);
    // Units arrive whole and in order: a gap means the client lost or reordered data.
    if (index !== units.length || (current && current.phase !== phase)) throw bad(`unit ${index} (${phase}) where unit ${units.length} was due`);
    if (length > stream.length - at - RECORD_HEADER) throw bad(`record at byte ${at} is truncated`);
    current ??= { phase, index };
    at += RECORD_HEADER;
    parts.push(stream.subarray(at, at + length));
    at += length;
    if (flags & LAST) {
      units.push({ unit: current, data: parts.length === 1 ? parts[0] : Buffer.concat(parts) });
      parts = [];
      current = undefined;
    }
  }
  if (current) throw bad(`unit ${current.index} is incomplete`);
  return units;
}

// ---- the state machine, one per device ----

/**
 * The migration state of one device. It outlives sessions (a client that
 * reconnects finds the device where it was), so it is kept per device, and
 * its operations are serialised: a disconnect's return to RUNNING finishes
 * before the next client's first request.
 */
export class MigrationStateMachine {
  private current: MigrationState = S.RUNNING;
  private save: SaveStream | undefined;
  /** MIG_DATA_WRITE payloads of the resume session. */
  private resume: Buffer[] | undefined;
  private tail: Promise<unknown> = Promise.resolve();

  constructor(readonly device: DeviceMigration) {}

  /** The state now; a transition under way is not finished (see `settledState`). */
  get state(): MigrationState {
    return this.current;
  }

  /** The state once every transition already asked for is done (GET MIG_DEVICE_STATE). */
  settledState(): Promise<MigrationState> {
    return this.exclusive(async () => this.current);
  }

  /** MIGRATION feature flags (§6.14): STOP_COPY is mandatory. */
  get flags(): number {
    return MigrationFlags.STOP_COPY | (this.device.preCopy ? MigrationFlags.PRE_COPY : 0);
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(fn);
    this.tail = run.catch(() => undefined);
    return run;
  }

  /**
   * SET MIG_DEVICE_STATE: walks the path before resolving. When an arc fails,
   * the device stays in the last state reached (the failed arc's source, as
   * in kernel VFIO), or in ERROR when that state could not be restored.
   */
  setState(target: number): Promise<void> {
    return this.exclusive(async () => {
      const fail = (why: string) => new ProtocolError(Errno.EINVAL, Command.DEVICE_FEATURE, why);
      if (this.current === S.ERROR) throw fail('the device is in ERROR: only DEVICE_RESET leaves it');
      if (target === S.ERROR) throw fail('ERROR cannot be requested');
      const path = migrationPath(this.current, target as MigrationState, this.device.preCopy ?? false);
      if (!path) throw fail(`no transition from ${stateName(this.current)} to ${stateName(target)}`);
      await this.walk(path);
    });
  }

  private async walk(path: readonly MigrationState[]): Promise<void> {
    for (const next of path) {
      await this.arc(this.current, next);
      this.current = next;
    }
  }

  /** One arc of ARCS; `from` is whichever state the table allows into `to`. */
  private async arc(from: MigrationState, to: MigrationState): Promise<void> {
    const device = this.device;
    switch (to) {
      case S.STOP:
        if (from === S.RUNNING) await device.stop?.();
        else if (from === S.STOP_COPY) this.endSave();
        else await this.load();
        return;
      case S.RUNNING:
        if (from === S.STOP) await device.start?.();
        else this.endSave();
        return;
      case S.PRE_COPY:
        await this.beginSave('precopy');
        return;
      case S.STOP_COPY:
        if (from === S.STOP) return this.beginSave('stopcopy');
        // From PRE_COPY: the precopy session goes on, its unread data first.
        await device.stop?.();
        try {
          await this.save!.add('stopcopy');
        } catch (error) {
          await this.restart();
          throw error;
        }
        return;
      case S.RESUMING:
        this.resume = [];
        return;
    }
  }

  private async beginSave(phase: MigrationPhase): Promise<void> {
    const save = new SaveStream(this.device);
    await save.add(phase);
    this.save = save;
  }

  private endSave(): void {
    this.save?.close();
    this.save = undefined;
  }

  /** Undoes a stop() whose arc failed later; if the device will not start, it is in ERROR. */
  private async restart(): Promise<void> {
    try {
      await this.device.start?.();
    } catch {
      this.enterError();
    }
  }

  private enterError(): void {
    this.endSave();
    this.resume = undefined;
    this.current = S.ERROR;
  }

  /**
   * RESUMING→STOP: loads the received units in order. A bad stream or a
   * first unit the device refuses leaves the device untouched in RESUMING,
   * with the data dropped (the client may write the stream again); a later
   * unit failing leaves it half loaded, which only ERROR can describe.
   */
  private async load(): Promise<void> {
    const received = Buffer.concat(this.resume!);
    this.resume = [];
    const units = parseStream(received);
    for (const [i, { data, unit }] of units.entries()) {
      try {
        await this.device.load(data, unit);
      } catch (error) {
        if (i > 0) this.enterError();
        throw error;
      }
    }
    this.resume = undefined;
  }

  /** MIG_DATA_READ. In PRE_COPY, a read after the end of the data asks the device for another unit. */
  read(size: number): Promise<Buffer> {
    return this.exclusive(async () => {
      if (this.current !== S.PRE_COPY && this.current !== S.STOP_COPY) {
        throw new ProtocolError(Errno.EINVAL, Command.MIG_DATA_READ, `no data to read in ${stateName(this.current)}`);
      }
      if (this.current === S.PRE_COPY && this.save!.drained) await this.save!.add('precopy');
      return this.save!.read(size);
    });
  }

  /** MIG_DATA_WRITE: kept until RESUMING→STOP loads it. */
  write(data: Uint8Array): Promise<void> {
    return this.exclusive(async () => {
      if (this.current !== S.RESUMING) {
        throw new ProtocolError(Errno.EINVAL, Command.MIG_DATA_WRITE, `data can only be written in RESUMING, not in ${stateName(this.current)}`);
      }
      this.resume!.push(Buffer.from(data));
    });
  }

  /**
   * After DEVICE_RESET. The migration state is left alone (a VMM's own state
   * machine would lose track of it; libvfio-user #844), except ERROR, which
   * a reset is the way out of (§7).
   */
  afterReset(): Promise<void> {
    return this.exclusive(async () => {
      if (this.current !== S.ERROR) return;
      await this.device.start?.();
      this.current = S.RUNNING;
    });
  }

  /**
   * The client left mid-migration: the device goes back to RUNNING, as if
   * the migration had been cancelled. Received data is dropped, not loaded.
   * ERROR stays for the next client to see and reset.
   */
  abandon(): Promise<void> {
    return this.exclusive(async () => {
      if (this.current === S.ERROR) return;
      if (this.current === S.RESUMING) {
        this.resume = undefined;
        this.current = S.STOP;
      }
      await this.walk(migrationPath(this.current, S.RUNNING, this.device.preCopy ?? false)!);
    });
  }
}

const machines = new WeakMap<VfioUserDevice, MigrationStateMachine>();

/** The device's state machine (keyed by the device, which outlives sessions), made on first use. */
export function migrationStateOf(device: VfioUserDevice, migration: DeviceMigration): MigrationStateMachine {
  let machine = machines.get(device);
  if (!machine) machines.set(device, (machine = new MigrationStateMachine(migration)));
  return machine;
}

// ---- dirty logging ----

const DIRTY_PAGE = BigInt(DIRTY_PAGE_SIZE);
const U64_END = 1n << 64n;
/** Dirty bits are fetched this many bytes of guest memory at a time (32 KiB of bitmap). */
const SCAN_CHUNK = 1n << 30n;

/** Our bitmaps are 4 KiB; coarser power-of-two page sizes are reported by OR-ing. */
function isLoggingPageSize(size: bigint): boolean {
  return size >= DIRTY_PAGE && (size & (size - 1n)) === 0n;
}

interface DirtyLog {
  /** Sorted, disjoint; empty means all of guest memory. */
  ranges: DmaLoggingRange[];
}

/** Forgets the writes recorded in [iova, iova + length). */
function clearDirty(dma: DmaSpace, iova: bigint, length: bigint): void {
  for (let at = 0n; at < length; at += SCAN_CHUNK) {
    dma.dirtyPages(iova + at, Number(length - at < SCAN_CHUNK ? length - at : SCAN_CHUNK), true);
  }
}

/** Takes (and clears) the dirty bits of [iova, iova + length) a chunk at a time: [chunk iova, 4 KiB bitmap]. */
function* takeDirty(dma: DmaSpace, iova: bigint, length: bigint): Generator<[bigint, BigUint64Array]> {
  for (let at = 0n; at < length; at += SCAN_CHUNK) {
    const n = length - at < SCAN_CHUNK ? length - at : SCAN_CHUNK;
    yield [iova + at, dma.dirtyPages(iova + at, Number(n), true)];
  }
}

// ---- DEVICE_FEATURE and MIG_DATA_* for one session ----

const { GET, SET, PROBE } = DeviceFeatureFlags;

/** The operations each feature supports (§6.14). */
const FEATURE_OPS: ReadonlyMap<number, number> = new Map([
  [FeatureIndex.MIGRATION, GET],
  [FeatureIndex.MIG_DEVICE_STATE, GET | SET],
  [FeatureIndex.DMA_LOGGING_START, SET],
  [FeatureIndex.DMA_LOGGING_STOP, SET],
  [FeatureIndex.DMA_LOGGING_REPORT, GET],
]);

/** Commands that would change a device whose state is being copied out; see `check`. */
const FROZEN_IN_STOP_COPY: ReadonlySet<number> = new Set([
  Command.REGION_WRITE,
  Command.REGION_WRITE_MULTI,
  Command.DEVICE_SET_IRQS,
  Command.DEVICE_RESET,
]);

/** One session's view of migration: command decoding and dirty logging (which ends with the session). */
export class MigrationSession {
  private log: DirtyLog | undefined;

  constructor(
    private readonly machine: MigrationStateMachine,
    private readonly dma: DmaSpace,
    /** Largest payload we send or accept (max_data_xfer_size). */
    private readonly maxTransfer: number,
  ) {}

  /**
   * STOP_COPY's data was saved on entry, so a change made afterwards would
   * never reach the destination: commands that change device state are
   * refused (EINVAL, libvfio-user's errno). Reads are served, natively too.
   */
  check(command: number): void {
    if (this.machine.state === S.STOP_COPY && FROZEN_IN_STOP_COPY.has(command)) {
      throw new ProtocolError(Errno.EINVAL, command, 'the device is in STOP_COPY: its state is being saved');
    }
  }

  async feature(payload: Buffer): Promise<Buffer> {
    const fail = (errno: number, why: string) => new ProtocolError(errno, Command.DEVICE_FEATURE, why);
    const req = decodeDeviceFeatureRequest(payload);
    const index = featureIndex(req.flags);
    const supported = FEATURE_OPS.get(index);
    if (supported === undefined) throw fail(Errno.ENOTSUP, `feature ${index} is not supported`);
    const ops = req.flags & (GET | SET);
    // As kernel VFIO: an unsupported operation is EINVAL, with or without PROBE.
    if (ops & ~supported) throw fail(Errno.EINVAL, `feature ${index} does not support ${ops & GET & ~supported ? 'GET' : 'SET'}`);
    if (req.flags & PROBE) return payload;
    if (ops === 0) throw fail(Errno.EINVAL, 'GET or SET is needed without PROBE');
    if (ops === GET) {
      const data = await this.get(index, req.data);
      const reply = encodeDeviceFeatureReply({ flags: req.flags, data });
      if (req.argsz < reply.length) throw fail(Errno.EINVAL, `argsz ${req.argsz} < the ${reply.length}-byte reply`);
      return reply;
    }
    if (req.argsz < payload.length) throw fail(Errno.EINVAL, `argsz ${req.argsz} < the ${payload.length}-byte request`);
    await this.set(index, req.data);
    return payload;
  }

  private async get(index: number, data: Buffer): Promise<Buffer> {
    switch (index) {
      case FeatureIndex.MIGRATION: return encodeMigrationFeature({ flags: BigInt(this.machine.flags) });
      case FeatureIndex.MIG_DEVICE_STATE: return encodeMigDeviceState({ deviceState: await this.machine.settledState() });
      default: return this.report(data);
    }
  }

  private async set(index: number, data: Buffer): Promise<void> {
    switch (index) {
      case FeatureIndex.MIG_DEVICE_STATE: return this.machine.setState(decodeMigDeviceState(data).deviceState);
      case FeatureIndex.DMA_LOGGING_START: return this.startLogging(data);
      default: this.log = undefined;
    }
  }

  private startLogging(data: Buffer): void {
    const fail = (errno: number, why: string) => new ProtocolError(errno, Command.DEVICE_FEATURE, `DMA_LOGGING_START: ${why}`);
    const { pageSize, ranges } = decodeDmaLoggingStart(data);
    if (this.log) throw fail(Errno.EBUSY, 'logging is already on: stop it first');
    if (!isLoggingPageSize(pageSize)) throw fail(Errno.EINVAL, `page size ${pageSize} is not a power of two of at least ${DIRTY_PAGE_SIZE}`);
    const sorted = [...ranges].sort((a, b) => (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0));
    sorted.forEach((r, i) => {
      const end = r.iova + r.length;
      if (r.length === 0n || end > U64_END || r.iova % pageSize !== 0n || r.length % pageSize !== 0n) {
        throw fail(Errno.EINVAL, `range 0x${r.iova.toString(16)}+0x${r.length.toString(16)} is empty, wraps or is not page-aligned`);
      }
      if (i + 1 < sorted.length && sorted[i + 1].iova < end) throw fail(Errno.EINVAL, 'ranges overlap');
    });
    // A report tells what was written since logging started: forget older writes.
    for (const w of this.dma.list()) if (w.mapping) clearDirty(this.dma, w.iova, w.size);
    this.log = { ranges: sorted };
  }

  /** DMA_LOGGING_REPORT: the 24 request bytes, then the bitmap at the requested page size; clears what it reports. */
  private report(data: Buffer): Buffer {
    const fail = (errno: number, why: string) => new ProtocolError(errno, Command.DEVICE_FEATURE, `DMA_LOGGING_REPORT: ${why}`);
    const req = decodeDmaLoggingReportRequest(data);
    const { iova, length, pageSize } = req;
    if (!this.log) throw fail(Errno.EINVAL, 'logging was not started');
    if (!isLoggingPageSize(pageSize)) throw fail(Errno.EINVAL, `page size ${pageSize} is not a power of two of at least ${DIRTY_PAGE_SIZE}`);
    if (length === 0n || iova + length > U64_END || iova % pageSize !== 0n || length % pageSize !== 0n) {
      throw fail(Errno.EINVAL, 'the range is empty, wraps or is not page-aligned');
    }
    if (!covers(this.log.ranges, iova, iova + length)) throw fail(Errno.EINVAL, 'the range was not logged');
    const bitmapSize = dmaLoggingBitmapSize(length, pageSize);
    if (DEVICE_FEATURE_SIZE + DMA_LOGGING_REPORT_SIZE + bitmapSize > this.maxTransfer) throw fail(Errno.E2BIG, `a ${bitmapSize}-byte bitmap exceeds max_data_xfer_size`);
    const bitmap = Buffer.alloc(bitmapSize);
    const ratio = Number(pageSize / DIRTY_PAGE);
    for (const [at, words] of takeDirty(this.dma, iova, length)) {
      const base = Number((at - iova) / DIRTY_PAGE);
      words.forEach((word, w) => {
        if (word === 0n) return;
        // Each set 4 KiB bit ORs into the bit of the reported page holding it.
        for (const [half, offset] of [[Number(word & 0xffffffffn), 0], [Number(word >> 32n), 32]] as const) {
          for (let bits = half; bits !== 0; bits &= bits - 1) {
            const page = Math.floor((base + w * 64 + offset + 31 - Math.clz32(bits & -bits)) / ratio);
            bitmap[page >> 3] |= 1 << (page & 7);
          }
        }
      });
    }
    return encodeDmaLoggingReportReply({ ...req, bitmap });
  }

  async dataRead(payload: Buffer): Promise<Buffer> {
    const req = decodeMigDataReadRequest(payload);
    if (req.size > this.maxTransfer) throw new ProtocolError(Errno.E2BIG, Command.MIG_DATA_READ, `size ${req.size} exceeds max_data_xfer_size`);
    return encodeMigDataReadReply(await this.machine.read(req.size));
  }

  async dataWrite(payload: Buffer): Promise<void> {
    const { data } = decodeMigDataWriteRequest(payload);
    if (data.length > this.maxTransfer) throw new ProtocolError(Errno.E2BIG, Command.MIG_DATA_WRITE, `size ${data.length} exceeds max_data_xfer_size`);
    await this.machine.write(data);
  }

  afterReset(): Promise<void> {
    return this.machine.afterReset();
  }

  /** The session ended: logging stops with it, and the device returns to RUNNING. */
  end(): Promise<void> {
    this.log = undefined;
    return this.machine.abandon();
  }
}

/** Whether the sorted, disjoint `ranges` (empty: everything) cover [start, end). */
function covers(ranges: readonly DmaLoggingRange[], start: bigint, end: bigint): boolean {
  if (ranges.length === 0) return true;
  let at = start;
  for (const r of ranges) {
    if (r.iova <= at && at < r.iova + r.length) at = r.iova + r.length;
    if (at >= end) return true;
  }
  return false;
}
