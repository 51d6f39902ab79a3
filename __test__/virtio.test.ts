/** The virtio PCI transport, status machine, feature negotiation and split queues, driven by the package's virtio driver. */
import { describe, expect, test } from 'vitest';
import { pciFunction } from '../ts/pci/device.js';
import {
  Cfg, featureBit, IrqIndex, KIT_FEATURES, migrate, Region, VirtioDevice, VirtioDriver, VirtioFeature as F, VirtioStatus as S,
  type DescriptorChain,
} from '../ts/index.js';
import { Common, NO_VECTOR } from '../ts/virtio/spec.js';
import { VirtioRng } from '../examples/virtio-rng.js';
import { testCleanups } from './cleanups.js';
import { serve, until } from './helpers.js';
import { drive, serveDestination } from './virtio-helpers.js';

const t = testCleanups();
const READY = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK;

describe('transport', () => {
  test('a modern virtio-pci function: IDs, the five capabilities, MSI-X per queue plus config', async () => {
    const { driver, served } = await drive(t, new VirtioRng());
    const ids = await driver.client.regionRead(Region.CONFIG, 0n, 4);
    expect(ids.readUInt16LE(0)).toBe(0x1af4);
    expect(ids.readUInt16LE(2)).toBe(0x1044);
    expect((await driver.client.regionRead(Region.CONFIG, BigInt(Cfg.REVISION), 1))[0]).toBe(1);
    expect(Number(await driver.readCommon(Common.NUM_QUEUES, 2))).toBe(1);
    expect((await driver.client.getIrqInfo(IrqIndex.MSIX)).count).toBe(2);
    expect(served.device.deviceStatus).toBe(0);
  });

  test('offers VERSION_1, EVENT_IDX, INDIRECT_DESC, RING_PACKED and RING_RESET; not ACCESS_PLATFORM', async () => {
    const { driver } = await drive(t, new VirtioRng());
    const offered = await driver.deviceFeatures();
    expect(offered).toBe(KIT_FEATURES);
    expect(offered & featureBit(F.RING_PACKED)).toBe(featureBit(F.RING_PACKED));
    expect(offered & featureBit(F.ACCESS_PLATFORM)).toBe(0n);
  });

  test('the status machine: bits only accumulate, FEATURES_OK sticks only for an offered set with VERSION_1, 0 resets', async () => {
    const { driver, device } = await drive(t, new VirtioRng());
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER);
    await driver.setStatus(S.ACKNOWLEDGE);
    expect(await driver.status()).toBe(S.ACKNOWLEDGE | S.DRIVER); // clearing a bit is refused
    await driver.writeDriverFeatures(featureBit(F.VERSION_1) | featureBit(F.ACCESS_PLATFORM));
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    expect(await driver.status()).toBe(S.ACKNOWLEDGE | S.DRIVER); // ACCESS_PLATFORM was not offered
    await driver.writeDriverFeatures(featureBit(F.RING_EVENT_IDX));
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    expect(await driver.status()).toBe(S.ACKNOWLEDGE | S.DRIVER); // no VERSION_1: a legacy driver
    await driver.writeDriverFeatures(featureBit(F.VERSION_1) | featureBit(F.RING_EVENT_IDX));
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    expect(await driver.status()).toBe(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    // Features are fixed from here on.
    await driver.writeDriverFeatures(featureBit(F.VERSION_1));
    expect(device.features).toBe(featureBit(F.VERSION_1) | featureBit(F.RING_EVENT_IDX));
    await driver.setStatus(0);
    expect(await driver.status()).toBe(0);
    expect(device.features).toBe(0n);
  });

  test('DRIVER_OK without FEATURES_OK sets NEEDS_RESET', async () => {
    const { driver, device } = await drive(t, new VirtioRng());
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK);
    expect(await driver.status()).toBe(S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK | S.NEEDS_RESET);
    expect(device.needsReset?.message).toMatch(/DRIVER_OK without FEATURES_OK/);
    await driver.reset();
    expect(device.needsReset).toBeUndefined();
  });

  test('vectors past the MSI-X table read back as NO_VECTOR', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.writeCommon(Common.CONFIG_MSIX_VECTOR, 2, 2);
    expect(Number(await driver.readCommon(Common.CONFIG_MSIX_VECTOR, 2))).toBe(NO_VECTOR);
    await driver.writeCommon(Common.QUEUE_MSIX_VECTOR, 2, 1);
    expect(Number(await driver.readCommon(Common.QUEUE_MSIX_VECTOR, 2))).toBe(1);
    await driver.writeCommon(Common.QUEUE_SELECT, 2, 5); // no such queue: everything reads 0
    expect(Number(await driver.readCommon(Common.QUEUE_SIZE, 2))).toBe(0);
  });

  test('64-bit queue addresses written as two halves, as Linux does', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.writeCommon(Common.QUEUE_DESC, 4, 0x12345000);
    await driver.writeCommon(Common.QUEUE_DESC + 4, 4, 0x9);
    expect(await driver.readCommon(Common.QUEUE_DESC, 8)).toBe(0x912345000n);
  });

  test('VIRTIO_PCI_CAP_PCI_CFG reaches the common configuration through config space', async () => {
    const { driver } = await drive(t, new VirtioRng());
    const config = await driver.client.regionRead(Region.CONFIG, 0n, 256);
    let at = config[Cfg.CAPABILITIES];
    while (at !== 0 && !(config[at] === 0x09 && config[at + 3] === 5)) at = config[at + 1];
    expect(at).not.toBe(0);
    const set = (offset: number, width: 1 | 2 | 4, value: number) => driver.client.pci.write(at + offset, width, value);
    await set(4, 1, 4); // bar
    await set(8, 4, Common.NUM_QUEUES);
    await set(12, 4, 2); // length
    expect(await driver.client.pci.read(at + 16, 2)).toBe(1);
    // A write through the window: device status.
    await set(8, 4, Common.DEVICE_STATUS);
    await set(12, 4, 1);
    await set(16, 1, S.ACKNOWLEDGE);
    expect(await driver.status()).toBe(S.ACKNOWLEDGE);
  });
});

