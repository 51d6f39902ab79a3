/**
 * A device with state worth migrating, implementing VfioUserDevice directly:
 * config space with a scratch register at 0x40, and a 64 KiB BAR0 whose
 * first u32 is a counter (a write adds to it) and whose rest is plain
 * memory. Units: unit 0 is the whole state, later units carry the counter,
 * config space and the BAR pages written since the previous unit. Saves are
 * generators, so the stream is pulled as the client reads. Every migration
 * hook is logged in `calls`; names in `failing` make that hook throw.
 */
import { Region, RegionInfoFlags, type DeviceMigration, type MigrationUnit } from '../ts/index.js';
import { native } from '../ts/native.js';
import { BareDevice } from './bare-device.js';
import { nativeRegionReads } from '../ts/device.js';

export const BAR_SIZE = 64 * 1024;
export const BAR_PAGE = 4096;
export const SCRATCH = 0x40;
const MAGIC = 'CNTR';

export class CounterDevice extends BareDevice {
  readonly numRegions = Region.CONFIG + 1;
  readonly config = Buffer.alloc(256);
  readonly bar = Buffer.alloc(BAR_SIZE);
  running = true;
  readonly calls: string[] = [];
  /** Hook names ('stop', 'start', 'save:stopcopy', 'load:precopy:1'...) that throw. */
  readonly failing = new Set<string>();
  readonly migration: DeviceMigration;
  private dirty = new Set<number>();

  constructor(options: { preCopy?: boolean; fullStopCopy?: boolean } = {}) {
    super();
    this.config.writeUInt32LE(0x5a5a1af4, 0);
    const device = this;
    this.migration = {
      preCopy: options.preCopy ?? false,
      fullStopCopy: options.fullStopCopy ?? false,
      stop: () => this.hook('stop', () => { this.running = false; }),
      start: () => this.hook('start', () => { this.running = true; }),
      save(unit) {
        return device.hook(`save:${unit.phase}`, () => device.save(unit), unit);
      },
      async load(data, unit) {
        await Promise.resolve();
        device.hook(`load:${unit.phase}`, () => device.load(data, unit), unit);
      },
    };
  }

  get counter(): number {
    return this.bar.readUInt32LE(0);
  }

  /** Everything a migration must carry, for comparing two devices. */
  snapshot(): Buffer {
    return Buffer.concat([this.config, this.bar]);
  }

  private hook<T>(name: string, run: () => T, unit?: MigrationUnit): T {
    const full = unit ? `${name}:${unit.index}` : name;
    this.calls.push(full);
    if (this.failing.has(name) || this.failing.has(full)) throw new Error(`${full} failed`);
    return run();
  }

  private *save(unit: MigrationUnit): Generator<Uint8Array> {
    const pages = unit.index === 0 ? [...Array(BAR_SIZE / BAR_PAGE).keys()] : [...this.dirty].sort((a, b) => a - b);
    this.dirty = new Set();
    const head = Buffer.alloc(8);
    head.write(MAGIC, 0, 'latin1');
    head.writeUInt32LE(pages.length, 4);
    yield head;
    yield Buffer.from(this.config);
    for (const page of pages) {
      const index = Buffer.alloc(4);
      index.writeUInt32LE(page, 0);
      yield index;
      yield Buffer.from(this.bar.subarray(page * BAR_PAGE, (page + 1) * BAR_PAGE));
    }
  }

  /** Checks the whole unit before applying any of it, as DeviceMigration asks. */
  private load(data: Uint8Array, unit: MigrationUnit): void {
    const b = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    if (b.length < 8 || b.toString('latin1', 0, 4) !== MAGIC) throw new Error(`unit ${unit.index} is not counter-device state`);
    const count = b.readUInt32LE(4);
    if (b.length !== 8 + 256 + count * (4 + BAR_PAGE)) throw new Error(`unit ${unit.index} has ${b.length} bytes`);
    b.copy(this.config, 0, 8, 8 + 256);
    for (let i = 0, at = 8 + 256; i < count; i++, at += 4 + BAR_PAGE) {
      const page = b.readUInt32LE(at);
      b.copy(this.bar, page * BAR_PAGE, at + 4, at + 4 + BAR_PAGE);
    }
  }

  regionInfo(index: number) {
    const rw = RegionInfoFlags.READ | RegionInfoFlags.WRITE;
    if (index === Region.BAR0) return { size: BigInt(BAR_SIZE), flags: rw };
    if (index === Region.CONFIG) return { size: 256n, flags: rw };
    return { size: 0n, flags: 0 };
  }

  read(region: number, offset: number, count: number): Uint8Array {
    const bytes = region === Region.CONFIG ? this.config : this.bar;
    return Buffer.from(bytes.subarray(offset, offset + count));
  }

  write(region: number, offset: number, data: Buffer): void {
    if (region === Region.CONFIG) {
      data.copy(this.config, offset);
      return;
    }
    if (offset === 0 && data.length === 4) {
      this.bar.writeUInt32LE((this.counter + data.readUInt32LE(0)) >>> 0, 0);
    } else {
      data.copy(this.bar, offset);
    }
    for (let page = Math.floor(offset / BAR_PAGE); page * BAR_PAGE < offset + data.length; page++) this.dirty.add(page);
  }

  /** Config space has no read side effects: served natively, in every migration state. */
  [nativeRegionReads](maxCount: number) {
    const reads = new native.NativeRegionReads(maxCount);
    reads.set(Region.CONFIG, this.config);
    return reads;
  }
}
