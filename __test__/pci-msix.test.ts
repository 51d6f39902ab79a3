/** MSI-X end to end: config writes, table writes through BAR4, eventfds, PBA. */
import { afterEach, describe, expect, test } from 'vitest';
import { IrqIndex, PciDevice, Region, type EventfdIrq, type VfioUserClient } from '../ts/index.js';
import { DOORBELL, DoorbellDevice, MSIX_PBA_OFFSET } from '../examples/msix-device.js';
import { serve, type Served } from './helpers.js';
import { COMMAND_MEMORY_BUS_MASTER, Eventfds, guest, type Guest } from './pci-helpers.js';
import { pciFunction } from '../ts/pci/device.js';

let served: Served<DoorbellDevice>;
const eventfds = new Eventfds();
afterEach(async () => {
  await served?.close();
  eventfds.closeAll();
});

const MSIX = 0x60;
const CONTROL = MSIX + 2;
const ENABLE = 0x8000;
const FUNCTION_MASK = 0x4000;

/** Programs entry `v` as Linux does: address, data, then the vector control word. */
async function program(g: Guest, v: number, masked: boolean): Promise<void> {
  await g.setBar32(Region.BAR4, v * 16, 0xfee00000);
  await g.setBar32(Region.BAR4, v * 16 + 4, 0);
  await g.setBar32(Region.BAR4, v * 16 + 8, 0x4020 + v);
  await g.setBar32(Region.BAR4, v * 16 + 12, masked ? 1 : 0);
}

async function pba(g: Guest): Promise<number> {
  return g.bar32(Region.BAR4, MSIX_PBA_OFFSET);
}

/** Served doorbell card, MSI-X enabled the way Linux does it, all 8 vectors wired. */
async function enabled(): Promise<{ client: VfioUserClient; g: Guest; evs: EventfdIrq[] }> {
  served = await serve(new DoorbellDevice());
  const client = await served.client();
  const g = guest(client);
  await g.setCfg16(0x04, COMMAND_MEMORY_BUS_MASTER);
  await g.setCfg16(CONTROL, ENABLE | FUNCTION_MASK);
  for (let v = 0; v < 8; v++) await program(g, v, true);
  await g.setCfg16(CONTROL, ENABLE);
  const evs = eventfds.create(8);
  await client.setIrqs({ index: IrqIndex.MSIX, eventfds: evs });
  return { client, g, evs };
}

