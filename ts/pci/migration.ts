/**
 * Live migration of a PciDevice: what the library holds is saved and
 * restored without device code (config space, BAR memory, the MSI-X table
 * and PBA, MSI and INTx state, ioeventfd counts), plus the bytes of the
 * description's `saveState` hook. See docs/pci-model.md, "Migration".
 *
 * The unit is one self-describing blob (all little-endian):
 *   header   'VFPC', version u16 (1), reserved u16, section count u32
 *   section  tag (4 ASCII bytes), length u64, then `length` bytes
 * Sections: LAYO (the device's layout, JSON), CONF (config space), INTR
 * (u8 flags: 1 INTx asserted, 2 INTx held, 4 MSI-X entry masks apply;
 * 3 reserved; u32 MSI pending bits kept outside config space), MSXT and
 * MSXP (MSI-X table and PBA), BAR0-BAR5 (memory of plain and shared BARs),
 * IOEV (u32 count per ioeventfd, BAR order), USER (`saveState`'s bytes).
 * A load checks the whole unit against this device (same layout, the same
 * sections, each of the right size) before anything changes.
 */
import { createHash } from 'node:crypto';
import { writeSync } from 'node:fs';
import { native } from '../native.js';
import type { DeviceMigration, MigrationData } from '../device.js';
import { Command, Errno, ProtocolError } from '../protocol/index.js';
import type { Bar } from './bars.js';
import type { ConfigSpace } from './config.js';
import { InvalidDeviceError, type PciDeviceDescription, type PciMigration } from './description.js';
import type { DeviceIrq } from './irq.js';
import type { Msi } from './msi.js';
import type { Msix } from './msix.js';

const MAGIC = 'VFPC';
export const PCI_STATE_VERSION = 1;
const HEADER_SIZE = 12;
const SECTION_HEADER = 12;
/** BAR memory is copied out this much at a time, as the client reads. */
const CHUNK = 1 << 20;

const INTX_ASSERTED = 1;
const INTX_HELD = 2;
const MSIX_TABLE_DRIVEN = 4;
const INTR_SIZE = 8;

/** Checks `migration` in a description: hooks are functions, saveState and loadState come together. */
export function checkMigration(migration: unknown): void {
  if (migration === undefined || typeof migration === 'boolean') return;
  if (typeof migration !== 'object' || migration === null) throw new InvalidDeviceError('migration', 'must be true, false or an object of hooks');
  const hooks = migration as Record<string, unknown>;
  for (const name of ['saveState', 'loadState', 'stop', 'start']) {
    if (hooks[name] !== undefined && typeof hooks[name] !== 'function') throw new InvalidDeviceError(`migration.${name}`, 'must be a function');
  }
  if ((hooks.saveState === undefined) !== (hooks.loadState === undefined)) {
    throw new InvalidDeviceError(hooks.saveState ? 'migration.loadState' : 'migration.saveState', 'saveState and loadState come together');
  }
}

/**
 * Why a description with `migration` omitted cannot migrate by default
 * (device code may hold state the library cannot see), or undefined.
 */
export function migrationBlocker(d: PciDeviceDescription): string | undefined {
  if (d.migration === false) return 'the description says `migration: false`';
  if (d.migration !== undefined) return undefined;
  const found: string[] = [];
  for (const [i, bar] of Object.entries(d.bars ?? {})) {
    if (!bar) continue;
    if (bar.read || bar.write) found.push(`bars[${i}] has handlers`);
    if (bar.ioeventfds?.length) found.push(`bars[${i}] has ioeventfds`);
  }
  (d.capabilities ?? []).forEach((c, i) => {
    if (c.kind === 'vendor' && (c.read || c.write)) found.push(`capabilities[${i}] has register hooks`);
  });
  (d.extendedCapabilities ?? []).forEach((c, i) => {
    if (c.kind === 'vsec' && (c.read || c.write)) found.push(`extendedCapabilities[${i}] has register hooks`);
  });
  if (d.onReset) found.push('it has an onReset hook');
  if (found.length === 0) return undefined;
  return `${found.join(', ')}: device code may keep state the library cannot save. `
    + 'Declare `migration: true` if it keeps none, or give `migration: { saveState, loadState }`';
}

