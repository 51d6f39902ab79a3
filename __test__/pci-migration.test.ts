/** PciDevice's default migration: config space, BARs and interrupt state move between two servers with no device code. */
import { afterEach, describe, expect, test } from 'vitest';
import {
  CapabilityId,
  Command,
  Errno,
  InvalidDeviceError,
  IrqIndex,
  migrate,
  MigrationState as S,
  PciDevice,
  ProtocolError,
  Region,
  type PciDeviceDescription,
  type VfioUserClient,
  type VfioUserDevice,
} from '../ts/index.js';
import { pciFunction } from '../ts/pci/device.js';
import { IDIO16, PciIdio16 } from '../examples/gpio.js';
import { DOORBELL, DoorbellDevice, MSIX_PBA_OFFSET } from '../examples/msix-device.js';
import { serve, type Served } from './helpers.js';
import { base, COMMAND_MEMORY_BUS_MASTER, Eventfds, guest, type Guest } from './pci-helpers.js';
import { Cfg, Command as CommandBits, Status } from '../ts/pci/spec.js';

const servers: Served<VfioUserDevice | PciDevice>[] = [];
const devices: PciDevice[] = [];
const eventfds = new Eventfds();
afterEach(async () => {
  for (const s of servers.splice(0)) await s.close();
  for (const d of devices.splice(0)) d.close();
  eventfds.closeAll();
});

async function pair<A extends PciDevice, B extends PciDevice>(source: A, destination: B, options: { destinationErrors?: 'expected' } = {}) {
  devices.push(source, destination);
  const a = await serve(source);
  const b = await serve(destination, { deviceErrors: options.destinationErrors });
  servers.push(a, b);
  const from = await a.client();
  const to = await b.client();
  return { source, destination, from, to, g: guest(from), h: guest(to) };
}

const ENABLE = 0x8000;
const FUNCTION_MASK = 0x4000;

async function msixControl(g: Guest): Promise<number> {
  return (await g.capabilities()).get(CapabilityId.MSIX)! + 2;
}

/** Programs entry `v` through BAR4 as Linux does: address, data, vector control. */
async function program(g: Guest, v: number, masked: boolean): Promise<void> {
  await g.setBar32(Region.BAR4, v * 16, 0xfee00000 + v * 0x1000);
  await g.setBar32(Region.BAR4, v * 16 + 4, 0);
  await g.setBar32(Region.BAR4, v * 16 + 8, 0x4020 + v);
  await g.setBar32(Region.BAR4, v * 16 + 12, masked ? 1 : 0);
}

/** The doorbell card as a Linux guest leaves it: BARs placed, decoding and bus mastering on, MSI-X enabled. */
async function bringUp(client: VfioUserClient, masked: number[] = []): Promise<Guest> {
  const g = guest(client);
  await g.setCfg32(Cfg.BAR0, 0xfe000000);
  await g.setCfg32(Cfg.BAR0 + 4, 0x1);
  await g.setCfg32(Cfg.BAR0 + 16, 0xfd000000);
  await g.setCfg16(Cfg.COMMAND, COMMAND_MEMORY_BUS_MASTER);
  const control = await msixControl(g);
  await g.setCfg16(control, ENABLE | FUNCTION_MASK);
  for (let v = 0; v < 8; v++) await program(g, v, masked.includes(v));
  await g.setCfg16(control, ENABLE);
  return g;
}

async function configOf(client: VfioUserClient, size: number): Promise<Buffer> {
  return client.regionRead(Region.CONFIG, 0n, size);
}

