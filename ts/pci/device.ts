/**
 * A PCI device declared in TypeScript: IDs, BARs, expansion ROM, INTx. The
 * library emulates the type-0 config header (BAR and ROM sizing, command and
 * status bits) and the interrupt plumbing; device code handles BAR accesses.
 */
import { native, type NativeRegionReads } from '../native.js';
import { UsageError } from '../errors.js';
import type { DeviceAttachment, RegionDescription, VfioUserDevice } from '../device.js';
import type { DmaSpace } from '../dma/space.js';
import {
  DeviceInfoFlags,
  IrqIndex,
  IrqInfoFlags,
  NUM_IRQS,
  NUM_REGIONS,
  Region,
  RegionInfoFlags,
  type SetIrqs,
} from '../protocol/index.js';
import { Cfg, Command, ConfigSpace, Status } from './config.js';
import { Interrupts } from './interrupts.js';

/** What a register read may return: a number/bigint (little-endian) or the bytes. */
export type RegisterValue = number | bigint | Uint8Array;

export interface BarHandlers {
  /** Reads `size` bytes at `offset`. Without it, reads return the BAR's memory. */
  read?(offset: number, size: number): RegisterValue | Promise<RegisterValue>;
  /** A write of `data` at `offset` (after it is stored, for memory-backed BARs). */
  write?(offset: number, data: Buffer): void | Promise<void>;
}

export interface IoBar extends BarHandlers {
  kind: 'io';
  /** Bytes; a power of two, at least 4. */
  size: number;
}

export interface MemoryBar extends BarHandlers {
  kind: 'memory';
  /** Bytes; a power of two, at least 16. */
  size: number;
  /** 64-bit BARs take the next BAR slot as their upper half. */
  width?: 32 | 64;
  prefetchable?: boolean;
}

export type BarDescription = IoBar | MemoryBar;
export type BarIndex = 0 | 1 | 2 | 3 | 4 | 5;
export type InterruptPin = 'A' | 'B' | 'C' | 'D';

export interface PciDeviceDescription {
  vendorId: number;
  deviceId: number;
  subsystemVendorId?: number;
  subsystemId?: number;
  revision?: number;
  /** 24 bits: base class << 16 | subclass << 8 | programming interface. */
  classCode: number;
  bars?: Partial<Record<BarIndex, BarDescription>>;
  /** Expansion ROM contents (sized up to a power of two, at least 2 KiB). */
  rom?: Uint8Array;
  /** The INTx pin the device uses; omit for none. */
  intx?: InterruptPin;
  /** Called on DEVICE_RESET (after config space is back to its defaults). */
  reset?(): void | Promise<void>;
}

/** A description that cannot describe a real device; `field` names the culprit. */
export class InvalidDeviceError extends UsageError {
  constructor(readonly field: string, problem: string) {
    super(`${field}: ${problem}`);
  }
}

const isPowerOfTwo = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

function checkId(field: string, value: number | undefined, bits: number): void {
  if (value !== undefined && !(Number.isInteger(value) && value >= 0 && value < 2 ** bits)) {
    throw new InvalidDeviceError(field, `${value} is not a ${bits}-bit unsigned integer`);
  }
}

function encodeValue(value: RegisterValue, size: number): Uint8Array {
  if (value instanceof Uint8Array) return value;
  const out = Buffer.alloc(Math.max(size, 8));
  out.writeBigUInt64LE(BigInt.asUintN(64, typeof value === 'bigint' ? value : BigInt(Math.trunc(value))), 0);
  return out.subarray(0, size);
}

interface Bar {
  description: BarDescription;
  /** Backing bytes for BARs read without a handler. */
  memory?: Buffer;
}

export class PciDevice implements VfioUserDevice {
  readonly flags = DeviceInfoFlags.PCI | DeviceInfoFlags.RESET;
  readonly numRegions = NUM_REGIONS;
  readonly numIrqs = NUM_IRQS;
  readonly config: ConfigSpace;
  readonly interrupts: Interrupts;
  private readonly bars: (Bar | undefined)[] = [];
  private readonly rom: Buffer | undefined;
  private readonly description: PciDeviceDescription;
  private intxAsserted = false;
  private attachment: DeviceAttachment | undefined;