describe('virtio-rng over split queues', () => {
  test('fills writable buffers with entropy and reports their length', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize();
    expect(await driver.status()).toBe(READY);
    const [q] = driver.queues;
    const a = await q.submit([{ writable: 64 }]);
    const b = await q.submit([{ writable: 16 }, { writable: 48 }]);
    expect(a.written).toBe(64);
    expect(b.written).toBe(64);
    const bytes = Buffer.concat(b.writable);
    expect(bytes.equals(a.writable[0])).toBe(false);
    expect(new Set(bytes).size).toBeGreaterThan(16); // 64 random bytes: at least 17 distinct values, but for 1 in 10^20
  });

  test('indirect chains', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize();
    const done = await driver.queues[0].submit([{ writable: 32 }, { writable: 32 }], { indirect: true });
    expect(done.written).toBe(64);
    expect(done.writable.some((b) => b.some((x) => x !== 0))).toBe(true);
  });

  test('a batch: every available chain taken on one notification, one interrupt for all', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize({ features: featureBit(F.RING_INDIRECT_DESC) }); // no EVENT_IDX
    const [q] = driver.queues;
    let signals = 0;
    driver.vectors[1].on('interrupt', (count) => (signals += count));
    const all = Promise.all(Array.from({ length: 32 }, () => q.submit([{ writable: 8 }], { notify: false })));
    await q.kick();
    const done = await all;
    expect(done.every((d) => d.written === 8)).toBe(true);
    expect(q.usedIndex).toBe(32);
    expect(signals).toBe(1);
  });

  test.each([
    ['flags', featureBit(F.RING_INDIRECT_DESC)],
    ['EVENT_IDX', featureBit(F.RING_EVENT_IDX)],
  ])('interrupt suppression by the driver (%s): used entries, no interrupt', async (_, features) => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize({ features });
    const [q] = driver.queues;
    await q.submit([{ writable: 8 }]); // one with an interrupt, so EVENT_IDX has a baseline
    q.forget(); // poll from here on
    q.setInterrupts(false);
    q.submit([{ writable: 8 }], { notify: false });
    await q.kick();
    await until(() => q.usedIndex === 2);
    expect(driver.vectors[1].take()).toBe(0);
    q.collect();
    q.setInterrupts(true);
    q.submit([{ writable: 8 }], { notify: false });
    const interrupt = driver.vectors[1].next();
    await q.kick();
    expect(await interrupt).toBe(1);
  });

  test('notification suppression by the device: EVENT_IDX avail_event follows the chains it took', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize();
    const q = driver.split(0);
    for (let i = 0; i < 3; i++) await q.submit([{ writable: 8 }]);
    const availEvent = Buffer.from(driver.at(q.used + BigInt(4 + 8 * q.size), 2)).readUInt16LE(0);
    expect(availEvent).toBe(3);
    // The device wants the next one: the driver notifies.
    const next = q.submit([{ writable: 8 }], { notify: false });
    expect(await q.kickIfWanted()).toBe(true);
    await next;
  });

  test('RING_RESET: one queue reset and set up again while the device runs', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize();
    await driver.queues[0].submit([{ writable: 8 }]);
    await driver.writeCommon(Common.QUEUE_SELECT, 2, 0);
    await driver.writeCommon(Common.QUEUE_RESET, 2, 1);
    expect(Number(await driver.readCommon(Common.QUEUE_RESET, 2))).toBe(1);
    expect(Number(await driver.readCommon(Common.QUEUE_ENABLE, 2))).toBe(0);
    expect(await driver.status()).toBe(READY);
  });

  test('INTx: ISR says why, reading it clears it and drops the line', async () => {
    const { driver } = await drive(t, new VirtioRng());
    const [intx] = await driver.client.wireIrqs(IrqIndex.INTX);
    t.defer(() => intx.close());
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER);
    await driver.writeDriverFeatures(featureBit(F.VERSION_1));
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    // A queue by hand, MSI-X left off.
    const size = 8;
    const desc = driver.allocate(4096);
    const avail = driver.allocate(4096);
    const used = driver.allocate(4096);
    const buffer = driver.allocate(4096);
    await driver.writeCommon(Common.QUEUE_SIZE, 2, size);
    await driver.writeCommon(Common.QUEUE_DESC, 8, desc);
    await driver.writeCommon(Common.QUEUE_DRIVER, 8, avail);
    await driver.writeCommon(Common.QUEUE_DEVICE, 8, used);
    await driver.writeCommon(Common.QUEUE_ENABLE, 2, 1);
    await driver.setStatus(READY);
    const d = Buffer.alloc(16);
    d.writeBigUInt64LE(buffer, 0);
    d.writeUInt32LE(32, 8);
    d.writeUInt16LE(2, 12); // WRITE
    driver.at(desc, 16).set(d);
    driver.at(avail, 6).set([0, 0, 1, 0, 0, 0]); // idx 1, ring[0] = 0
    const interrupt = intx.next();
    await driver.notifyQueue(0);
    await interrupt;
    const status = () => driver.client.regionRead(Region.CONFIG, BigInt(Cfg.STATUS), 2).then((b) => b.readUInt16LE(0) & 0x8);
    expect(await status()).toBe(0x8);
    expect(await driver.readIsr()).toBe(1);
    expect(await status()).toBe(0);
    expect(await driver.readIsr()).toBe(0);
    expect(Buffer.from(driver.at(used + 4n, 8)).readUInt32LE(4)).toBe(32);
  });
});