describe('the doorbell card (examples/msix-device.ts)', () => {
  test('config space, BAR memory, the MSI-X table, PBA and handler registers arrive; a pending vector fires on unmask', async () => {
    const { source, destination, from, to, g, h } = await pair(new DoorbellDevice(), new DoorbellDevice());
    await bringUp(from, [3]);
    const evs = eventfds.create(8);
    await from.setIrqs({ index: IrqIndex.MSIX, eventfds: evs });
    await g.setBar32(Region.BAR0, DOORBELL.SCRATCH, 0xcafef00d);
    await g.setBar32(Region.BAR0, DOORBELL.RING, 3); // masked: held in the PBA
    await g.setBar32(Region.BAR0, DOORBELL.RING, 5);
    expect(evs[5].take()).toBe(1);
    expect(evs[3].take()).toBe(0);
    await from.regionWrite(Region.BAR4, 0x400n, Buffer.from('plain BAR4 memory'));
    // The vendor capability's guest-writable word.
    const vendor = (await g.capabilities()).get(CapabilityId.VENDOR)!;
    await g.setCfg32(vendor + 3 + 4, 0x12345678);
    expect(await g.bar32(Region.BAR4, MSIX_PBA_OFFSET)).toBe(1 << 3);

    const configBefore = await configOf(from, 4096);
    const bar4Before = await from.regionRead(Region.BAR4, 0n, 4096);
    const result = await migrate(from, to);
    expect(result.precopyBytes).toBe(0);
    expect(await from.migration.state()).toBe(S.STOP);
    expect(await to.migration.state()).toBe(S.RUNNING);

    // Config space (BAR addresses, command bits, MSI-X enable, vendor word) byte for byte.
    expect((await configOf(to, 4096)).equals(configBefore)).toBe(true);
    expect(pciFunction(destination).config.bytes.equals(pciFunction(source).config.bytes)).toBe(true);
    expect(await h.cfg32(Cfg.BAR0)).toBe(0xfe000004 >>> 0);
    expect(destination.busMaster).toBe(true);
    expect(destination.irq.mode).toBe('msix');
    // BAR4: table, PBA and plain memory; BAR0: the handlers' registers (saveState).
    expect((await to.regionRead(Region.BAR4, 0n, 4096)).equals(bar4Before)).toBe(true);
    expect(await h.bar32(Region.BAR4, MSIX_PBA_OFFSET)).toBe(1 << 3);
    expect(await h.bar32(Region.BAR0, DOORBELL.COUNTER)).toBe(2);
    expect(await h.bar32(Region.BAR0, DOORBELL.STATUS)).toBe((1 << 3) | (1 << 5));
    expect(await h.bar32(Region.BAR0, DOORBELL.SCRATCH)).toBe(0xcafef00d);

    // The destination's VMM wires its own eventfds; unmasking entry 3 delivers what the source held.
    const fresh = eventfds.create(8);
    await to.setIrqs({ index: IrqIndex.MSIX, eventfds: fresh });
    await h.setBar32(Region.BAR4, 3 * 16 + 12, 0);
    expect(fresh[3].take()).toBe(1);
    expect(await h.bar32(Region.BAR4, MSIX_PBA_OFFSET)).toBe(0);
    // And the device goes on: a doorbell rung at the destination interrupts there.
    await h.setBar32(Region.BAR0, DOORBELL.RING, 6);
    expect(fresh[6].take()).toBe(1);
    expect(await h.bar32(Region.BAR0, DOORBELL.COUNTER)).toBe(3);
    expect(evs[3].take() + evs[6].take()).toBe(0);
  });

  test('a destination with a different description refuses the data with EINVAL and keeps its state', async () => {
    const { from, to, destination } = await pair(new DoorbellDevice(), new PciIdio16());
    await bringUp(from);
    await to.regionWrite(Region.BAR2, BigInt(IDIO16.OUT0_7), Buffer.from([0xa5]));
    const before = Buffer.from(pciFunction(destination).config.bytes);
    await expect(migrate(from, to)).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.DEVICE_FEATURE });
    expect(await to.migration.state()).toBe(S.RESUMING); // nothing loaded: the stream may be written again
    expect(await from.migration.state()).toBe(S.RUNNING); // migrate() set the source going again
    expect(pciFunction(destination).config.bytes.equals(before)).toBe(true);
    expect(destination.outputs).toBe(0xa5);
  });
});

