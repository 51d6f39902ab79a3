/** Set-up shared by the PCI tests: guest-side config and BAR access as a guest's PCI core does it, eventfds, descriptions. */
import { writeSync } from 'node:fs';
import { expect } from 'vitest';
import { EventfdIrq, InvalidDeviceError, PciDevice, type PciDeviceDescription, type VfioUserClient } from '../ts/index.js';
import { Cap, Cfg, Command, CONFIG_SIZE, ExtCap, Status } from '../ts/pci/spec.js';

/** The least a description needs. */
export const base = { vendorId: 0x1234, deviceId: 0x5678, classCode: 0 } as const;

/** The field an invalid description's InvalidDeviceError names (fails if the description is accepted). */
export function fieldOf(description: PciDeviceDescription): string {
  try {
    new PciDevice(description).close();
  } catch (error) {
    expect(error).toBeInstanceOf(InvalidDeviceError);
    return (error as InvalidDeviceError).field;
  }
  throw new Error('the description was accepted');
}

/** What KVM does when a guest write matches an ioeventfd: add 1 to the counter (8 bytes, native endian). */
export function kvmSignal(fd: number): void {
  const one = Buffer.alloc(8);
  one.writeBigUInt64LE(1n);
  writeSync(fd, one);
}

export interface Guest {
  cfg8(offset: number): Promise<number>;
  cfg16(offset: number): Promise<number>;
  cfg32(offset: number): Promise<number>;
  setCfg16(offset: number, value: number): Promise<void>;
  setCfg32(offset: number, value: number): Promise<void>;
  bar32(region: number, offset: number): Promise<number>;
  setBar32(region: number, offset: number, value: number): Promise<void>;
  /** Offsets of the standard capabilities by ID, walking the list from 0x34. */
  capabilities(): Promise<Map<number, number>>;
  /** Offsets of the extended capabilities by ID, walking from 0x100. */
  extendedCapabilities(): Promise<Map<number, number>>;
}

export function guest(client: VfioUserClient): Guest {
  const read = async (region: number, offset: number, n: number) => client.regionRead(region, BigInt(offset), n);
  const write = async (region: number, offset: number, width: 2 | 4, value: number) => {
    const b = Buffer.alloc(width);
    b.writeUIntLE(value >>> 0, 0, width);
    await client.regionWrite(region, BigInt(offset), b);
  };
  const g: Guest = {
    cfg8: (o) => client.pci.read(o, 1),
    cfg16: (o) => client.pci.read(o, 2),
    cfg32: (o) => client.pci.read(o, 4),
    setCfg16: (o, v) => client.pci.write(o, 2, v),
    setCfg32: (o, v) => client.pci.write(o, 4, v),
    bar32: async (r, o) => (await read(r, o, 4)).readUInt32LE(0),
    setBar32: (r, o, v) => write(r, o, 4, v),
    async capabilities() {
      const found = new Map<number, number>();
      if (!((await g.cfg16(Cfg.STATUS)) & Status.CAPABILITIES)) return found;
      for (let at = await g.cfg8(Cfg.CAPABILITIES); at !== 0; at = await g.cfg8(at + Cap.NEXT)) {
        if (found.size > 48) throw new Error('capability list loops');
        found.set(await g.cfg8(at + Cap.ID), at);
      }
      return found;
    },
    async extendedCapabilities() {
      const found = new Map<number, number>();
      for (let at = CONFIG_SIZE; at !== 0;) {
        const header = await g.cfg32(at);
        if (header === 0) break;
        if (found.size > 64) throw new Error('extended list loops');
        found.set(header & ExtCap.ID_MASK, at);
        at = header >>> ExtCap.NEXT_SHIFT;
      }
      return found;
    },
  };
  return g;
}

/** The client's interrupt eventfds, closed by `closeAll`. */
export class Eventfds {
  private readonly irqs: EventfdIrq[] = [];

  create(n: number): EventfdIrq[] {
    const made = Array.from({ length: n }, () => new EventfdIrq());
    this.irqs.push(...made);
    return made;
  }

  closeAll(): void {
    this.irqs.splice(0).forEach((irq) => irq.close());
  }
}

export const COMMAND_MEMORY_BUS_MASTER = Command.MEMORY | Command.BUS_MASTER;