/** What fixes whether two devices can exchange state; equal on both ends or the load is refused. */
interface Layout {
  id: string;
  config: number;
  bars: (string | null)[];
  msi: number;
  msix: number;
  intx: boolean;
  deviceState: boolean;
  /** Digest of the power-on config bytes and the RW/RW1C masks (capabilities, their places, BAR types). */
  registers: string;
}

export interface PciParts {
  config: ConfigSpace;
  bars: readonly (Bar | undefined)[];
  msi: Msi | undefined;
  msix: Msix | undefined;
  irq: DeviceIrq;
  intx: boolean;
}

interface Section {
  tag: string;
  length: number;
  chunks(): Iterable<Uint8Array>;
}

type Sections = Map<string, Buffer>;

const bad = (why: string) => new ProtocolError(Errno.EINVAL, Command.DEVICE_FEATURE, `PCI device state: ${why}`);
const hex = (n: number) => n.toString(16).padStart(4, '0');

/** The DeviceMigration of a PciDevice. */
export function pciMigration(parts: PciParts, hooks: PciMigration): DeviceMigration {
  const state = new PciState(parts, hooks);
  return {
    stop: async () => {
      await hooks.stop?.();
      parts.irq.stop();
      // Kicks stay in the eventfds (saved as IOEV) instead of waking device code.
      for (const bar of parts.bars) bar?.ioeventfds.forEach((e) => e.pause());
    },
    start: async () => {
      await hooks.start?.();
      parts.irq.start();
      for (const bar of parts.bars) bar?.ioeventfds.forEach((e) => e.resume());
    },
    save: () => state.save(),
    load: (data) => state.load(data),
  };
}

class PciState {
  private readonly layout: Layout;
  private readonly ioeventfds: number[];

  constructor(private readonly parts: PciParts, private readonly hooks: PciMigration) {
    const { config, bars, msi, msix } = parts;
    this.layout = {
      id: `${hex(config.u16(0))}:${hex(config.u16(2))}`,
      config: config.size,
      bars: bars.map((bar) => bar
        ? `${bar.size}-byte ${bar.description.kind} BAR, ${bar.shared ? 'shared' : bar.bytes ? 'plain memory' : 'handlers'}, ${bar.ioeventfds.length} ioeventfds`
        : null),
      msi: msi?.vectors.count ?? 0,
      msix: msix?.vectors.count ?? 0,
      intx: parts.intx,
      deviceState: hooks.saveState !== undefined,
      registers: createHash('sha256').update(config.layout()).digest('hex').slice(0, 32),
    };
    this.ioeventfds = bars.flatMap((bar) => bar?.ioeventfds.map((e) => e.fd) ?? []);
  }

  save(): MigrationData {
    return frame(this.sections(true));
  }

  /** Checks the whole unit, applies it, then gives device code its part (undone if that throws). */
  load(data: Uint8Array): void {
    const sections = this.check(parse(Buffer.from(data.buffer, data.byteOffset, data.byteLength)));
    const user = sections.get('USER');
    if (!user || !this.hooks.loadState) {
      this.apply(sections, false);
      return;
    }
    const before = parse(Buffer.concat([...frame(this.sections(false))]));
    this.apply(sections, false);
    try {
      this.hooks.loadState(user);
    } catch (error) {
      this.apply(before, true);
      throw error;
    }
  }