describe('migration', () => {
  test('queue state moves to a new device; the driver carries on there', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize();
    const [q] = driver.queues;
    for (let i = 0; i < 5; i++) await q.submit([{ writable: 8 }]);
    const { device: destinationDevice, client: to } = await serveDestination(t, new VirtioRng());
    await migrate(driver.client, to);
    await driver.moveTo(to);
    expect(destinationDevice.deviceStatus).toBe(READY);
    const done = await q.submit([{ writable: 8 }]);
    expect(done.written).toBe(8);
    expect(q.usedIndex).toBe(6);
  });

  test('stopping waits for the chains in flight; the saved rings then hold their completions', async () => {
    const held: DescriptorChain[] = [];
    const device = new VirtioDevice({ deviceId: 63, queues: [{ size: 8 }], onQueue: (q) => { for (let c = q.pop(); c; c = q.pop()) held.push(c); } });
    const { driver } = await drive(t, device);
    await driver.initialize();
    const done = driver.queues[0].submit([{ writable: 4 }]);
    await until(() => held.length === 1);
    let stopped = false;
    const stopping = Promise.resolve(pciFunction(device).migration!.stop!()).then(() => (stopped = true));
    for (let turn = 0; turn < 5; turn++) await new Promise((r) => setImmediate(r));
    expect(stopped).toBe(false);
    device.queues[0].complete(held[0], 0);
    await stopping;
    expect((await done).written).toBe(0);
    await pciFunction(device).migration!.start!();
  });

  test('a state that does not fit is refused before anything changes', async () => {
    const { device } = await drive(t, new VirtioRng());
    const other = new VirtioRng();
    t.defer(() => other.close());
    const save = async (d: VirtioRng) => {
      const chunks: Uint8Array[] = [];
      await pciFunction(d).migration!.stop?.();
      const data = pciFunction(d).migration!.save({ phase: 'stopcopy', index: 0 });
      for await (const c of data as AsyncIterable<Uint8Array> | Iterable<Uint8Array>) chunks.push(c);
      return Buffer.concat(chunks);
    };
    const good = await save(device);
    const text = good.toString('latin1');
    const json = text.match(/\{"version":\d+.*\}/)![0];
    const tamper = (change: (s: Record<string, unknown>) => void) => {
      const s = JSON.parse(json);
      change(s);
      return Buffer.from(text.replace(json, JSON.stringify(s).padEnd(json.length, ' ')), 'latin1');
    };
    const bad = [
      tamper((s) => ((s.queues as Record<string, unknown>[])[0].size = 512)),
      tamper((s) => ((s.queues as Record<string, unknown>[])[0].vector = 9)),
      tamper((s) => (s.offered = 'ff')),
    ];
    for (const data of bad) {
      await expect(Promise.resolve().then(() => pciFunction(other).migration!.load(data, { phase: 'stopcopy', index: 0 }))).rejects.toThrow();
    }
    expect(other.deviceStatus).toBe(0);
  });
});

test('the driver refuses a device that is not virtio', async () => {
  const served = await serve();
  t.defer(() => served.close());
  await expect(VirtioDriver.connect(await served.client(), { memory: t.memory(4096) })).rejects.toThrow(/no virtio common configuration/);
});
