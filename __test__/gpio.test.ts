/** The PCI-IDIO-16 example, driven through the client as its Linux driver would. */
import { afterEach, describe, expect, test } from 'vitest';
import { EventfdIrq, IrqIndex, Region } from '../ts/index.js';
import { IDIO16, type PciIdio16 } from '../examples/gpio.js';
import { serve, type Served } from './helpers.js';

let served: Served<PciIdio16>;
let ev: EventfdIrq | undefined;
afterEach(async () => {
  await served?.close();
  ev?.close();
  ev = undefined;
});

const reg = (n: number) => BigInt(n);

describe('PCI-IDIO-16 GPIO card', () => {
  test('enumerates with the real card’s IDs, an 8-byte I/O BAR2 and INTA', async () => {
    served = await serve();
    const client = await served.client();
    const cfg = await client.regionRead(Region.CONFIG, 0n, 64);
    expect(cfg.readUInt16LE(0)).toBe(0x494f);
    expect(cfg.readUInt16LE(2)).toBe(0x0dc8);
    expect(cfg.readUInt32LE(0x18) & 1).toBe(1);
    expect(cfg[0x3d]).toBe(1);
    expect((await client.getRegionInfo(Region.BAR2)).size).toBe(8n);
  });

  test('outputs read back what was written, in both banks', async () => {
    served = await serve();
    const client = await served.client();
    await client.regionWrite(Region.BAR2, reg(IDIO16.OUT0_7), Buffer.from([0x81]));
    await client.regionWrite(Region.BAR2, reg(IDIO16.OUT8_15), Buffer.from([0x7e]));
    expect((await client.regionRead(Region.BAR2, reg(IDIO16.OUT0_7), 1))[0]).toBe(0x81);
    expect((await client.regionRead(Region.BAR2, reg(IDIO16.OUT8_15), 1))[0]).toBe(0x7e);
    expect(served.device.outputs).toBe(0x7e81);
  });

  test('inputs changing with the IRQ enabled raise INTx; clearing drops it', async () => {
    served = await serve();
    const client = await served.client();
    ev = new EventfdIrq();
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [ev] });
    served.device.setInputs(0x0001);
    expect(ev.take()).toBe(0); // IRQ still disabled
    await client.regionRead(Region.BAR2, reg(IDIO16.IRQ_CTL), 1); // a read enables it
    served.device.setInputs(0x0101);
    expect(ev.take()).toBe(1);
    const status = (await client.regionRead(Region.BAR2, reg(IDIO16.IRQ_STATUS), 1))[0];
    expect(status).toBe(0b110); // bank 8-15 changed, interrupt pending
    expect((await client.regionRead(Region.BAR2, reg(IDIO16.IN8_15), 1))[0]).toBe(0x01);
    await client.regionWrite(Region.BAR2, reg(IDIO16.IN0_7), Buffer.from([0])); // clear interrupt
    expect((await client.regionRead(Region.BAR2, reg(IDIO16.IRQ_STATUS), 1))[0]).toBe(0);
    expect((await client.regionRead(Region.CONFIG, 6n, 1))[0] & 0x08).toBe(0);
  });

  test('input filters and IRQ enable follow the register side effects', async () => {
    served = await serve();
    const client = await served.client();
    await client.regionRead(Region.BAR2, reg(IDIO16.FILTER_CTL), 1);
    expect(served.device.filtersEnabled).toBe(true);
    await client.regionWrite(Region.BAR2, reg(IDIO16.FILTER_CTL), Buffer.from([0]));
    expect(served.device.filtersEnabled).toBe(false);
    await client.regionRead(Region.BAR2, reg(IDIO16.IRQ_CTL), 1);
    expect(served.device.interruptEnabled).toBe(true);
    await client.regionWrite(Region.BAR2, reg(IDIO16.IRQ_CTL), Buffer.from([0]));
    expect(served.device.interruptEnabled).toBe(false);
  });
});
