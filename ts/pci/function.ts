/**
 * The PCI function behind a PciDevice: the VfioUserDevice the session
 * serves. It lives apart from the public, subclassable PciDevice so that
 * names a device author picks (a `read` helper, a `reset` method) can never
 * replace what the library answers the client.
 * @internal
 */
import { markAsUntransferable } from 'node:worker_threads';
import { native, type NativeRegionReads } from '../native.js';
import { UsageError } from '../errors.js';
import { nativeRegionReads, requestAttachment, type DeviceAttachment, type DeviceMigration, type RegionDescription, type RegionIoFd, type VfioUserDevice } from '../device.js';
import type { DmaSpace } from '../dma/space.js';
import { DeviceContext } from '../boundary.js';
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
import { defineBars, defineRom, type Bar, type PciBar } from './bars.js';
import {
  chainExtended,
  chainStandard,
  EXTENDED_SPACE,
  place,
  STANDARD_SPACE,
  type Slot,
} from './capabilities.js';
import { ConfigSpace } from './config.js';
import {
  InvalidDeviceError,
  type BarIndex,
  type Capability,
  type ExtendedCapability,
  type MsiCapability,
  type MsixCapability,
  type PciDeviceDescription,
  type PowerState,
} from './description.js';
import { checkExtended, defineExtended, extendedId, extendedSize, extendedVersion } from './extended.js';
import { checkIds, defineHeader } from './header.js';
import { Interrupts } from './interrupts.js';
import { DeviceIrq } from './irq.js';
import { checkMsi, Msi, msiSize } from './msi.js';
import { checkMigration, migrationBlocker, pciMigration } from './migration.js';
import { checkMsix, Msix } from './msix.js';
import { checkPcie, definePciExpress } from './pcie.js';
import { PowerManagement } from './pm.js';
import { checkRegisters, defineRegisters } from './registers.js';
import { CapabilityId, Cfg, Command, CONFIG_SIZE, EXTENDED_CONFIG_SIZE, Express, MsiX, Pm, Vendor } from './spec.js';

const CAPABILITY_ID: Record<Capability['kind'], number> = {
  pm: CapabilityId.POWER_MANAGEMENT,
  msi: CapabilityId.MSI,
  msix: CapabilityId.MSIX,
  pcie: CapabilityId.PCI_EXPRESS,
  vendor: CapabilityId.VENDOR,
};

/** Capabilities a function has at most one of. */
const SINGLE: readonly string[] = ['pm', 'msi', 'msix', 'pcie', 'dsn', 'aer'];
const NO_REGION: RegionDescription = { size: 0n, flags: 0 };

export class PciFunction implements VfioUserDevice {
  readonly flags = DeviceInfoFlags.PCI | DeviceInfoFlags.RESET;
  readonly numRegions = NUM_REGIONS;
  readonly numIrqs = NUM_IRQS;
  readonly config: ConfigSpace;
  /** The client's eventfds and masks per IRQ index. */
  readonly interrupts: Interrupts;
  /** Raising interrupts from device code. */
  readonly irq: DeviceIrq;
  /**
   * Live migration (docs/pci-model.md, "Migration"): set unless the
   * description rules it out; `migrationBlocker` then says why.
   */
  readonly migration?: DeviceMigration;
  /** Why the device does not migrate (undefined when it does). */
  readonly migrationBlocker: string | undefined;
  /** The device's own work under the error boundary (PciDevice.context). */
  readonly context = new DeviceContext();
  private readonly bars: (Bar | undefined)[];
  private readonly rom: Buffer | undefined;
  private readonly description: PciDeviceDescription;
  private pm: PowerManagement | undefined;
  private msi: Msi | undefined;
  private msix: Msix | undefined;
  /** Set by a config write that resets the function (FLR, D3hot to D0); runs once the write is stored. */
  private resetDue = false;
  private attachment: DeviceAttachment | undefined;
  private closed = false;

  constructor(description: PciDeviceDescription) {
    this.description = description;
    checkIds(description);
    checkMigration(description.migration);
    const caps = listOf<Capability>(description.capabilities, 'capabilities');
    const extended = listOf<ExtendedCapability>(description.extendedCapabilities, 'extendedCapabilities');
    const express = caps.some((c) => c.kind === 'pcie');
    if (extended.length > 0 && !express) {
      throw new InvalidDeviceError('extendedCapabilities', 'need a pcie capability (without one config space is 256 bytes)');
    }
    this.config = new ConfigSpace(express ? EXTENDED_CONFIG_SIZE : CONFIG_SIZE);
    defineHeader(this.config, description, express);
    this.bars = defineBars(this.config, description.bars ?? {}, this.context);
    try {
      if (description.rom) this.rom = defineRom(this.config, description.rom);
      // Checked before anything is sized from them (the vector counts).
      const slots = caps.map((c, i) => {
        const field = `capabilities[${i}]`;
        return { field, at: c.at, size: this.checkCapability(c, field) };
      });
      const msi = caps.find((c): c is MsiCapability => c.kind === 'msi');
      const msix = caps.find((c): c is MsixCapability => c.kind === 'msix');
      this.interrupts = new Interrupts([description.intx ? 1 : 0, msi?.vectors ?? 0, msix?.vectors ?? 0, 1, 1], (index) => this.irq.clientChanged(index));
      this.defineCapabilities(caps, slots);
      this.defineExtendedCapabilities(extended);
      this.irq = new DeviceIrq(this.config, this.interrupts, description.intx !== undefined, this.msi, this.msix);
      this.config.seal();
      this.migrationBlocker = migrationBlocker(description);
      if (this.migrationBlocker === undefined) {
        const hooks = typeof description.migration === 'object' ? description.migration : {};
        this.migration = pciMigration({ config: this.config, bars: this.bars, msi: this.msi, msix: this.msix, irq: this.irq, intx: description.intx !== undefined }, hooks);
      }
    } catch (error) {
      // The BARs' memfds and eventfds exist by now; nobody else could free them.
      this.free();
      throw error;
    }
  }