describe('stop holds interrupts', () => {
  test('MSI-X: a vector fired while stopped is pending, and delivered by start', async () => {
    const { source, from, g } = await pair(new DoorbellDevice(), new DoorbellDevice());
    await bringUp(from);
    const evs = eventfds.create(8);
    await from.setIrqs({ index: IrqIndex.MSIX, eventfds: evs });
    await from.migration.setState(S.STOP);
    expect(source.stopped).toBe(true);
    expect(source.irq.raise(1)).toBe('pending');
    // Unmasking through config space while stopped still holds it.
    await g.setCfg16(await msixControl(g), ENABLE);
    expect(evs[1].take()).toBe(0);
    expect(await g.bar32(Region.BAR4, MSIX_PBA_OFFSET)).toBe(1 << 1);
    await from.migration.setState(S.RUNNING);
    expect(source.stopped).toBe(false);
    expect(evs[1].take()).toBe(1);
    expect(await g.bar32(Region.BAR4, MSIX_PBA_OFFSET)).toBe(0);
  });

  test('a vector held while stopped is saved and delivered by the destination when it starts', async () => {
    const { source, from, to } = await pair(new DoorbellDevice(), new DoorbellDevice());
    await bringUp(from);
    const evs = eventfds.create(8);
    await from.setIrqs({ index: IrqIndex.MSIX, eventfds: evs });
    const fresh = eventfds.create(8);
    await to.setIrqs({ index: IrqIndex.MSIX, eventfds: fresh });
    await from.migration.setState(S.STOP);
    expect(source.irq.raise(2)).toBe('pending');
    await migrate(from, to);
    expect(evs[2].take()).toBe(0);
    expect(fresh[2].take()).toBe(1);
  });

  test('MSI pending bits kept outside config space (no per-vector masking) travel too', async () => {
    const description: PciDeviceDescription = { ...base, bars: { 0: { kind: 'memory', size: 4096 } }, capabilities: [{ kind: 'msi', vectors: 4 }] };
    const { source, destination, from, to, g } = await pair(new PciDevice(description), new PciDevice(description));
    expect(pciFunction(source).migration).toBeDefined(); // nothing but library state: migrates by default
    const msi = (await g.capabilities()).get(CapabilityId.MSI)!;
    await g.setCfg16(Cfg.COMMAND, COMMAND_MEMORY_BUS_MASTER);
    await g.setCfg16(msi + 2, 1 | (2 << 4)); // enable, 4 vectors
    const fresh = eventfds.create(4);
    await to.setIrqs({ index: IrqIndex.MSI, eventfds: fresh });
    await from.migration.setState(S.STOP);
    expect(source.irq.raise(3)).toBe('pending');
    await migrate(from, to);
    expect(destination.irq.mode).toBe('msi');
    expect(fresh[3].take()).toBe(1);
  });
});

