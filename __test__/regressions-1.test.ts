/**
 * Bugs a review found, kept as regression tests: guest memory over the 4 GiB
 * ArrayBuffer limit (once a double free that killed the server), and an
 * MSI-X vector fired before the client wired its eventfd (once lost).
 */
import { afterEach, describe, expect, test } from 'vitest';
import { pciFunction } from '../ts/pci/device.js';
import { Errno, IrqIndex, PciDevice, Region } from '../ts/index.js';
import { DoorbellDevice, MSIX_PBA_OFFSET } from '../examples/msix-device.js';
import { openFdCount, runChild, serve, type Served } from './helpers.js';
import { COMMAND_MEMORY_BUS_MASTER, Eventfds, guest } from './pci-helpers.js';

let served: Served<any> | undefined;
const eventfds = new Eventfds();
afterEach(async () => {
  await served?.close();
  served = undefined;
  eventfds.closeAll();
});

const MSIX = 0x60;
const CONTROL = MSIX + 2;
const ENABLE = 0x8000;
const FUNCTION_MASK = 0x4000;

describe('DMA', () => {
  test('a sealed window over 4 GiB is read through the native copies, not a too-large view', () => {
    // QEMU -m 8G maps the above-4G part of guest RAM (5 GiB, sealed memfd) as one DMA window.
    const r = runChild(`
      const dev = new lib.PciDevice({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0 });
      const server = lib.createServer(dev);
      await server.listen(SOCK);
      const client = await lib.connect(SOCK);
      const ram = new lib.GuestMemory(5 * 2 ** 30); // sparse: nothing allocated until touched
      await client.dmaMap({ iova: 0x1_0000_0000n, memory: ram });
      ram.write(16, Buffer.from([0x78, 0x56, 0x34, 0x12]));
      console.log('RESULT ' + dev.dma.readU32(0x1_0000_0010n).toString(16));
      client.close(); ram.close(); await server.close(); dev.close();
    `);
    expect(r.out).toContain('RESULT 12345678');
    expect(r.status).toBe(0);
  });

  test('GuestMemory.view() of memory over 4 GiB throws a clear error', () => {
    const r = runChild(`
      const ram = new lib.GuestMemory(5 * 2 ** 30);
      try { ram.view(); console.log('RESULT view'); } catch (e) { console.log('RESULT threw ' + e.message); }
      ram.close();
    `);
    expect(r.out).toMatch(/RESULT threw .*ArrayBuffer limit/);
    expect(r.status).toBe(0);
  });
});

describe('MSI-X', () => {
  test('a vector pending when unmasked before its eventfd is wired is delivered once wired', async () => {
    served = await serve(new DoorbellDevice());
    const dev = served.device as DoorbellDevice;
    const client = await served.client();
    const g = guest(client);
    await g.setCfg16(0x04, COMMAND_MEMORY_BUS_MASTER);
    // Linux: enable with the function masked; QEMU keeps the table itself (no table writes arrive).
    await g.setCfg16(CONTROL, ENABLE | FUNCTION_MASK);
    expect(dev.irq.raise(0)).toBe('pending');
    expect(await g.bar32(Region.BAR4, MSIX_PBA_OFFSET)).toBe(1);
    // QEMU forwards the config write (function mask cleared) before it wires the vector's eventfd.
    await g.setCfg16(CONTROL, ENABLE);
    const [ev] = eventfds.create(1);
    await client.setIrqs({ index: IrqIndex.MSIX, start: 0, eventfds: [ev] });
    // The interrupt fired while masked is delivered once it can be (§10.3), and its PBA bit clears.
    expect(ev.take()).toBe(1);
    expect(await g.bar32(Region.BAR4, MSIX_PBA_OFFSET)).toBe(0);
  });
});

describe('SET_IRQS', () => {
  test('fds of a SET_IRQS the device refuses by throwing are closed, not leaked', async () => {
    const device = new PciDevice({ vendorId: 1, deviceId: 2, classCode: 0, intx: 'A' });
    pciFunction(device).setIrqs = () => {
      throw new Error('no interrupts today');
    };
    served = await serve(device, { deviceErrors: 'expected' });
    const client = await served.client();
    const before = openFdCount();
    const [ev] = eventfds.create(1);
    await expect(client.setIrqs({ index: IrqIndex.INTX, eventfds: [ev] })).rejects.toMatchObject({ errno: Errno.EIO });
    expect(openFdCount()).toBe(before + 1); // only our own eventfd
  });
});