  /** The device's sections; small ones are copied now, BAR memory as it is read. */
  private sections(withUser: boolean): Section[] {
    const { config, bars, msi, msix, irq } = this.parts;
    const fixed = (tag: string, bytes: Uint8Array): Section => ({ tag, length: bytes.length, chunks: () => [bytes] });
    const out: Section[] = [fixed('LAYO', Buffer.from(JSON.stringify(this.layout)))];
    out.push(fixed('CONF', Buffer.from(config.bytes)));
    const intr = Buffer.alloc(INTR_SIZE);
    intr[0] = (irq.intxRaised ? INTX_ASSERTED : 0) | (irq.intxHeld ? INTX_HELD : 0) | (msix?.state.tableDriven ? MSIX_TABLE_DRIVEN : 0);
    intr.writeUInt32LE(msi?.privatePending ?? 0, 4);
    out.push(fixed('INTR', intr));
    if (msix) {
      out.push(fixed('MSXT', Buffer.from(msix.state.table)));
      out.push(fixed('MSXP', Buffer.from(msix.state.pba)));
    }
    bars.forEach((bar, i) => {
      const bytes = bar?.bytes;
      if (!bytes) return;
      out.push({
        tag: `BAR${i}`,
        length: bytes.length,
        *chunks() {
          for (let at = 0; at < bytes.length; at += CHUNK) yield Buffer.from(bytes.subarray(at, at + CHUNK));
        },
      });
    });
    if (this.ioeventfds.length > 0) {
      const counts = Buffer.alloc(4 * this.ioeventfds.length);
      this.ioeventfds.forEach((fd, i) => {
        // Reading an eventfd clears it: put the count back, the source may run on.
        const n = native.eventfdTake(fd);
        addToEventfd(fd, n);
        counts.writeUInt32LE(Math.min(n, 0xffffffff), 4 * i);
      });
      out.push(fixed('IOEV', counts));
    }
    if (withUser && this.hooks.saveState) {
      const state = this.hooks.saveState();
      if (!(state instanceof Uint8Array)) throw new TypeError('migration.saveState() must return a Uint8Array');
      out.push(fixed('USER', Buffer.from(state)));
    }
    return out;
  }

  /** Refuses a unit that is not this device's state, naming the first difference. */
  private check(sections: Sections): Sections {
    const layoutBytes = sections.get('LAYO');
    if (!layoutBytes) throw bad('no LAYO section');
    let theirs: Layout;
    try {
      theirs = JSON.parse(layoutBytes.toString('utf8')) as Layout;
    } catch {
      throw bad('the LAYO section is not JSON');
    }
    const ours = this.layout;
    const differ = (what: string, a: unknown, b: unknown) => bad(`the source's ${what} is ${String(a)}, this device's ${String(b)}: a different device description`);
    if (theirs.id !== ours.id) throw differ('vendor:device', theirs.id, ours.id);
    if (theirs.config !== ours.config) throw differ('config space size', theirs.config, ours.config);
    for (let i = 0; i < ours.bars.length; i++) {
      const a = theirs.bars?.[i] ?? null;
      if (a !== ours.bars[i]) throw differ(`BAR${i}`, a ?? 'absent', ours.bars[i] ?? 'absent');
    }
    if (theirs.msi !== ours.msi) throw differ('MSI vector count', theirs.msi, ours.msi);
    if (theirs.msix !== ours.msix) throw differ('MSI-X table size', theirs.msix, ours.msix);
    if (theirs.intx !== ours.intx) throw differ('INTx pin', theirs.intx ? 'present' : 'absent', ours.intx ? 'present' : 'absent');
    if (theirs.deviceState !== ours.deviceState) {
      throw differ('device-code state (saveState)', theirs.deviceState ? 'present' : 'absent', ours.deviceState ? 'present' : 'absent');
    }
    if (theirs.registers !== ours.registers) throw bad('config space layout differs (IDs, capabilities, their places or register masks): a different device description');
    // The same layout makes the same sections; each must have this device's size.
    const expected = this.expectedSections();
    for (const tag of sections.keys()) if (!expected.has(tag)) throw bad(`unexpected section ${tag}`);
    for (const [tag, length] of expected) {
      const got = sections.get(tag);
      if (!got) throw bad(`no ${tag} section`);
      if (length !== undefined && got.length !== length) throw bad(`section ${tag} has ${got.length} bytes, this device needs ${length}`);
    }
    const intr = sections.get('INTR')!;
    if ((intr[0] & ~(INTX_ASSERTED | INTX_HELD | MSIX_TABLE_DRIVEN)) !== 0 || intr.readUIntLE(1, 3) !== 0) throw bad('reserved INTR bits are set');
    return sections;
  }