describe('the GPIO card (examples/gpio.ts): handler state through saveState/loadState', () => {
  test('outputs, interrupt enable, latched changes and the asserted INTx line arrive; the line is offered to the new client', async () => {
    const { source, destination, from, to } = await pair(new PciIdio16(), new PciIdio16());
    const gpio = guest(from);
    await gpio.setCfg16(Cfg.COMMAND, CommandBits.IO);
    await from.regionWrite(Region.BAR2, BigInt(IDIO16.OUT0_7), Buffer.from([0x5a]));
    await from.regionWrite(Region.BAR2, BigInt(IDIO16.OUT8_15), Buffer.from([0xc3]));
    await from.regionRead(Region.BAR2, BigInt(IDIO16.IRQ_CTL), 1); // enables the change interrupt
    await from.regionRead(Region.BAR2, BigInt(IDIO16.FILTER_CTL), 1);
    const [intx] = eventfds.create(1);
    await from.setIrqs({ index: IrqIndex.INTX, eventfds: [intx] });
    const [fresh] = eventfds.create(1);
    await to.setIrqs({ index: IrqIndex.INTX, eventfds: [fresh] });
    source.setInputs(0x0101);
    expect(intx.take()).toBe(1);

    await migrate(from, to);
    expect(destination.outputs).toBe(0xc35a);
    expect(destination.interruptEnabled).toBe(true);
    expect(destination.filtersEnabled).toBe(true);
    expect(destination.irq.intxRaised).toBe(true);
    expect(fresh.take()).toBe(1); // the line is high: the destination's client hears it
    const h = guest(to);
    expect(await h.cfg16(Cfg.STATUS) & Status.INTX).toBe(Status.INTX);
    expect((await to.regionRead(Region.BAR2, BigInt(IDIO16.IN0_7), 1))[0]).toBe(0x01);
    expect((await to.regionRead(Region.BAR2, BigInt(IDIO16.IRQ_STATUS), 1))[0]).toBe(0b111);
    // The guest at the destination acknowledges: the line drops there.
    await to.regionWrite(Region.BAR2, BigInt(IDIO16.IN0_7), Buffer.from([0]));
    expect(destination.irq.intxRaised).toBe(false);
  });

  test('INTx asserted while stopped is held until start', async () => {
    const { source, from } = await pair(new PciIdio16(), new PciIdio16());
    await from.regionRead(Region.BAR2, BigInt(IDIO16.IRQ_CTL), 1);
    const [intx] = eventfds.create(1);
    await from.setIrqs({ index: IrqIndex.INTX, eventfds: [intx] });
    await from.migration.setState(S.STOP);
    source.setInputs(1);
    expect(source.irq.intxRaised).toBe(true);
    expect(intx.take()).toBe(0);
    await from.migration.setState(S.RUNNING);
    expect(intx.take()).toBe(1);
  });
});

