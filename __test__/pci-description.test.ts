/** Checking descriptions at construction, and where capabilities end up. */
import { describe, expect, test } from 'vitest';
import { PciDevice, type PciDeviceDescription } from '../ts/index.js';
import { base, fieldOf } from './pci-helpers.js';
import { pciFunction } from '../ts/pci/device.js';
const bar4 = { 4: { kind: 'memory', size: 4096 } } as const;

describe('invalid descriptions throw InvalidDeviceError naming the field', () => {
  const cases: [string, PciDeviceDescription, string][] = [
    ['a vendor ID wider than 16 bits', { ...base, vendorId: 0x10000 }, 'vendorId'],
    ['a non-power-of-two BAR', { ...base, bars: { 0: { kind: 'memory', size: 3000 } } }, 'bars[0].size'],
    ['an I/O BAR below 4 bytes', { ...base, bars: { 1: { kind: 'io', size: 2 } } }, 'bars[1].size'],
    ['a 64-bit BAR in BAR5', { ...base, bars: { 5: { kind: 'memory', size: 4096, width: 64 } } }, 'bars[5].width'],
    ['a BAR in the upper half of a 64-bit one', { ...base, bars: { 2: { kind: 'memory', size: 4096, width: 64 }, 3: { kind: 'io', size: 4 } } }, 'bars[3]'],
    ['overlapping capabilities', { ...base, capabilities: [{ kind: 'pm', at: 0x40 }, { kind: 'msi', vectors: 1, at: 0x44 }] }, 'capabilities[1].at'],
    ['a capability past config space', { ...base, capabilities: [{ kind: 'vendor', at: 0xf8, data: Buffer.alloc(16) }] }, 'capabilities[0].at'],
    ['an unaligned capability', { ...base, capabilities: [{ kind: 'pm', at: 0x42 }] }, 'capabilities[0].at'],
    ['a capability in the header', { ...base, capabilities: [{ kind: 'pm', at: 0x3c }] }, 'capabilities[0].at'],
    ['an unknown capability', { ...base, capabilities: [{ kind: 'sriov' } as never] }, 'capabilities[0].kind'],
    ['two MSI capabilities', { ...base, capabilities: [{ kind: 'msi', vectors: 1 }, { kind: 'msi', vectors: 2 }] }, 'capabilities[1].kind'],
    ['MSI with 3 vectors', { ...base, capabilities: [{ kind: 'msi', vectors: 3 as never }] }, 'capabilities[0].vectors'],
    ['an MSI-X table outside its BAR', { ...base, bars: bar4, capabilities: [{ kind: 'msix', vectors: 8, table: { bar: 4, offset: 4000 }, pba: { bar: 4, offset: 0 } }] }, 'capabilities[0].table.offset'],
    ['a PBA outside its BAR', { ...base, bars: bar4, capabilities: [{ kind: 'msix', vectors: 8, table: { bar: 4, offset: 0 }, pba: { bar: 4, offset: 4096 } }] }, 'capabilities[0].pba.offset'],
    ['a PBA overlapping the table', { ...base, bars: bar4, capabilities: [{ kind: 'msix', vectors: 8, table: { bar: 4, offset: 0 }, pba: { bar: 4, offset: 0x70 } }] }, 'capabilities[0].pba.offset'],
    ['an MSI-X table in an undeclared BAR', { ...base, bars: bar4, capabilities: [{ kind: 'msix', vectors: 8, table: { bar: 0, offset: 0 }, pba: { bar: 4, offset: 0 } }] }, 'capabilities[0].table.bar'],
    ['an MSI-X table in an I/O BAR', { ...base, bars: { 0: { kind: 'io', size: 256 } }, capabilities: [{ kind: 'msix', vectors: 1, table: { bar: 0, offset: 0 }, pba: { bar: 0, offset: 16 } }] }, 'capabilities[0].table.bar'],
    ['a misaligned MSI-X table', { ...base, bars: bar4, capabilities: [{ kind: 'msix', vectors: 1, table: { bar: 4, offset: 4 }, pba: { bar: 4, offset: 0x800 } }] }, 'capabilities[0].table.offset'],
    ['too many MSI-X vectors', { ...base, bars: bar4, capabilities: [{ kind: 'msix', vectors: 4096, table: { bar: 4, offset: 0 }, pba: { bar: 4, offset: 0 } }] }, 'capabilities[0].vectors'],
    ['an unknown PCIe device type', { ...base, capabilities: [{ kind: 'pcie', type: 'root-port' as never }] }, 'capabilities[0].type'],
    ['a vendor mask of the wrong length', { ...base, capabilities: [{ kind: 'vendor', data: Buffer.alloc(4), writable: Buffer.alloc(2) }] }, 'capabilities[0].writable'],
    ['extended capabilities without PCIe', { ...base, extendedCapabilities: [{ kind: 'aer' }] }, 'extendedCapabilities'],
    ['an extended list not starting at 0x100', { ...base, capabilities: [{ kind: 'pcie' }], extendedCapabilities: [{ kind: 'dsn', serial: 1n, at: 0x200 }] }, 'extendedCapabilities[0].at'],
    ['an extended capability past 4 KiB', { ...base, capabilities: [{ kind: 'pcie' }], extendedCapabilities: [{ kind: 'aer', at: 0xfe0 }] }, 'extendedCapabilities[0].at'],
    ['a VSEC ID wider than 16 bits', { ...base, capabilities: [{ kind: 'pcie' }], extendedCapabilities: [{ kind: 'vsec', vsecId: 0x10000, data: Buffer.alloc(4) }] }, 'extendedCapabilities[0].vsecId'],
    ['a serial number wider than 64 bits', { ...base, capabilities: [{ kind: 'pcie' }], extendedCapabilities: [{ kind: 'dsn', serial: 1n << 64n }] }, 'extendedCapabilities[0].serial'],
  ];
  test.each(cases)('%s', (_what, description, field) => {
    expect(fieldOf(description)).toBe(field);
  });
});

describe('layout', () => {
  test('fixed capabilities stay put; the rest fill the lowest free slots; chained by offset', () => {
    const device = new PciDevice({
      ...base,
      bars: bar4,
      capabilities: [
        { kind: 'msix', vectors: 4, table: { bar: 4, offset: 0 }, pba: { bar: 4, offset: 0x800 }, at: 0x44 },
        { kind: 'pm' },
        { kind: 'msi', vectors: 1, address64: false },
      ],
    });
    const c = pciFunction(device).config;
    expect(c.size).toBe(256);
    // msix holds 0x44-0x4f, so pm (8 bytes) cannot fit at 0x40; msi follows pm.
    expect(c.u8(0x34)).toBe(0x44);
    expect([c.u8(0x44), c.u8(0x45)]).toEqual([0x11, 0x50]);
    expect([c.u8(0x50), c.u8(0x51)]).toEqual([0x01, 0x58]);
    expect([c.u8(0x58), c.u8(0x59)]).toEqual([0x05, 0x00]);
  });

  test('no capabilities: status bit 4 clear, 0x34 zero, 256 bytes', () => {
    const device = new PciDevice(base);
    expect(pciFunction(device).config.size).toBe(256);
    expect(pciFunction(device).config.u16(0x06) & 0x10).toBe(0);
    expect(pciFunction(device).config.u8(0x34)).toBe(0);
  });

  test('PCIe without extended capabilities: 4 KiB and 0x100 reads 0', () => {
    const device = new PciDevice({ ...base, capabilities: [{ kind: 'pcie' }] });
    expect(pciFunction(device).config.size).toBe(4096);
    expect(pciFunction(device).config.u32(0x100)).toBe(0);
  });
});
