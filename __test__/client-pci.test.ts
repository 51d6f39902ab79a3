/** The client as a VMM uses it: EventfdIrq objects and the `client.pci` helpers, over real sockets against our PCI model. */
import { afterEach, describe, expect, test } from 'vitest';
import { CapabilityId, EventfdIrq, IrqIndex, PciDevice, Region, UsageError } from '../ts/index.js';
import { Cfg, Command as PciCommand, Msi, MsiX } from '../ts/pci/spec.js';
import { DoorbellDevice } from '../examples/msix-device.js';
import { openFdCount, serve, type Served } from './helpers.js';
import { pciFunction } from '../ts/pci/device.js';

let served: Served<PciDevice> | undefined;
const irqs: EventfdIrq[] = [];
afterEach(async () => {
  irqs.splice(0).forEach((irq) => irq.close());
  await served?.close();
  served = undefined;
});

async function doorbell() {
  served = await serve<PciDevice>(new DoorbellDevice());
  return { client: await served.client(), device: served.device };
}

describe('EventfdIrq', () => {
  test('emits interrupt with the count once the server signals it, on the event loop', async () => {
    served = await serve<PciDevice>();
    const client = await served.client();
    const irq = new EventfdIrq();
    irqs.push(irq);
    await client.setIrqs({ index: IrqIndex.ERR, eventfds: [irq] });
    const counts: number[] = [];
    const heard = new Promise<void>((resolve) => irq.on('interrupt', (count) => (counts.push(count), resolve())));
    pciFunction(served.device).interrupts.trigger(IrqIndex.ERR);
    pciFunction(served.device).interrupts.trigger(IrqIndex.ERR);
    await heard;
    expect(counts).toEqual([2]); // both signals before the loop turned: one event, count 2
    const next = irq.next();
    await client.setIrqs({ index: IrqIndex.ERR, count: 1, action: 'trigger' });
    expect(await next).toBe(1);
    expect(counts).toEqual([2, 1]);
  });

  test('without listeners signals add up for take(); a listener added later hears what is pending', async () => {
    served = await serve<PciDevice>();
    const client = await served.client();
    const irq = new EventfdIrq();
    irqs.push(irq);
    await client.setIrqs({ index: IrqIndex.ERR, eventfds: [irq] });
    pciFunction(served.device).interrupts.trigger(IrqIndex.ERR);
    await client.getDeviceInfo(); // the loop turns: nobody listens, so nobody reads the counter
    expect(irq.take()).toBe(1);
    expect(irq.take()).toBe(0);
    pciFunction(served.device).interrupts.trigger(IrqIndex.ERR);
    expect(await irq.next()).toBe(1);
    expect(irq.listenerCount('interrupt')).toBe(0);
  });

  test('close() releases the fd and stops the events; later use is a UsageError', async () => {
    const before = openFdCount();
    const irq = new EventfdIrq();
    irq.on('interrupt', () => expect.unreachable('closed'));
    expect(openFdCount()).toBe(before + 1);
    irq.close();
    irq.close();
    expect(openFdCount()).toBe(before);
    expect(irq.closed).toBe(true);
    expect(() => irq.fd).toThrow(UsageError);
    expect(() => irq.take()).toThrow(UsageError);
  });
});