describe('memory BARs and ioeventfds', () => {
  test('plain and shared BAR bytes and un-taken ioeventfd counts arrive; the source keeps its counts', async () => {
    const description = (): PciDeviceDescription => ({
      ...base,
      bars: {
        0: { kind: 'memory', size: 8192, shared: true, mmap: [{ offset: 4096, size: 4096 }], ioeventfds: [{ offset: 0, size: 4 }] },
        2: { kind: 'memory', size: 4096, width: 64 },
      },
      migration: true,
    });
    const { source, destination, from, to } = await pair(new PciDevice(description()), new PciDevice(description()));
    source.bar(0).bytes!.set(Buffer.from('doorbell page'), 4096 + 12);
    await from.regionWrite(Region.BAR0, 64n, Buffer.from('trapped shared bytes'));
    await from.regionWrite(Region.BAR2, 100n, Buffer.from('plain'));
    await from.regionWrite(Region.BAR0, 0n, Buffer.from([1, 0, 0, 0])); // matches the ioeventfd: a kick
    await migrate(from, to);
    expect(Buffer.from(destination.bar(0).bytes!).equals(Buffer.from(source.bar(0).bytes!))).toBe(true);
    expect(Buffer.from(destination.bar(2).bytes!).equals(Buffer.from(source.bar(2).bytes!))).toBe(true);
    expect((await to.regionRead(Region.BAR0, 4096n + 12n, 13)).toString()).toBe('doorbell page');
    expect((await to.regionRead(Region.BAR2, 100n, 5)).toString()).toBe('plain');
    expect(destination.bar(0).ioeventfds[0].take()).toBe(1);
    expect(source.bar(0).ioeventfds[0].take()).toBe(1);
  });

  test('a different BAR size is refused before anything changes, naming the BAR', async () => {
    const a = new PciDevice({ ...base, bars: { 0: { kind: 'memory', size: 4096 } } });
    const b = new PciDevice({ ...base, bars: { 0: { kind: 'memory', size: 8192 } } });
    devices.push(a, b);
    b.bar(0).bytes!.fill(7);
    const unit = { phase: 'stopcopy', index: 0 } as const;
    const data = Buffer.concat([...(pciFunction(a).migration!.save(unit) as Iterable<Uint8Array>)]);
    let error: unknown;
    try {
      await pciFunction(b).migration!.load(data, unit);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(ProtocolError);
    expect(error).toMatchObject({ errno: Errno.EINVAL });
    expect(String((error as Error).message)).toMatch(/BAR0/);
    expect(b.bar(0).bytes!.every((x) => x === 7)).toBe(true);
    // Truncated, foreign and future-version data are refused the same way.
    for (const bad of [data.subarray(0, data.length - 1), Buffer.from('VFPX' + 'x'.repeat(20)), Buffer.concat([data.subarray(0, 4), Buffer.from([2, 0]), data.subarray(6)])]) {
      await expect(Promise.resolve().then(() => pciFunction(a).migration!.load(bad, unit))).rejects.toMatchObject({ errno: Errno.EINVAL });
    }
  });

  test('a loadState that throws fails the load (EIO) and the device, and the library puts config space and BARs back', async () => {
    const description = (loadState: (data: Uint8Array) => void): PciDeviceDescription => ({
      ...base,
      bars: { 0: { kind: 'memory', size: 4096 } },
      migration: { saveState: () => Uint8Array.of(1), loadState },
    });
    let seen: string | undefined;
    const destinationDevice = new PciDevice(description(() => {
      seen = Buffer.from(destinationDevice.bar(0).bytes!.subarray(0, 6)).toString(); // the library's part is applied first
      throw new Error('refused');
    }));
    const { destination, from, to } = await pair(new PciDevice(description(() => {})), destinationDevice, { destinationErrors: 'expected' });
    await from.regionWrite(Region.BAR0, 0n, Buffer.from('source'));
    await guest(from).setCfg16(Cfg.COMMAND, CommandBits.MEMORY);
    destination.bar(0).bytes!.set(Buffer.from('mine!!'));
    const config = Buffer.from(pciFunction(destination).config.bytes);
    await expect(migrate(from, to)).rejects.toMatchObject({ errno: Errno.EIO });
    expect(seen).toBe('source');
    await expect(to.migration.state()).rejects.toMatchObject({ errno: Errno.EIO }); // failed until reset
    expect(destination.context.failed).toBe(true);
    expect(pciFunction(destination).config.bytes.equals(config)).toBe(true);
    expect(Buffer.from(destination.bar(0).bytes!.subarray(0, 6)).toString()).toBe('mine!!');
  });
});

describe('when a PciDevice migrates', () => {
  test('by default only when the library holds all of its state', () => {
    const plain = new PciDevice({ ...base, bars: { 0: { kind: 'memory', size: 4096 } } });
    const handled = new PciDevice({ ...base, bars: { 2: { kind: 'io', size: 8, read: () => 0 } } });
    const declared = new PciDevice({ ...base, bars: { 2: { kind: 'io', size: 8, read: () => 0 } }, migration: true });
    const refused = new PciDevice({ ...base, migration: false });
    devices.push(plain, handled, declared, refused);
    expect(pciFunction(plain).migration).toBeDefined();
    expect(plain.migrationBlocker).toBeUndefined();
    expect(pciFunction(handled).migration).toBeUndefined();
    expect(handled.migrationBlocker).toMatch(/bars\[2\] has handlers/);
    expect(pciFunction(declared).migration).toBeDefined();
    expect(pciFunction(refused).migration).toBeUndefined();
    expect(pciFunction(new PciIdio16()).migration).toBeDefined();
  });

  test('saveState and loadState come together', () => {
    expect(() => new PciDevice({ ...base, migration: { saveState: () => new Uint8Array() } })).toThrow(InvalidDeviceError);
    expect(() => new PciDevice({ ...base, migration: { loadState: () => {} } })).toThrow(expect.objectContaining({ field: 'migration.saveState' }));
  });
});
