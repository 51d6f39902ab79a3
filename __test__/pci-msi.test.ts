/** MSI (with per-vector masking) and the INTx fallback, through one irq.raise(). */
import { afterEach, describe, expect, test } from 'vitest';
import { IrqIndex, PciDevice, Region, type EventfdIrq, type VfioUserClient } from '../ts/index.js';
import { DOORBELL, DoorbellDevice } from '../examples/msix-device.js';
import { serve, type Served } from './helpers.js';
import { COMMAND_MEMORY_BUS_MASTER, Eventfds, guest, type Guest } from './pci-helpers.js';

let served: Served<PciDevice>;
const eventfds = new Eventfds();
afterEach(async () => {
  await served?.close();
  eventfds.closeAll();
});

const MSI = 0x48;
const CONTROL = MSI + 2;
const MASK = MSI + 0x10;
const PENDING = MSI + 0x14;

async function msiEnabled(): Promise<{ client: VfioUserClient; g: Guest; evs: EventfdIrq[] }> {
  served = await serve(new DoorbellDevice());
  const client = await served.client();
  const g = guest(client);
  await g.setCfg16(0x04, COMMAND_MEMORY_BUS_MASTER);
  await g.setCfg32(MSI + 4, 0xfee00000);
  await g.setCfg32(MSI + 8, 0);
  await g.setCfg16(MSI + 0xc, 0x4050);
  await g.setCfg16(CONTROL, (2 << 4) | 1); // 4 vectors, enable
  const evs = eventfds.create(4);
  await client.setIrqs({ index: IrqIndex.MSI, eventfds: evs });
  return { client, g, evs };
}

describe('MSI', () => {
  test('Multiple Message Enable is clamped to what the device is capable of', async () => {
    served = await serve(new DoorbellDevice());
    const g = guest(await served.client());
    await g.setCfg16(CONTROL, 7 << 4);
    expect(await g.cfg16(CONTROL)).toBe(0x0184 | (2 << 4));
    expect(await g.cfg32(MSI + 4)).toBe(0);
    await g.setCfg32(MSI + 4, 0xfee00003);
    expect(await g.cfg32(MSI + 4)).toBe(0xfee00000); // dword-aligned address
    // Mask bits exist for the 4 capable vectors only.
    await g.setCfg32(MASK, 0xffffffff);
    expect(await g.cfg32(MASK)).toBe(0xf);
  });

  test('a per-vector masked vector is pending until unmasked, then delivered', async () => {
    const { g, evs } = await msiEnabled();
    expect(served.device.irq.mode).toBe('msi');
    expect(served.device.irq.raise(2)).toBe('sent');
    expect(evs[2].take()).toBe(1);
    await g.setCfg32(MASK, 1 << 2);
    expect(served.device.irq.raise(2)).toBe('pending');
    expect(evs[2].take()).toBe(0);
    expect(await g.cfg32(PENDING)).toBe(1 << 2);
    await g.setCfg32(PENDING, 0); // read-only
    expect(await g.cfg32(PENDING)).toBe(1 << 2);
    await g.setCfg32(MASK, 0);
    expect(evs[2].take()).toBe(1);
    expect(await g.cfg32(PENDING)).toBe(0);
  });

  test('the guest rings a doorbell and its vector fires', async () => {
    const { g, evs } = await msiEnabled();
    await g.setBar32(Region.BAR0, DOORBELL.RING, 1);
    expect(evs[1].take()).toBe(1);
  });

  test('with fewer vectors enabled, events share them', async () => {
    const { g, evs } = await msiEnabled();
    await g.setCfg16(CONTROL, (1 << 4) | 1); // 2 vectors
    expect(served.device.irq.raise(3)).toBe('sent');
    expect(evs[1].take()).toBe(1);
    expect(() => served.device.irq.raise(8)).toThrow(/vector 8/);
  });

  test('SET_IRQS MASK/UNMASK holds MSI vectors too', async () => {
    const { client, evs } = await msiEnabled();
    await client.setIrqs({ index: IrqIndex.MSI, start: 0, count: 1, action: 'mask' });
    expect(served.device.irq.raise(0)).toBe('pending');
    expect(evs[0].take()).toBe(0);
    await client.setIrqs({ index: IrqIndex.MSI, start: 0, bools: [true], action: 'unmask' });
    expect(evs[0].take()).toBe(1);
  });
});

describe('INTx fallback and level semantics', () => {
  test('with MSI and MSI-X disabled, trigger asserts INTA until the device deasserts it', async () => {
    served = await serve(new DoorbellDevice());
    const client = await served.client();
    const g = guest(client);
    const [ev] = eventfds.create(1);
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [ev] });
    expect(served.device.irq.mode).toBe('intx');
    await g.setBar32(Region.BAR0, DOORBELL.RING, 0);
    expect(ev.take()).toBe(1);
    expect((await g.cfg16(0x06)) & 0x08).toBe(0x08);
    // Acknowledging in the device's STATUS register drops the line.
    await g.setBar32(Region.BAR0, DOORBELL.STATUS, 1);
    expect((await g.cfg16(0x06)) & 0x08).toBe(0);
    expect(served.device.irq.intxRaised).toBe(false);
  });

  test('a device with no INTx pin and nothing enabled drops the interrupt', () => {
    const device = new PciDevice({ vendorId: 1, deviceId: 2, classCode: 0, capabilities: [{ kind: 'msi', vectors: 1 }] });
    expect(device.irq.mode).toBe('none');
    expect(device.irq.raise()).toBe('dropped');
  });

  test('ERR and REQ are raised through the irq API', async () => {
    served = await serve(new DoorbellDevice());
    const client = await served.client();
    const [err, req] = eventfds.create(2);
    await client.setIrqs({ index: IrqIndex.ERR, eventfds: [err] });
    await client.setIrqs({ index: IrqIndex.REQ, eventfds: [req] });
    expect(served.device.irq.signalError()).toBe('sent');
    expect(served.device.irq.requestRelease()).toBe('sent');
    expect([err.take(), req.take()]).toEqual([1, 1]);
  });
});