  /**
   * BAR `index` for device code: its memory (`bytes`, shared with the
   * client's mappings for a shared BAR) and its ioeventfds.
   */
  bar(index: BarIndex): PciBar {
    const bar = this.bars[index];
    if (!bar) throw new UsageError(`BAR${index} is not declared`);
    return bar;
  }

  /** PciDevice.close(): the device's onClose, then its BARs' fds and memfds. */
  close(): void {
    if (this.attachment) throw new UsageError('a client is attached: close the server before the device');
    if (this.closed) return;
    this.closed = true;
    try {
      this.description.onClose?.();
    } finally {
      this.free();
    }
  }

  private free(): void {
    for (const bar of this.bars) bar?.close();
  }

  /**
   * Guest memory of the attached client (throws when none is attached). Code
   * serving a request gets its own client's memory even after that client
   * left: closed, so every access throws DmaSpaceClosedError.
   */
  get dma(): DmaSpace {
    const attachment = requestAttachment.getStore() ?? this.attachment;
    if (!attachment) throw new UsageError('no client is attached: guest memory is unavailable');
    return attachment.dma;
  }

  get attached(): boolean {
    return this.attachment !== undefined;
  }

  // ---- state the guest controls, for device code ----

  /** Command register decode bits. The VMM maps BARs only while they are set. */
  get ioEnabled(): boolean {
    return (this.config.u16(Cfg.COMMAND) & Command.IO) !== 0;
  }

  get memoryEnabled(): boolean {
    return (this.config.u16(Cfg.COMMAND) & Command.MEMORY) !== 0;
  }

  /** Bus Master Enable: without it the device must not DMA, and MSI/MSI-X are dropped. */
  get busMaster(): boolean {
    return (this.config.u16(Cfg.COMMAND) & Command.BUS_MASTER) !== 0;
  }

  /**
   * Stopped for migration (STOP, STOP_COPY, RESUMING): interrupts are held
   * pending, and device code must not DMA or change state on its own.
   */
  get stopped(): boolean {
    return this.irq.held;
  }

  /** PMCSR power state; D0 for a device without a PM capability. */
  get powerState(): PowerState {
    return this.pm?.state ?? 'D0';
  }

  // ---- construction ----

  private defineCapabilities(caps: readonly Capability[], slots: readonly Slot[]): void {
    const offsets = place(slots, STANDARD_SPACE);
    const requestReset = () => (this.resetDue = true);
    caps.forEach((c, i) => {
      const at = offsets[i];
      switch (c.kind) {
        case 'pm': this.pm = new PowerManagement(this.config, at, c, requestReset); break;
        case 'msi': this.msi = new Msi(this.config, at, c, this.interrupts); break;
        case 'msix': this.msix = new Msix(this.config, at, c, this.bars, this.interrupts); break;
        case 'pcie': definePciExpress(this.config, at, c, requestReset); break;
        case 'vendor':
          this.config.define(at + Vendor.LENGTH, 1, Vendor.HEADER_SIZE + c.data.length);
          defineRegisters(this.config, at + Vendor.HEADER_SIZE, c, `capabilities[${i}]`);
          break;
      }
    });
    if (this.msi) this.interrupts.route(IrqIndex.MSI, this.msi.vectors);
    if (this.msix) this.interrupts.route(IrqIndex.MSIX, this.msix.vectors);
    chainStandard(this.config, caps.map((c, i) => ({ at: offsets[i], id: CAPABILITY_ID[c.kind] })));
  }

  /** Validates one capability; returns its size in bytes. */
  private checkCapability(c: Capability, field: string): number {
    switch (c.kind) {
      case 'pm': return Pm.SIZE;
      case 'msi': checkMsi(c, field); return msiSize(c);
      case 'msix': checkMsix(c, field, this.bars); return MsiX.SIZE;
      case 'pcie': checkPcie(c, field); return Express.SIZE_V2;
      case 'vendor':
        checkRegisters(c, field, 0xff - Vendor.HEADER_SIZE);
        return Vendor.HEADER_SIZE + c.data.length;
      default:
        throw new InvalidDeviceError(`${field}.kind`, `${String((c as { kind: unknown }).kind)} is not one of ${Object.keys(CAPABILITY_ID).join(', ')}`);
    }
  }