  /** The sections this device saves and their sizes (undefined: any). */
  private expectedSections(): Map<string, number | undefined> {
    const { config, bars, msix } = this.parts;
    const expected = new Map<string, number | undefined>([['LAYO', undefined], ['CONF', config.size], ['INTR', INTR_SIZE]]);
    if (msix) {
      expected.set('MSXT', msix.state.table.length);
      expected.set('MSXP', msix.state.pba.length);
    }
    bars.forEach((bar, i) => {
      if (bar?.bytes) expected.set(`BAR${i}`, bar.bytes.length);
    });
    if (this.ioeventfds.length > 0) expected.set('IOEV', 4 * this.ioeventfds.length);
    if (this.layout.deviceState) expected.set('USER', undefined);
    return expected;
  }

  /**
   * Overwrites the device's state with checked sections. `exact` restores a
   * held INTx line as it was (undoing a load); otherwise a high line is
   * offered to this client on start(), as it has never seen it.
   */
  private apply(sections: Sections, exact: boolean): void {
    const { config, bars, msi, msix, irq } = this.parts;
    sections.get('CONF')!.copy(config.bytes);
    const intr = sections.get('INTR')!;
    const asserted = (intr[0] & INTX_ASSERTED) !== 0;
    irq.restoreIntx(asserted, exact ? (intr[0] & INTX_HELD) !== 0 : asserted);
    if (msi) msi.privatePending = intr.readUInt32LE(4);
    if (msix) msix.restore(sections.get('MSXT')!, sections.get('MSXP')!, (intr[0] & MSIX_TABLE_DRIVEN) !== 0);
    bars.forEach((bar, i) => {
      if (bar?.bytes) bar.bytes.set(sections.get(`BAR${i}`)!);
    });
    const counts = sections.get('IOEV');
    this.ioeventfds.forEach((fd, i) => {
      native.eventfdTake(fd);
      addToEventfd(fd, counts!.readUInt32LE(4 * i));
    });
  }
}

/** Adds `n` to an eventfd's counter (what `n` signals would do). */
function addToEventfd(fd: number, n: number): void {
  if (n === 0) return;
  const value = Buffer.alloc(8);
  value.writeBigUInt64LE(BigInt(n));
  writeSync(fd, value);
}

function* frame(sections: Section[]): Generator<Uint8Array> {
  const header = Buffer.alloc(HEADER_SIZE);
  header.write(MAGIC, 0, 'latin1');
  header.writeUInt16LE(PCI_STATE_VERSION, 4);
  header.writeUInt32LE(sections.length, 8);
  yield header;
  for (const s of sections) {
    const head = Buffer.alloc(SECTION_HEADER);
    head.write(s.tag, 0, 'latin1');
    head.writeBigUInt64LE(BigInt(s.length), 4);
    yield head;
    yield* s.chunks();
  }
}

/** Splits a unit into its sections (views of `data`); checks the framing only. */
function parse(data: Buffer): Sections {
  if (data.length < HEADER_SIZE || data.toString('latin1', 0, 4) !== MAGIC) throw bad('not the state of a PciDevice (no VFPC header)');
  const version = data.readUInt16LE(4);
  if (version !== PCI_STATE_VERSION) throw bad(`format version ${version}; this library reads version ${PCI_STATE_VERSION}`);
  if (data.readUInt16LE(6) !== 0) throw bad('reserved header bits are set');
  const count = data.readUInt32LE(8);
  const sections: Sections = new Map();
  let at = HEADER_SIZE;
  for (let i = 0; i < count; i++) {
    if (data.length - at < SECTION_HEADER) throw bad(`section ${i} is truncated`);
    const tag = data.toString('latin1', at, at + 4);
    const length = data.readBigUInt64LE(at + 4);
    at += SECTION_HEADER;
    if (length > BigInt(data.length - at)) throw bad(`section ${tag} is truncated`);
    if (sections.has(tag)) throw bad(`section ${tag} appears twice`);
    sections.set(tag, data.subarray(at, at + Number(length)));
    at += Number(length);
  }
  if (at !== data.length) throw bad(`${data.length - at} bytes after the last section`);
  return sections;
}
