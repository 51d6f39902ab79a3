/** The migration data stream: how the device's units are framed in it. */
import type { DeviceMigration, MigrationData, MigrationPhase, MigrationUnit } from '../../device.js';
import { Command, Errno, ProtocolError } from '../../protocol/index.js';

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
export class SaveStream {
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
export function parseStream(stream: Buffer): LoadUnit[] {
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
    // A unit 0 after whole units starts the stream over: it stands alone, and
    // a source whose stop-copy unit is full (fullStopCopy) sends one after its
    // pre-copy units. The units it supersedes are not loaded.
    if (index === 0 && !current) units.length = 0;
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
