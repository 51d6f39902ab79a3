/** Guest-side config and BAR access for the PCI tests, as a guest's PCI core does it. */
import { native, Region, type VfioUserClient } from '../ts/index.js';

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
    cfg8: async (o) => (await read(Region.CONFIG, o, 1))[0],
    cfg16: async (o) => (await read(Region.CONFIG, o, 2)).readUInt16LE(0),
    cfg32: async (o) => (await read(Region.CONFIG, o, 4)).readUInt32LE(0),
    setCfg16: (o, v) => write(Region.CONFIG, o, 2, v),
    setCfg32: (o, v) => write(Region.CONFIG, o, 4, v),
    bar32: async (r, o) => (await read(r, o, 4)).readUInt32LE(0),
    setBar32: (r, o, v) => write(r, o, 4, v),
    async capabilities() {
      const found = new Map<number, number>();
      if (!((await g.cfg16(0x06)) & 0x10)) return found;
      for (let at = await g.cfg8(0x34); at !== 0; at = await g.cfg8(at + 1)) {
        if (found.size > 48) throw new Error('capability list loops');
        found.set(await g.cfg8(at), at);
      }
      return found;
    },
    async extendedCapabilities() {
      const found = new Map<number, number>();
      for (let at = 0x100; at !== 0;) {
        const header = await g.cfg32(at);
        if (header === 0) break;
        if (found.size > 64) throw new Error('extended list loops');
        found.set(header & 0xffff, at);
        at = header >>> 20;
      }
      return found;
    },
  };
  return g;
}

/** Eventfds closed by `closeAll`. */
export class Eventfds {
  private readonly fds: number[] = [];

  create(n: number): number[] {
    const made = Array.from({ length: n }, () => native.eventfdCreate());
    this.fds.push(...made);
    return made;
  }

  closeAll(): void {
    this.fds.splice(0).forEach((fd) => native.closeFd(fd));
  }
}

export const COMMAND_MEMORY_BUS_MASTER = 0x0006;
