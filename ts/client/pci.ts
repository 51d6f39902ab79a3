/**
 * `client.pci`: what a VMM does to a PCI function's config space before the
 * guest takes over, each a few config reads and writes over REGION_READ and
 * REGION_WRITE of the CONFIG region: find a capability, turn on bus
 * mastering, enable MSI or MSI-X, size a BAR.
 */
import { UsageError } from '../errors.js';
import { Region } from '../protocol/index.js';
import type { BarIndex } from '../pci/description.js';
import { BarBits, Cap, CapabilityId, Cfg, Command as PciCommand, Msi, MsiX, NUM_BARS, Status } from '../pci/spec.js';
import type { VfioUserClient } from './client.js';

export type ConfigWidth = 1 | 2 | 4;

/** What sizing a BAR found. */
export interface BarSizing {
  index: BarIndex;
  /** Bytes it decodes; 0n when the BAR is not implemented. */
  size: bigint;
  kind: 'io' | 'memory';
  /** Memory BARs: 64 when it takes the next BAR slot as its upper half. */
  width: 32 | 64;
  prefetchable: boolean;
}

/** Bound on the capability walk: a list longer than config space can hold is broken. */
const MAX_CAPABILITIES = 48;

export class PciConfigClient {
  constructor(private readonly client: VfioUserClient) {}

  async read(offset: number, width: ConfigWidth): Promise<number> {
    const bytes = await this.client.regionRead(Region.CONFIG, BigInt(offset), width);
    return bytes.readUIntLE(0, width);
  }

  async write(offset: number, width: ConfigWidth, value: number): Promise<void> {
    if (!Number.isInteger(value) || value < 0 || value >= 2 ** (8 * width)) {
      throw new UsageError(`${value} does not fit a ${width}-byte config register`);
    }
    const bytes = Buffer.alloc(width);
    bytes.writeUIntLE(value, 0, width);
    await this.client.regionWrite(Region.CONFIG, BigInt(offset), bytes);
  }

  /** The config offset of the first standard capability with `id` (see `CapabilityId`), if any. */
  async findCapability(id: number): Promise<number | undefined> {
    if (!((await this.read(Cfg.STATUS, 2)) & Status.CAPABILITIES)) return undefined;
    let at = (await this.read(Cfg.CAPABILITIES, 1)) & Cap.POINTER_MASK;
    for (let seen = 0; at !== 0 && seen < MAX_CAPABILITIES; seen++) {
      if ((await this.read(at + Cap.ID, 1)) === id) return at;
      at = (await this.read(at + Cap.NEXT, 1)) & Cap.POINTER_MASK;
    }
    return undefined;
  }

  /** Sets or clears command register bits (see `PciCommand`), leaving the others as they are. */
  async setCommand(bits: number, enabled: boolean): Promise<void> {
    const command = await this.read(Cfg.COMMAND, 2);
    await this.write(Cfg.COMMAND, 2, enabled ? command | bits : command & ~bits);
  }

  /** Bus Master Enable: without it the device may not write memory, MSI and MSI-X messages included. */
  setBusMaster(enabled: boolean): Promise<void> {
    return this.setCommand(PciCommand.BUS_MASTER, enabled);
  }

  /**
   * Enables MSI-X with the function unmasked. Vectors are delivered to the
   * eventfds wired to IRQ index MSIX (`client.wireIrqs(IrqIndex.MSIX)`) once
   * bus mastering is on too.
   */
  async enableMsix(): Promise<void> {
    const at = await this.required(CapabilityId.MSIX, 'MSI-X');
    const control = await this.read(at + MsiX.CONTROL, 2);
    await this.write(at + MsiX.CONTROL, 2, (control | MsiX.ENABLE) & ~MsiX.FUNCTION_MASK);
  }

  async disableMsix(): Promise<void> {
    const at = await this.required(CapabilityId.MSIX, 'MSI-X');
    const control = await this.read(at + MsiX.CONTROL, 2);
    await this.write(at + MsiX.CONTROL, 2, control & ~MsiX.ENABLE);
  }

  /**
   * Enables MSI with `vectors` vectors (a power of two the function is
   * capable of; all it is capable of by default). Returns the number enabled.
   */
  async enableMsi(vectors?: number): Promise<number> {
    const at = await this.required(CapabilityId.MSI, 'MSI');
    const control = await this.read(at + Msi.CONTROL, 2);
    const capable = 1 << ((control >> Msi.CAPABLE_SHIFT) & Msi.LOG2_MASK);
    const wanted = vectors ?? capable;
    if (!Number.isInteger(wanted) || wanted < 1 || wanted > capable || (wanted & (wanted - 1)) !== 0) {
      throw new UsageError(`MSI vectors must be a power of two from 1 to ${capable}, not ${wanted}`);
    }
    const enabled = (Math.log2(wanted) & Msi.LOG2_MASK) << Msi.ENABLED_SHIFT;
    const cleared = control & ~(Msi.LOG2_MASK << Msi.ENABLED_SHIFT);
    await this.write(at + Msi.CONTROL, 2, cleared | enabled | Msi.ENABLE);
    return wanted;
  }

  async disableMsi(): Promise<void> {
    const at = await this.required(CapabilityId.MSI, 'MSI');
    const control = await this.read(at + Msi.CONTROL, 2);
    await this.write(at + Msi.CONTROL, 2, control & ~Msi.ENABLE);
  }

  /**
   * Sizes BAR `index` the standard way: with decoding off, write all ones,
   * read back which address bits stick, restore the BAR and the command
   * register. A 64-bit BAR is sized with its upper half.
   */
  async sizeBar(index: BarIndex): Promise<BarSizing> {
    if (!Number.isInteger(index) || index < 0 || index >= NUM_BARS) throw new UsageError(`BAR ${index} does not exist (0 to ${NUM_BARS - 1})`);
    const register = Cfg.BAR0 + 4 * index;
    const original = await this.read(register, 4);
    const io = (original & BarBits.IO_SPACE) !== 0;
    const type = (original >>> BarBits.MEM_TYPE_SHIFT) & BarBits.MEM_TYPE_MASK;
    const width = !io && type === BarBits.MEM_TYPE_64 && index < NUM_BARS - 1 ? 64 : 32;
    const command = await this.read(Cfg.COMMAND, 2);
    await this.write(Cfg.COMMAND, 2, command & ~(PciCommand.IO | PciCommand.MEMORY));
    try {
      const mask = BigInt(await this.probe(register, original)) & BigInt(io ? BarBits.IO_ADDRESS_MASK : BarBits.MEM_ADDRESS_MASK);
      const upper = width === 64 ? BigInt(await this.probe(register + 4, await this.read(register + 4, 4))) << 32n : 0n;
      const address = mask | upper;
      return {
        index,
        // The lowest address bit that sticks is the size: the BAR ignores every bit below it.
        size: address & -address,
        kind: io ? 'io' : 'memory',
        width,
        prefetchable: !io && (original & BarBits.MEM_PREFETCHABLE) !== 0,
      };
    } finally {
      await this.write(Cfg.COMMAND, 2, command);
    }
  }

  /** Writes all ones to the BAR register at `register`, reads what stuck, puts `original` back. */
  private async probe(register: number, original: number): Promise<number> {
    await this.write(register, 4, 0xffffffff);
    const stuck = await this.read(register, 4);
    await this.write(register, 4, original);
    return stuck;
  }

  private async required(id: number, name: string): Promise<number> {
    const at = await this.findCapability(id);
    if (at === undefined) throw new UsageError(`the device has no ${name} capability`);
    return at;
  }
}