  private defineExtendedCapabilities(caps: readonly ExtendedCapability[]): void {
    const slots = caps.map((c, i) => {
      const field = `extendedCapabilities[${i}]`;
      checkExtended(c, field);
      return { field, at: c.at, size: extendedSize(c) };
    });
    const offsets = place(slots, EXTENDED_SPACE);
    caps.forEach((c, i) => defineExtended(this.config, offsets[i], c, `extendedCapabilities[${i}]`));
    chainExtended(this.config, caps.map((c, i) => ({ at: offsets[i], id: extendedId[c.kind], version: extendedVersion[c.kind], field: slots[i].field })));
  }

  // ---- VfioUserDevice ----

  regionInfo(index: number): RegionDescription {
    if (index <= Region.BAR5) return this.bars[index]?.region ?? NO_REGION;
    if (index === Region.ROM) return this.rom ? { size: BigInt(this.rom.length), flags: RegionInfoFlags.READ } : NO_REGION;
    if (index === Region.CONFIG) return { size: BigInt(this.config.size), flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE };
    return NO_REGION;
  }

  /** The BAR's ioeventfds (the session sends dups; the device keeps its own). */
  regionIoFds(index: number): readonly RegionIoFd[] {
    return index <= Region.BAR5 ? this.bars[index]?.ioFds ?? [] : [];
  }

  read(region: number, offset: number, count: number): Uint8Array | Promise<Uint8Array> {
    if (region === Region.CONFIG) return this.config.read(offset, count);
    if (region === Region.ROM && this.rom) return Buffer.from(this.rom.subarray(offset, offset + count));
    return this.bars[region]!.read(offset, count);
  }

  write(region: number, offset: number, data: Buffer): void | Promise<void> {
    if (region === Region.CONFIG) {
      this.config.write(offset, data);
      if (!this.resetDue) return;
      this.resetDue = false;
      return this.reset();
    }
    if (region === Region.ROM) return;
    return this.bars[region]!.write(offset, data);
  }

  /**
   * INTx is MASKABLE | AUTOMASKED (a level interrupt, as VFIO reports it).
   * MSI and MSI-X are MASKABLE: SET_IRQS MASK/UNMASK holds vectors pending
   * like the guest's own mask bits. Not NORESIZE: eventfds can be wired to
   * any vector at any time, so a VMM may grow the set without disabling it.
   */
  irqInfo(index: number): { count: number; flags: number } {
    const count = this.interrupts.count(index);
    let flags: number = IrqInfoFlags.EVENTFD;
    if (index === IrqIndex.INTX) flags |= IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED;
    else if ((index === IrqIndex.MSI || index === IrqIndex.MSIX) && count > 0) flags |= IrqInfoFlags.MASKABLE;
    return { count, flags };
  }

  setIrqs(request: SetIrqs, fds: number[]): void {
    this.interrupts.apply(request, fds);
    this.irq.clientChanged(request.index);
  }

  /**
   * DEVICE_RESET, FLR and soft reset: power-on config space (but for sticky
   * bits and the link fields an FLR keeps: ConfigSpace.keepOnReset) and
   * interrupt state, then the device's hook.
   */
  async reset(): Promise<void> {
    this.config.reset();
    for (const bar of this.bars) bar?.reset();
    this.irq.reset();
    await this.description.onReset?.();
  }

  /**
   * Config space is answered natively unless a vendor capability computes
   * registers on read (`read` hook): then every config read goes to JS.
   * Plain-memory BARs and shared BARs without a `read` handler are always
   * native, MSI-X table and PBA included (their bytes are kept current);
   * BARs with a `read` handler go to JS.
   */
  [nativeRegionReads](maxCount: number): NativeRegionReads {
    const reads = new native.NativeRegionReads(maxCount);
    // The native layer reads these bytes in place: they must not be transferred away.
    const serve = (region: number, bytes: Buffer) => {
      markAsUntransferable(bytes.buffer);
      reads.set(region, bytes);
    };
    if (!this.config.hasReadHooks) serve(Region.CONFIG, this.config.bytes);
    this.bars.forEach((bar, i) => {
      if (!bar?.memory) return;
      // A shared BAR's memory may be unmapped under an attached client (SharedMemory.close()): checked on every read.
      if (bar.shared) bar.shared.serveNativeReads(reads, i);
      else serve(i, bar.memory);
    });
    if (this.rom) serve(Region.ROM, this.rom);
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

/** An optional list field, checked to be an array with at most one of each single capability. */
function listOf<T extends { kind: string }>(value: T[] | undefined, field: string): T[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw new InvalidDeviceError(field, 'must be an array');
  const seen = new Map<string, number>();
  value.forEach((c, i) => {
    if (typeof c !== 'object' || c === null) throw new InvalidDeviceError(`${field}[${i}]`, 'must be an object');
    const first = seen.get(c.kind);
    if (first !== undefined && SINGLE.includes(c.kind)) {
      throw new InvalidDeviceError(`${field}[${i}].kind`, `a second ${c.kind} capability (the first is ${field}[${first}])`);
    }
    if (first === undefined) seen.set(c.kind, i);
  });
  return value;
}