describe('client.pci', () => {
  test('finds capabilities by ID and reports a missing one', async () => {
    const { client } = await doorbell();
    const msix = await client.pci.findCapability(CapabilityId.MSIX);
    expect(msix).toBeDefined();
    expect((await client.pci.read(msix!, 1))).toBe(CapabilityId.MSIX);
    expect(await client.pci.findCapability(0x12)).toBeUndefined();
    served!.close();
    served = await serve<PciDevice>(); // the GPIO card: no MSI-X
    const gpio = await served.client();
    await expect(gpio.pci.enableMsix()).rejects.toThrow(/no MSI-X capability/);
  });

  test('MSI-X enabled from the client: device.irq.raise arrives on the wired EventfdIrq', async () => {
    const { client, device } = await doorbell();
    await client.pci.setBusMaster(true);
    await client.pci.enableMsix();
    const wired = await client.wireIrqs(IrqIndex.MSIX);
    irqs.push(...wired);
    expect(wired).toHaveLength(8);
    expect(device.irq.mode).toBe('msix');
    const at = (await client.pci.findCapability(CapabilityId.MSIX))!;
    expect((await client.pci.read(at + MsiX.CONTROL, 2)) & (MsiX.ENABLE | MsiX.FUNCTION_MASK)).toBe(MsiX.ENABLE);
    const third = wired[3].next();
    expect(device.irq.raise(3)).toBe('sent');
    expect(await third).toBe(1);
    expect(wired.map((irq) => irq.take())).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    await client.pci.disableMsix();
    expect(device.irq.mode).not.toBe('msix');
  });

  test('without bus mastering the MSI-X message is dropped', async () => {
    const { client, device } = await doorbell();
    await client.pci.enableMsix();
    await client.pci.setBusMaster(false);
    expect((await client.pci.read(Cfg.COMMAND, 2)) & PciCommand.BUS_MASTER).toBe(0);
    const wired = await client.wireIrqs(IrqIndex.MSIX);
    irqs.push(...wired);
    expect(device.irq.raise(0)).toBe('dropped');
    expect(wired[0].take()).toBe(0);
  });

  test('MSI with a chosen vector count; too many is a UsageError', async () => {
    const { client, device } = await doorbell();
    await client.pci.setBusMaster(true);
    await expect(client.pci.enableMsi(8)).rejects.toThrow(UsageError);
    await expect(client.pci.enableMsi(3)).rejects.toThrow(UsageError);
    expect(await client.pci.enableMsi(2)).toBe(2);
    const at = (await client.pci.findCapability(CapabilityId.MSI))!;
    expect(((await client.pci.read(at + Msi.CONTROL, 2)) >> Msi.ENABLED_SHIFT) & Msi.LOG2_MASK).toBe(1);
    const wired = await client.wireIrqs(IrqIndex.MSI);
    irqs.push(...wired);
    expect(device.irq.mode).toBe('msi');
    const second = wired[1].next();
    expect(device.irq.raise(1)).toBe('sent');
    expect(await second).toBe(1);
    expect(await client.pci.enableMsi()).toBe(4);
    await client.pci.disableMsi();
    expect(device.irq.mode).not.toBe('msi');
  });

  test('sizes 64-bit, 32-bit, I/O and absent BARs and restores every register', async () => {
    served = await serve<PciDevice>(
      new PciDevice({
        vendorId: 0x1234, deviceId: 0x5678, classCode: 0,
        bars: {
          0: { kind: 'memory', size: 1 << 20, width: 64, prefetchable: true },
          2: { kind: 'io', size: 32, read: () => 0, write: () => undefined },
          3: { kind: 'memory', size: 4096 },
        },
      }),
    );
    const client = await served.client();
    await client.pci.write(Cfg.BAR0, 4, 0xfe000000);
    await client.pci.write(Cfg.COMMAND, 2, PciCommand.MEMORY | PciCommand.IO);
    const registers = await client.regionRead(Region.CONFIG, 0n, 0x40);
    expect(await client.pci.sizeBar(0)).toEqual({ index: 0, size: 1n << 20n, kind: 'memory', width: 64, prefetchable: true });
    expect(await client.pci.sizeBar(2)).toEqual({ index: 2, size: 32n, kind: 'io', width: 32, prefetchable: false });
    expect(await client.pci.sizeBar(3)).toEqual({ index: 3, size: 4096n, kind: 'memory', width: 32, prefetchable: false });
    expect((await client.pci.sizeBar(5)).size).toBe(0n);
    expect(await client.regionRead(Region.CONFIG, 0n, 0x40)).toEqual(registers);
    await expect(client.pci.sizeBar(6 as 0)).rejects.toThrow(UsageError);
  });
});
