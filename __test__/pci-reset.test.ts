/** FLR, power states, device-status RW1C bits and vendor-register hooks. */
import { afterEach, describe, expect, test } from 'vitest';
import { PciDevice, Region } from '../ts/index.js';
import { DOORBELL, DoorbellDevice } from '../examples/msix-device.js';
import { serve, type Served } from './helpers.js';
import { COMMAND_MEMORY_BUS_MASTER, guest } from './pci-helpers.js';
import { pciFunction } from '../ts/pci/device.js';

let served: Served<PciDevice>;
afterEach(async () => served?.close());

const PM = 0x40;
const PCIE = 0x6c;
const DEVCTL = PCIE + 8;
const DEVSTA = PCIE + 0xa;

describe('Function Level Reset', () => {
  test('Initiate FLR calls the reset hook and restores config defaults', async () => {
    const device = new DoorbellDevice();
    served = await serve(device);
    const g = guest(await served.client());
    await g.setCfg16(0x04, COMMAND_MEMORY_BUS_MASTER);
    await g.setCfg32(0x10, 0xfebf1000);
    await g.setCfg16(0x62, 0x8000); // MSI-X enable
    await g.setBar32(Region.BAR0, DOORBELL.SCRATCH, 0x1234);
    await g.setBar32(Region.BAR0, DOORBELL.RING, 0);
    expect(await g.cfg16(DEVCTL)).toBe(0x2810);
    await g.setCfg16(DEVCTL, 0x2810 | 0x00e0); // MPS bits stick
    expect(await g.cfg16(DEVCTL)).toBe(0x28f0);

    await g.setCfg16(DEVCTL, 0x8000 | 0x28f0);
    expect(await g.cfg16(DEVCTL)).toBe(0x28f0); // Initiate FLR reads 0; Max_Payload_Size kept by FLR (PCIe §6.6.2)
    expect(await g.cfg16(0x04)).toBe(0);
    expect(await g.cfg32(0x10)).toBe(0x4);
    expect(await g.cfg16(0x62)).toBe(7);
    expect(await g.bar32(Region.BAR0, DOORBELL.SCRATCH)).toBe(0);
    expect(device.rings).toBe(0);
  });

  test('a device without FLR ignores Initiate FLR', async () => {
    let resets = 0;
    served = await serve(new PciDevice({ vendorId: 1, deviceId: 2, classCode: 0, capabilities: [{ kind: 'pcie', flr: false }], onReset: () => { resets++; } }));
    const g = guest(await served.client());
    await g.setCfg16(0x04, 0x0002);
    await g.setCfg16(0x40 + 8, 0x8000);
    expect(resets).toBe(0);
    expect(await g.cfg16(0x04)).toBe(0x0002);
    expect((await g.cfg32(0x40 + 4)) & (1 << 28)).toBe(0);
  });

  test('Device Status error bits clear on a write of 1', async () => {
    served = await serve(new DoorbellDevice());
    const g = guest(await served.client());
    pciFunction(served.device).config.bytes.writeUInt16LE(0x0005, DEVSTA);
    await g.setCfg16(DEVSTA, 0x0001);
    expect(await g.cfg16(DEVSTA)).toBe(0x0004);
  });
});

describe('Power Management', () => {
  test('PMCSR takes D0 and D3hot, discards states the device lacks', async () => {
    served = await serve(new DoorbellDevice());
    const g = guest(await served.client());
    await g.setCfg16(PM + 4, 3);
    expect(served.device.powerState).toBe('D3hot');
    await g.setCfg16(PM + 4, 1); // D1: not supported
    expect(served.device.powerState).toBe('D3hot');
    expect(await g.cfg16(PM + 4)).toBe(0x0008 | 3);
    await g.setCfg16(PM + 4, 0);
    expect(served.device.powerState).toBe('D0');
  });

  test('D3hot to D0 resets the device only without No_Soft_Reset', async () => {
    let resets = 0;
    const make = (noSoftReset: boolean) => new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      capabilities: [{ kind: 'pm', noSoftReset, d1: true }],
      onReset: () => { resets++; },
    });
    served = await serve(make(true));
    let g = guest(await served.client());
    await g.setCfg16(0x04, 0x0002);
    await g.setCfg16(0x44, 1);
    expect(served.device.powerState).toBe('D1');
    await g.setCfg16(0x44, 3);
    await g.setCfg16(0x44, 0);
    expect(resets).toBe(0);
    expect(await g.cfg16(0x04)).toBe(0x0002);
    await served.close();

    served = await serve(make(false));
    g = guest(await served.client());
    await g.setCfg16(0x04, 0x0002);
    await g.setCfg16(0x44, 3);
    await g.setCfg16(0x44, 0);
    expect(resets).toBe(1);
    expect(await g.cfg16(0x04)).toBe(0);
    expect(await g.cfg16(0x44)).toBe(0);
  });
});

describe('vendor registers', () => {
  test('the writable mask holds, and write hooks see offsets relative to the registers', async () => {
    const writes: string[] = [];
    served = await serve(new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      capabilities: [{
        kind: 'vendor', at: 0x50,
        data: Buffer.from([1, 2, 3, 4]), writable: Buffer.from([0, 0xff, 0x0f, 0]),
        write: (offset, data) => writes.push(`${offset}:${data.toString('hex')}`),
      }],
    }));
    const client = await served.client();
    const g = guest(client);
    expect([...(await g.capabilities())]).toEqual([[0x09, 0x50]]);
    await client.regionWrite(Region.CONFIG, 0x51n, Buffer.from([0xee, 0xee, 0xee, 0xee, 0xee]));
    expect((await client.regionRead(Region.CONFIG, 0x50n, 7)).toString('hex')).toBe('09000701ee0e04');
    expect(writes).toEqual(['0:eeeeee']); // the next pointer and length are not the device's
  });

  test('a read hook computes registers and sends config reads through JS', async () => {
    let reads = 0;
    served = await serve(new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      capabilities: [{ kind: 'pcie' }],
      extendedCapabilities: [{ kind: 'vsec', vsecId: 7, data: Buffer.alloc(8), read: (offset, size) => { reads++; return Buffer.alloc(size, 0x10 + offset); } }],
    }));
    const client = await served.client();
    const before = served.server.session!.readsAnsweredNatively;
    expect((await client.regionRead(Region.CONFIG, 0x108n, 4)).toString('hex')).toBe('10101010');
    expect((await client.regionRead(Region.CONFIG, 0x104n, 8)).readUInt32LE(0)).toBe(7 | (16 << 20));
    expect(reads).toBe(2);
    expect(served.server.session!.readsAnsweredNatively).toBe(before);
  });
});