describe('MSI-X', () => {
  test('GET_IRQ_INFO reports the table size, maskable', async () => {
    served = await serve(new DoorbellDevice());
    const client = await served.client();
    expect(await client.getIrqInfo(IrqIndex.MSIX)).toMatchObject({ count: 8, flags: 0b011 });
    expect(await client.getIrqInfo(IrqIndex.MSI)).toMatchObject({ count: 4, flags: 0b011 });
  });

  test('the table powers on masked and reads natively from the BAR', async () => {
    served = await serve(new DoorbellDevice());
    const g = guest(await served.client());
    const before = served.server.session!.readsAnsweredNatively;
    expect(await g.bar32(Region.BAR4, 12)).toBe(1);
    expect(await g.bar32(Region.BAR4, 7 * 16 + 12)).toBe(1);
    expect(await pba(g)).toBe(0);
    expect(served.server.session!.readsAnsweredNatively).toBe(before + 3);
  });

  test('an unmasked entry fires its eventfd; the guest rings doorbells through BAR0', async () => {
    const { g, evs } = await enabled();
    await g.setBar32(Region.BAR4, 2 * 16 + 12, 0);
    expect(served.device.irq.mode).toBe('msix');
    expect(served.device.irq.raise(2)).toBe('sent');
    expect(evs[2].take()).toBe(1);
    await g.setBar32(Region.BAR0, DOORBELL.RING, 2);
    expect(evs[2].take()).toBe(1);
    expect(await g.bar32(Region.BAR0, DOORBELL.COUNTER)).toBe(1); // irq.raise() is not a doorbell
    // Reserved vector-control bits read 0; address and data read back.
    await g.setBar32(Region.BAR4, 2 * 16 + 12, 0xfffffffe);
    expect(await g.bar32(Region.BAR4, 2 * 16 + 12)).toBe(0);
    expect(await g.bar32(Region.BAR4, 2 * 16 + 8)).toBe(0x4022);
  });

  test('a masked entry holds the vector in the PBA until it is unmasked', async () => {
    const { g, evs } = await enabled();
    expect(served.device.irq.raise(5)).toBe('pending');
    expect(evs[5].take()).toBe(0);
    expect(await pba(g)).toBe(1 << 5);
    // Guest writes to the PBA are dropped.
    await g.setBar32(Region.BAR4, MSIX_PBA_OFFSET, 0);
    expect(await pba(g)).toBe(1 << 5);
    await g.setBar32(Region.BAR4, 5 * 16 + 12, 0);
    expect(evs[5].take()).toBe(1);
    expect(await pba(g)).toBe(0);
  });

  test('the function mask holds every vector; clearing it delivers the unmasked ones', async () => {
    const { g, evs } = await enabled();
    await g.setBar32(Region.BAR4, 0 * 16 + 12, 0);
    await g.setCfg16(CONTROL, ENABLE | FUNCTION_MASK);
    expect(served.device.irq.raise(0)).toBe('pending');
    expect(served.device.irq.raise(1)).toBe('pending');
    expect(evs[0].take()).toBe(0);
    expect(await pba(g)).toBe(0b11);
    await g.setCfg16(CONTROL, ENABLE);
    expect(evs[0].take()).toBe(1);
    expect(evs[1].take()).toBe(0); // its entry is still masked
    expect(await pba(g)).toBe(0b10);
  });

  test('SET_IRQS MASK/UNMASK from the client hold and release vectors too', async () => {
    const { client, g, evs } = await enabled();
    await g.setBar32(Region.BAR4, 3 * 16 + 12, 0);
    await client.setIrqs({ index: IrqIndex.MSIX, start: 3, count: 1, action: 'mask' });
    expect(served.device.irq.raise(3)).toBe('pending');
    expect(evs[3].take()).toBe(0);
    expect(await pba(g)).toBe(1 << 3);
    await client.setIrqs({ index: IrqIndex.MSIX, start: 3, count: 1, action: 'unmask' });
    expect(evs[3].take()).toBe(1);
    expect(await pba(g)).toBe(0);
    // The client's loopback TRIGGER goes through the same masking.
    await client.setIrqs({ index: IrqIndex.MSIX, start: 4, count: 1, action: 'trigger' });
    expect(evs[4].take()).toBe(0);
    expect(await pba(g)).toBe(1 << 4);
  });

  test('without Bus Master Enable a message cannot be written: dropped', async () => {
    const { g, evs } = await enabled();
    await g.setBar32(Region.BAR4, 12, 0);
    await g.setCfg16(0x04, 0x0002);
    expect(served.device.irq.raise(0)).toBe('dropped');
    expect(evs[0].take()).toBe(0);
  });

  test('a client that never writes the table (QEMU emulates it) still gets interrupts', async () => {
    served = await serve(new DoorbellDevice());
    const client = await served.client();
    const g = guest(client);
    await g.setCfg16(0x04, COMMAND_MEMORY_BUS_MASTER);
    await g.setCfg16(CONTROL, ENABLE);
    const [ev] = eventfds.create(1);
    await client.setIrqs({ index: IrqIndex.MSIX, start: 6, eventfds: [ev] });
    expect(served.device.irq.raise(6)).toBe('sent');
    expect(ev.take()).toBe(1);
  });

  test('a vector that fires while the client has taken its eventfd away is delivered once it gives one back', async () => {
    const { client, g, evs } = await enabled();
    await g.setBar32(Region.BAR4, 3 * 16 + 12, 0);
    // What QEMU does when the guest starts using one more vector: every eventfd away, then all back.
    await client.setIrqs({ index: IrqIndex.MSIX });
    expect(served.device.irq.raise(3)).toBe('pending');
    expect(await pba(g)).toBe(1 << 3);
    const again = eventfds.create(8);
    await client.setIrqs({ index: IrqIndex.MSIX, eventfds: again });
    expect(again[3].take()).toBe(1);
    expect(evs[3].take()).toBe(0);
    expect(await pba(g)).toBe(0);
  });

  test('DEVICE_RESET disables MSI-X, masks every entry and clears the PBA', async () => {
    const { client, g } = await enabled();
    expect(served.device.irq.raise(4)).toBe('pending');
    await g.setBar32(Region.BAR4, 16 + 12, 0);
    await client.reset();
    expect(await g.cfg16(CONTROL)).toBe(7);
    expect(await g.bar32(Region.BAR4, 16 + 12)).toBe(1);
    expect(await g.bar32(Region.BAR4, 16 + 8)).toBe(0);
    expect(await pba(g)).toBe(0);
    expect(served.device.irq.mode).toBe('intx');
  });
});

describe('MSI-X in a handler-backed BAR', () => {
  function device(log: string[]): PciDevice {
    const regs = Buffer.alloc(0x1000);
    return new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      bars: {
        2: {
          kind: 'memory', size: 0x1000,
          read: (offset, size) => { log.push(`read ${offset}+${size}`); return regs.subarray(offset, offset + size); },
          write: (offset, data) => { log.push(`write ${offset}+${data.length}`); regs.set(data, offset); },
        },
      },
      capabilities: [{ kind: 'msix', vectors: 4, table: { bar: 2, offset: 0x100 }, pba: { bar: 2, offset: 0x200 } }],
    });
  }

  test('accesses inside the table and PBA go to the emulation, the rest to the handlers', async () => {
    const log: string[] = [];
    const served2 = await serve(device(log));
    try {
      const client = await served2.client();
      // One write spanning registers, the first table entry and more registers is split.
      const data = Buffer.alloc(0x20, 0xab);
      await client.regionWrite(Region.BAR2, 0xf8n, data.subarray(0, 0x10));
      expect(log).toEqual(['write 248+8']);
      const back = await client.regionRead(Region.BAR2, 0xf8n, 0x14);
      expect(back.subarray(0, 8).equals(Buffer.alloc(8, 0xab))).toBe(true);
      expect(back.subarray(8, 16).equals(Buffer.alloc(8, 0xab))).toBe(true); // entry 0 address
      expect(back.readUInt32LE(16)).toBe(0); // entry 0 data was not written
      expect(log).toEqual(['write 248+8', 'read 248+8']);
      pciFunction(served2.device).config.write(0x42, Buffer.from([0x00, 0x80]));
      pciFunction(served2.device).config.write(0x04, Buffer.from([0x06, 0x00]));
      expect(served2.device.irq.raise(2)).toBe('pending');
      expect((await client.regionRead(Region.BAR2, 0x200n, 8)).readUInt32LE(0)).toBe(1 << 2);
    } finally {
      await served2.close();
    }
  });
});