  constructor(description: PciDeviceDescription) {
    this.description = description;
    checkId('vendorId', description.vendorId, 16);
    checkId('deviceId', description.deviceId, 16);
    checkId('subsystemVendorId', description.subsystemVendorId, 16);
    checkId('subsystemId', description.subsystemId, 16);
    checkId('revision', description.revision, 8);
    checkId('classCode', description.classCode, 24);
    if (description.intx !== undefined && !['A', 'B', 'C', 'D'].includes(description.intx)) {
      throw new InvalidDeviceError('intx', `${String(description.intx)} is not one of A, B, C, D`);
    }
    this.config = new ConfigSpace(256);
    this.defineHeader();
    this.defineBars(description.bars ?? {});
    if (description.rom) {
      const size = Math.max(2048, 2 ** Math.ceil(Math.log2(Math.max(1, description.rom.length))));
      this.rom = Buffer.alloc(size);
      this.rom.set(description.rom);
      this.config.define(Cfg.ROM_ADDRESS, 4, 0, (~(size - 1) & 0xfffff800) | 1);
    }
    this.interrupts = new Interrupts([description.intx ? 1 : 0, 0, 0, 1, 1]);
    this.config.seal();
  }

  /** Guest memory of the attached client (throws when none is attached). */
  get dma(): DmaSpace {
    if (!this.attachment) throw new UsageError('no client is attached: guest memory is unavailable');
    return this.attachment.dma;
  }

  get attached(): boolean {
    return this.attachment !== undefined;
  }

  private defineHeader(): void {
    const d = this.description;
    const c = this.config;
    c.define(Cfg.VENDOR_ID, 2, d.vendorId);
    c.define(Cfg.DEVICE_ID, 2, d.deviceId);
    c.define(Cfg.COMMAND, 2, 0, Command.IO | Command.MEMORY | Command.BUS_MASTER | Command.PARITY | Command.SERR | Command.INTX_DISABLE);
    c.define(Cfg.STATUS, 2, 0, 0, Status.ERRORS_W1C);
    c.define(Cfg.REVISION, 1, d.revision ?? 0);
    c.define(Cfg.CLASS_PROG_IF, 1, d.classCode & 0xff);
    c.define(Cfg.CLASS_PROG_IF + 1, 2, d.classCode >>> 8);
    c.define(Cfg.CACHE_LINE_SIZE, 1, 0, 0xff);
    c.define(Cfg.LATENCY_TIMER, 1, 0, 0xff);
    c.define(Cfg.SUBSYSTEM_VENDOR_ID, 2, d.subsystemVendorId ?? d.vendorId);
    c.define(Cfg.SUBSYSTEM_ID, 2, d.subsystemId ?? 0);
    c.define(Cfg.INTERRUPT_LINE, 1, 0, 0xff);
    c.define(Cfg.INTERRUPT_PIN, 1, d.intx ? 1 + 'ABCD'.indexOf(d.intx) : 0);
    c.onWrite({ start: Cfg.COMMAND, end: Cfg.COMMAND + 2, apply: () => this.commandWritten() });
  }

  private defineBars(bars: Partial<Record<BarIndex, BarDescription>>): void {
    for (let i = 0; i < 6; i++) {
      const bar = bars[i as BarIndex];
      if (!bar) continue;
      const field = `bars[${i}]`;
      if (this.bars[i]) throw new InvalidDeviceError(field, `slot ${i} is the upper half of the 64-bit BAR${i - 1}`);
      const min = bar.kind === 'io' ? 4 : 16;
      if (!isPowerOfTwo(bar.size) || bar.size < min) {
        throw new InvalidDeviceError(`${field}.size`, `${bar.size} is not a power of two of at least ${min}`);
      }
      const offset = Cfg.BAR0 + 4 * i;
      if (bar.kind === 'io') {
        if (bar.size > 256) throw new InvalidDeviceError(`${field}.size`, 'I/O BARs are at most 256 bytes');
        this.config.define(offset, 4, 0x1, ~(bar.size - 1) & 0xfffffffc);
      } else {
        const wide = bar.width === 64;
        if (bar.width !== undefined && bar.width !== 32 && bar.width !== 64) {
          throw new InvalidDeviceError(`${field}.width`, `${String(bar.width)} is neither 32 nor 64`);
        }
        if (wide && i === 5) throw new InvalidDeviceError(`${field}.width`, 'a 64-bit BAR cannot sit in BAR5 (it needs BAR6 as its upper half)');
        if (!wide && bar.size > 2 ** 31) throw new InvalidDeviceError(`${field}.size`, '32-bit BARs are at most 2 GiB');
        if (wide && bars[(i + 1) as BarIndex]) throw new InvalidDeviceError(`bars[${i + 1}]`, `taken by the upper half of the 64-bit BAR${i}`);
        const type = (wide ? 0x4 : 0) | (bar.prefetchable ? 0x8 : 0);
        const sizeMask = BigInt.asUintN(64, ~(BigInt(bar.size) - 1n));
        this.config.define(offset, 4, type, Number(sizeMask & 0xfffffff0n));
        if (wide) {
          this.config.define(offset + 4, 4, 0, Number(sizeMask >> 32n));
          this.bars[i + 1] = undefined;
        }
      }
      this.bars[i] = { description: bar, memory: bar.read ? undefined : Buffer.alloc(bar.size) };
      if (bar.kind === 'memory' && bar.width === 64) i++;
    }
  }

