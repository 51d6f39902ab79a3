import { afterEach, describe, expect, test } from 'vitest';
import { Command, Errno, EventfdIrq, IrqIndex, Region } from '../ts/index.js';
import { native } from '../ts/native.js';
import { openFdCount, serve, until, type Served } from './helpers.js';
import type { PciIdio16 } from '../examples/gpio.js';
import { pciFunction } from '../ts/pci/device.js';

let served: Served<PciIdio16>;
const irqs: EventfdIrq[] = [];
afterEach(async () => {
  await served?.close();
  irqs.splice(0).forEach((irq) => irq.close());
});

function eventfd(): EventfdIrq {
  const irq = new EventfdIrq();
  irqs.push(irq);
  return irq;
}

describe('IRQ info and SET_IRQS', () => {
  test('reports INTx (maskable, automasked), no MSI/MSI-X, ERR and REQ', async () => {
    served = await serve();
    const client = await served.client();
    expect(await client.getIrqInfo(IrqIndex.INTX)).toMatchObject({ index: 0, count: 1, flags: 0b111 });
    expect((await client.getIrqInfo(IrqIndex.MSI)).count).toBe(0);
    expect((await client.getIrqInfo(IrqIndex.MSIX)).count).toBe(0);
    expect(await client.getIrqInfo(IrqIndex.ERR)).toMatchObject({ count: 1, flags: 1 });
    await expect(client.getIrqInfo(5)).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.DEVICE_GET_IRQ_INFO });
  });

  test('an assigned eventfd is signalled; loopback TRIGGER fires it too', async () => {
    served = await serve();
    const client = await served.client();
    const ev = eventfd();
    await client.setIrqs({ index: IrqIndex.ERR, eventfds: [ev] });
    await client.setIrqs({ index: IrqIndex.ERR, count: 1, action: 'trigger' });
    expect(ev.take()).toBe(1);
    pciFunction(served.device).interrupts.trigger(IrqIndex.ERR);
    expect(ev.take()).toBe(1);
  });

  test('INTx is level: automasked on delivery, re-fired on unmask while still asserted', async () => {
    served = await serve();
    const client = await served.client();
    const ev = eventfd();
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [ev] });
    served.device.irq.raise();
    expect(ev.take()).toBe(1);
    expect((await client.regionRead(Region.CONFIG, 6n, 1))[0] & 0x08).toBe(0x08);
    await client.setIrqs({ index: IrqIndex.INTX, count: 1, action: 'unmask' });
    expect(ev.take()).toBe(1);
    served.device.irq.lower();
    await client.setIrqs({ index: IrqIndex.INTX, count: 1, action: 'unmask' });
    expect(ev.take()).toBe(0);
    expect((await client.regionRead(Region.CONFIG, 6n, 1))[0] & 0x08).toBe(0);
  });

  test('INTx as QEMU drives it with KVM: the resample eventfd unmasks, and a line still high fires again', async () => {
    served = await serve();
    const client = await served.client();
    const before = openFdCount();
    const trigger = eventfd(); // what KVM's irqfd listens on
    const resample = eventfd(); // what KVM signals when the guest EOIs the line
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [trigger] });
    // QEMU's vfio_intx_enable_kvm: mask, hand over the resample eventfd, unmask.
    await client.setIrqs({ index: IrqIndex.INTX, count: 1, action: 'mask' });
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [resample], action: 'unmask' });
    await client.setIrqs({ index: IrqIndex.INTX, count: 1, action: 'unmask' });
    expect(pciFunction(served.device).interrupts.intxUnmaskConnected).toBe(true);
    expect(openFdCount()).toBe(before + 4); // two eventfds here, the server's copies of both

    served.device.irq.raise();
    expect(trigger.take()).toBe(1);
    expect(pciFunction(served.device).interrupts.isMasked(IrqIndex.INTX, 0)).toBe(true); // automasked
    // EOI with the line still asserted: unmasked, and fired again (and masked again).
    const again = trigger.next();
    native.eventfdSignal(resample.fd);
    expect(await again).toBe(1);
    expect(pciFunction(served.device).interrupts.isMasked(IrqIndex.INTX, 0)).toBe(true);
    // The device drops the line; the next EOI only unmasks, so the next assertion is delivered at once.
    served.device.irq.lower();
    native.eventfdSignal(resample.fd);
    await until(() => !pciFunction(served.device).interrupts.isMasked(IrqIndex.INTX, 0));
    expect(trigger.take()).toBe(0);
    served.device.irq.raise();
    expect(trigger.take()).toBe(1);

    // No fd de-assigns the resample eventfd, and the server closes its copy.
    await client.setIrqs({ index: IrqIndex.INTX, count: 1, eventfds: [], action: 'unmask' });
    expect(pciFunction(served.device).interrupts.intxUnmaskConnected).toBe(false);
    expect(openFdCount()).toBe(before + 3);
  });

  test('eventfds with MASK, or with UNMASK of a vector other than INTx, are EINVAL and closed', async () => {
    served = await serve();
    const client = await served.client();
    const before = openFdCount();
    const ev = eventfd();
    await expect(client.setIrqs({ index: IrqIndex.INTX, eventfds: [ev], action: 'mask' })).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.DEVICE_SET_IRQS });
    await expect(client.setIrqs({ index: IrqIndex.ERR, eventfds: [ev], action: 'unmask' })).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(openFdCount()).toBe(before + 1);
  });

  test('the resample eventfd is closed when the client leaves or INTx is disabled', async () => {
    served = await serve();
    const before = openFdCount();
    const client = await served.client();
    const resample = eventfd();
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [resample], action: 'unmask' });
    await client.setIrqs({ index: IrqIndex.INTX, count: 0, start: 0 });
    expect(pciFunction(served.device).interrupts.intxUnmaskConnected).toBe(false);
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [resample], action: 'unmask' });
    client.close();
    await until(() => served.server.session === undefined);
    expect(pciFunction(served.device).interrupts.intxUnmaskConnected).toBe(false);
    expect(openFdCount()).toBe(before + 1); // only our own eventfd
  });

  test('a masked interrupt is held pending and delivered on unmask', async () => {
    served = await serve();
    const client = await served.client();
    const ev = eventfd();
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [ev] });
    await client.setIrqs({ index: IrqIndex.INTX, count: 1, action: 'mask' });
    served.device.irq.raise();
    expect(ev.take()).toBe(0);
    expect(pciFunction(served.device).interrupts.isPending(IrqIndex.INTX, 0)).toBe(true);
    await client.setIrqs({ index: IrqIndex.INTX, bools: [true], action: 'unmask' });
    expect(ev.take()).toBe(1);
  });

  test('INTx disable in the command register gates delivery', async () => {
    served = await serve();
    const client = await served.client();
    const ev = eventfd();
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [ev] });
    await client.regionWrite(Region.CONFIG, 4n, Buffer.from([0x00, 0x04]));
    served.device.irq.raise();
    expect(ev.take()).toBe(0);
    await client.regionWrite(Region.CONFIG, 4n, Buffer.from([0x00, 0x00]));
    expect(ev.take()).toBe(1);
  });

  test('de-assign and disable-all close the server’s copies', async () => {
    served = await serve();
    const client = await served.client();
    const before = openFdCount();
    await client.setIrqs({ index: IrqIndex.ERR, eventfds: [eventfd()] });
    await client.setIrqs({ index: IrqIndex.REQ, eventfds: [eventfd()] });
    expect(openFdCount()).toBe(before + 4);
    await client.setIrqs({ index: IrqIndex.ERR, count: 1, eventfds: [] });
    expect(pciFunction(served.device).interrupts.connected(IrqIndex.ERR, 0)).toBe(false);
    expect(openFdCount()).toBe(before + 3);
    await client.setIrqs({ index: IrqIndex.REQ, count: 0, start: 0 });
    expect(openFdCount()).toBe(before + 2);
  });

  test('invalid requests are EINVAL and their fds are closed', async () => {
    served = await serve();
    const client = await served.client();
    const before = openFdCount();
    const [r, w] = native.socketPair();
    await expect(client.setIrqs({ index: IrqIndex.ERR, eventfds: [r] })).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.DEVICE_SET_IRQS });
    await expect(client.setIrqs({ index: IrqIndex.INTX, start: 1, count: 1, action: 'mask' })).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.setIrqs({ index: IrqIndex.MSIX, start: 0, count: 1, action: 'trigger' })).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.setIrqs({ index: 7, count: 1 })).rejects.toMatchObject({ errno: Errno.EINVAL });
    native.closeFd(r);
    native.closeFd(w);
    expect(openFdCount()).toBe(before);
  });

  test('a client that leaves has its interrupt fds closed', async () => {
    served = await serve();
    const before = openFdCount();
    const client = await served.client();
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [eventfd()] });
    client.close();
    await until(() => served.server.session === undefined);
    expect(pciFunction(served.device).interrupts.connected(IrqIndex.INTX, 0)).toBe(false);
    expect(openFdCount()).toBe(before + 1); // only our own eventfd
  });
});
