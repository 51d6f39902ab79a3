/** A guest-like enumeration of the capability-rich example, through the client. */
import { afterEach, describe, expect, test } from 'vitest';
import { CapabilityId, ExtendedCapabilityId, PciDevice, Region, RegionInfoFlags } from '../ts/index.js';
import { DOORBELL_SERIAL, DoorbellDevice, MSIX_PBA_OFFSET } from '../examples/msix-device.js';
import { loadDevice } from '../ts/cli/serve.js';
import { serve, type Served } from './helpers.js';
import { guest } from './pci-helpers.js';
import { pciFunction } from '../ts/pci/device.js';

let served: Served<PciDevice>;
afterEach(async () => served?.close());

describe('enumerating the doorbell card', () => {
  test('config space is 4 KiB with a PCIe capability, and reads stay native', async () => {
    served = await serve(new DoorbellDevice());
    const client = await served.client();
    expect(await client.getRegionInfo(Region.CONFIG)).toMatchObject({ size: 4096n, flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE });
    const g = guest(client);
    const before = served.server.session!.readsAnsweredNatively;
    expect(await g.cfg32(0)).toBe(0x10f01b36);
    expect(await g.cfg32(0x08)).toBe(0xff000001); // class ff0000, revision 1
    expect(await g.cfg8(0x0e)).toBe(0); // header type 0, single function
    expect(served.server.session!.readsAnsweredNatively).toBe(before + 3);
  });

  test('walks the capability list: status bit 4, 0x34, chained in offset order', async () => {
    served = await serve(new DoorbellDevice());
    const g = guest(await served.client());
    expect((await g.cfg16(0x06)) & 0x10).toBe(0x10);
    expect(await g.cfg8(0x34)).toBe(0x40);
    const caps = await g.capabilities();
    expect([...caps]).toEqual([
      [CapabilityId.POWER_MANAGEMENT, 0x40],
      [CapabilityId.MSI, 0x48],
      [CapabilityId.MSIX, 0x60],
      [CapabilityId.PCI_EXPRESS, 0x6c],
      [CapabilityId.VENDOR, 0xa8],
    ]);
    // PM: version 3, no D1/D2; PMCSR D0 with No_Soft_Reset.
    expect(await g.cfg16(0x42)).toBe(0x0003);
    expect(await g.cfg16(0x44)).toBe(0x0008);
    // MSI: 4 vectors capable, 64-bit, per-vector masking.
    expect(await g.cfg16(0x4a)).toBe(0x0184);
    // MSI-X: 8 entries, table at BAR4+0, PBA at BAR4+0x800.
    expect(await g.cfg16(0x62)).toBe(7);
    expect(await g.cfg32(0x64)).toBe(0x000 | 4);
    expect(await g.cfg32(0x68)).toBe(MSIX_PBA_OFFSET | 4);
    // PCIe v2 endpoint; FLR capable, 256-byte payloads; one 2.5 GT/s lane.
    expect(await g.cfg16(0x6e)).toBe(0x0002);
    expect((await g.cfg32(0x70)) & ((1 << 28) | 7)).toBe((1 << 28) | 1);
    expect(await g.cfg16(0x6c + 0x12)).toBe(0x0011);
    // Vendor-specific: length 11, then the device's bytes.
    expect(await g.cfg8(0xaa)).toBe(11);
    expect(await g.cfg32(0xab)).toBe(1);
    // A PCIe function hardwires the latency timer.
    await g.setCfg16(0x0c, 0xffff);
    expect(await g.cfg16(0x0c)).toBe(0x00ff);
  });

  test('walks the extended list from 0x100: DSN, VSEC, AER', async () => {
    served = await serve(new DoorbellDevice());
    const client = await served.client();
    const g = guest(client);
    const ext = await g.extendedCapabilities();
    expect([...ext]).toEqual([
      [ExtendedCapabilityId.SERIAL_NUMBER, 0x100],
      [ExtendedCapabilityId.VENDOR, 0x10c],
      [ExtendedCapabilityId.AER, 0x11c],
    ]);
    expect((await g.cfg32(0x100)) >>> 16 & 0xf).toBe(1);
    const serial = (BigInt(await g.cfg32(0x108)) << 32n) | BigInt(await g.cfg32(0x104));
    expect(serial).toBe(DOORBELL_SERIAL);
    // VSEC header: id 1, rev 1, length 16 (both headers + 8 bytes).
    expect(await g.cfg32(0x110)).toBe(0x0001 | (1 << 16) | (16 << 20));
    expect((await client.regionRead(Region.CONFIG, 0x114n, 5)).toString()).toBe('DBELL');
    // AER: version 2; severity defaults; correctable status is RW1C.
    expect((await g.cfg32(0x11c)) >>> 16 & 0xf).toBe(2);
    expect(await g.cfg32(0x11c + 0x0c)).toBe(0x00062030);
    pciFunction(served.device).config.bytes.writeUInt32LE(0x41, 0x11c + 0x10);
    await g.setCfg32(0x11c + 0x10, 0x01);
    expect(await g.cfg32(0x11c + 0x10)).toBe(0x40);
    expect(await g.cfg32(0x164)).toBe(0); // past the last capability
  });

  test('sizes every BAR, including the 64-bit upper half, then takes addresses', async () => {
    served = await serve(new DoorbellDevice());
    const g = guest(await served.client());
    const original = [];
    for (let n = 0; n < 6; n++) original.push(await g.cfg32(0x10 + 4 * n));
    expect(original).toEqual([0x4, 0, 0, 0, 0, 0]);
    for (let n = 0; n < 6; n++) await g.setCfg32(0x10 + 4 * n, 0xffffffff);
    const sized = [];
    for (let n = 0; n < 6; n++) sized.push(await g.cfg32(0x10 + 4 * n));
    expect(sized).toEqual([0xfffff004, 0xffffffff, 0, 0, 0xfffff000, 0]);
    await g.setCfg32(0x10, 0xfebf1000);
    await g.setCfg32(0x14, 0x00000001);
    await g.setCfg32(0x20, 0xfebf2abc);
    expect([await g.cfg32(0x10), await g.cfg32(0x14), await g.cfg32(0x20)]).toEqual([0xfebf1004, 1, 0xfebf2000]);
  });

  test('sizes the expansion ROM with and without the enable bit', async () => {
    served = await serve(new DoorbellDevice());
    const client = await served.client();
    const g = guest(client);
    await g.setCfg32(0x30, 0xfffff800); // Linux: the address mask, enable clear
    expect(await g.cfg32(0x30)).toBe(0xfffff800);
    await g.setCfg32(0x30, 0xffffffff);
    expect(await g.cfg32(0x30)).toBe(0xfffff801); // 2 KiB, enable bit kept
    await g.setCfg32(0x30, 0xfeb80001);
    expect(await g.cfg32(0x30)).toBe(0xfeb80001);
    expect(await client.getRegionInfo(Region.ROM)).toMatchObject({ size: 2048n, flags: RegionInfoFlags.READ });
    expect((await client.regionRead(Region.ROM, 0n, 8)).toString()).toBe('DOORBELL');
  });

  test('the header takes accesses of any width across register boundaries', async () => {
    served = await serve(new DoorbellDevice());
    const client = await served.client();
    // Command (RW bits) and status (RO here) in one 4-byte write at 0x04.
    await client.regionWrite(Region.CONFIG, 4n, Buffer.from([0xff, 0xff, 0xff, 0xff]));
    expect((await client.regionRead(Region.CONFIG, 4n, 4)).readUInt32LE(0)).toBe(0x00100547);
    expect([served.device.ioEnabled, served.device.memoryEnabled, served.device.busMaster]).toEqual([true, true, true]);
    // A 2-byte write straddling the device and command registers changes only command bits.
    await client.regionWrite(Region.CONFIG, 3n, Buffer.from([0x00, 0x00]));
    expect((await client.regionRead(Region.CONFIG, 2n, 4)).readUInt32LE(0)).toBe(0x0500_10f0);
    expect([served.device.ioEnabled, served.device.memoryEnabled, served.device.busMaster]).toEqual([false, false, false]);
  });

  test('is servable by `vfio-user serve` (a default export making the device)', async () => {
    const device = await loadDevice('examples/msix-device.ts');
    // tsx loads its own copy of the module, so compare by shape rather than instanceof.
    expect(device.constructor.name).toBe('DoorbellDevice');
    expect(pciFunction(device as PciDevice).regionInfo(Region.CONFIG).size).toBe(4096n);
    expect(pciFunction(device as PciDevice).irqInfo(2).count).toBe(8);
  });
});