  private commandWritten(): void {
    // INTx disable gates delivery; re-evaluate a line that is still asserted.
    if (this.intxAsserted && !(this.config.u16(Cfg.COMMAND) & Command.INTX_DISABLE)) {
      this.interrupts.trigger(IrqIndex.INTX);
    }
  }

  // ---- interrupts, for device code ----

  /** Raises the INTx line (level): delivered unless INTx is disabled or masked. */
  assertIntx(): void {
    if (!this.description.intx) throw new UsageError('the device declares no INTx pin');
    this.config.setBits16(Cfg.STATUS, Status.INTX, true);
    if (this.intxAsserted) return;
    this.intxAsserted = true;
    if (!(this.config.u16(Cfg.COMMAND) & Command.INTX_DISABLE)) this.interrupts.trigger(IrqIndex.INTX);
  }

  deassertIntx(): void {
    this.intxAsserted = false;
    this.config.setBits16(Cfg.STATUS, Status.INTX, false);
    this.interrupts.clearPending(IrqIndex.INTX, 0);
  }

  get intxAssertedNow(): boolean {
    return this.intxAsserted;
  }

  // ---- VfioUserDevice ----

  regionInfo(index: number): RegionDescription {
    const rw = RegionInfoFlags.READ | RegionInfoFlags.WRITE;
    if (index <= Region.BAR5) {
      const bar = this.bars[index];
      return bar ? { size: BigInt(bar.description.size), flags: rw } : { size: 0n, flags: 0 };
    }
    if (index === Region.ROM) return this.rom ? { size: BigInt(this.rom.length), flags: RegionInfoFlags.READ } : { size: 0n, flags: 0 };
    if (index === Region.CONFIG) return { size: BigInt(this.config.size), flags: rw };
    return { size: 0n, flags: 0 };
  }

  read(region: number, offset: number, count: number): Uint8Array | Promise<Uint8Array> {
    if (region === Region.CONFIG) return this.config.read(offset, count);
    if (region === Region.ROM && this.rom) return Buffer.from(this.rom.subarray(offset, offset + count));
    const bar = this.bars[region]!;
    if (bar.memory) return Buffer.from(bar.memory.subarray(offset, offset + count));
    const value = bar.description.read!(offset, count);
    return value instanceof Promise ? value.then((v) => encodeValue(v, count)) : encodeValue(value, count);
  }

  write(region: number, offset: number, data: Buffer): void | Promise<void> {
    if (region === Region.CONFIG) return this.config.write(offset, data);
    if (region === Region.ROM) return;
    const bar = this.bars[region]!;
    bar.memory?.set(data, offset);
    return bar.description.write?.(offset, data);
  }

  irqInfo(index: number): { count: number; flags: number } {
    const flags = index === IrqIndex.INTX
      ? IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED
      : IrqInfoFlags.EVENTFD;
    return { count: this.interrupts.count(index), flags };
  }

  setIrqs(request: SetIrqs, fds: number[]): void {
    this.interrupts.apply(request, fds, (index, vector) => this.interrupts.trigger(index, vector));
    if (request.index === IrqIndex.INTX && this.intxAsserted && !this.interrupts.isMasked(IrqIndex.INTX, 0)) {
      // Unmasked with the line still high: a level interrupt fires again.
      this.interrupts.trigger(IrqIndex.INTX);
    }
  }

  async reset(): Promise<void> {
    this.config.reset();
    this.deassertIntx();
    for (const bar of this.bars) bar?.memory?.fill(0);
    await this.description.reset?.();
  }

  nativeReads(maxCount: number): NativeRegionReads {
    const reads = new native.NativeRegionReads(maxCount);
    reads.set(Region.CONFIG, this.config.bytes);
    this.bars.forEach((bar, i) => {
      if (bar?.memory) reads.set(i, bar.memory);
    });
    if (this.rom) reads.set(Region.ROM, this.rom);
    return reads;
  }

  attach(attachment: DeviceAttachment): void {
    this.attachment = attachment;
  }

  detach(): void {
    this.attachment = undefined;
    this.interrupts.releaseAll();
  }
}

