/**
 * A PciDevice subclass names its members freely: nothing it defines replaces
 * what the library answers the client, and the one name that would look like a
 * hook and silently not be one (`reset`) is refused, by the type checker and
 * at construction.
 */
import { afterEach, describe, expect, test } from 'vitest';
import { PciDevice, Region, UsageError } from '../ts/index.js';
import { serve, type Served } from './helpers.js';
import { COMMAND_MEMORY_BUS_MASTER, guest } from './pci-helpers.js';

let served: Served<PciDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served = undefined;
});

/** A register file whose helpers carry the names the protocol side used to have. */
class Registers extends PciDevice {
  readonly log: string[] = [];
  private value = 0;

  constructor() {
    super({
      vendorId: 0x1234, deviceId: 0x0002, classCode: 0xff0000, intx: 'A',
      bars: {
        0: {
          kind: 'memory', size: 4096,
          read: (offset) => this.read(offset),
          write: (offset, data) => this.write(offset, data.readUInt32LE(0)),
        },
      },
      onReset: () => {
        this.value = 0;
        this.log.push('onReset');
      },
    });
  }

  // Signatures unlike any the library has: a subclass's own helpers.
  read(register: number): number {
    this.log.push(`read ${register}`);
    return register === 0 ? this.value : 0;
  }

  write(register: number, value: number): void {
    this.log.push(`write ${register}`);
    if (register === 0) this.value = value;
  }

  regionInfo(): string {
    return 'mine';
  }

  attach(): void {
    this.log.push('attach');
  }
}

describe('a PciDevice subclass', () => {
  test('its read/write/regionInfo/attach are its own: the client is answered by the library', async () => {
    const device = new Registers();
    served = await serve(device);
    const client = await served.client();
    const g = guest(client);
    expect(await g.cfg16(0x00)).toBe(0x1234);
    expect((await client.getRegionInfo(Region.BAR0)).size).toBe(4096n);
    await g.setBar32(Region.BAR0, 0, 0xabcd);
    expect(await g.bar32(Region.BAR0, 0)).toBe(0xabcd);
    // Only the description's handlers called the helpers; nothing called attach().
    expect(device.log).toEqual(['write 0', 'read 0']);
  });

  test('a client reset runs the library reset (COMMAND reads 0) and then onReset', async () => {
    const device = new Registers();
    served = await serve(device);
    const client = await served.client();
    const g = guest(client);
    await g.setCfg16(0x04, COMMAND_MEMORY_BUS_MASTER);
    await g.setBar32(Region.BAR0, 0, 7);
    expect(await g.cfg16(0x04)).toBe(COMMAND_MEMORY_BUS_MASTER);
    await client.reset();
    expect(await g.cfg16(0x04)).toBe(0);
    expect(await g.bar32(Region.BAR0, 0)).toBe(0);
    expect(device.log).toContain('onReset');
  });

  test('defining reset() is a type error, and a UsageError at construction', () => {
    class AsyncReset extends PciDevice {
      // @ts-expect-error a subclass cannot define reset(): the description's onReset is the hook
      async reset(): Promise<void> {}
    }
    expect(() => new AsyncReset({ vendorId: 1, deviceId: 2, classCode: 0 })).toThrow(UsageError);
    expect(() => new AsyncReset({ vendorId: 1, deviceId: 2, classCode: 0 })).toThrow(/AsyncReset defines reset\(\).*onReset/);
  });
});
