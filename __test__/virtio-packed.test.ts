/**
 * Packed virtqueues (RING_PACKED): the examples, unchanged, served over
 * packed rings the package's driver lays out; wrap counters over many laps,
 * out-of-order completions skipping the ring entries of their chains, event
 * suppression both ways, RING_RESET and migration of packed queue state.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { describe, expect, test } from 'vitest';
import { pciFunction } from '../ts/pci/device.js';
import { BlockDevice, featureBit, migrate, VirtioDevice, VirtioFeature as F, VirtioStatus as S, type DescriptorChain } from '../ts/index.js';
import { Common, EventSuppress } from '../ts/virtio/spec.js';
import { VirtioRng } from '../examples/virtio-rng.js';
import { VirtioConsole } from '../examples/virtio-console.js';
import { BlkRequest as R, BlkStatus, VirtioBlk } from '../examples/virtio-blk/index.js';
import { NET_HEADER } from '../examples/virtio-net/index.js';
import { testCleanups } from './cleanups.js';
import { until } from './helpers.js';
import { drive, lan, serveDestination } from './virtio-helpers.js';

const t = testCleanups();
const READY = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK;

/** A device whose queue 0 keeps every chain until the test completes it. */
function holder(size = 16) {
  const held: DescriptorChain[] = [];
  const device = new VirtioDevice({ deviceId: 63, queues: [{ size }], onQueue: (q) => { for (let c = q.pop(); c; c = q.pop()) held.push(c); } });
  return { device, held };
}

describe('packed rings under the examples', () => {
  test('virtio-rng: RING_PACKED negotiated, chains of one and several buffers, indirect ones', async () => {
    const { driver, device } = await drive(t, new VirtioRng());
    await driver.initialize({ ring: 'packed' });
    expect(await driver.status()).toBe(READY);
    expect(device.negotiated(F.RING_PACKED)).toBe(true);
    const q = driver.packed(0);
    expect((await q.submit([{ writable: 64 }])).written).toBe(64);
    const several = await q.submit([{ writable: 16 }, { writable: 48 }]);
    expect(several.written).toBe(64);
    expect(new Set(Buffer.concat(several.writable)).size).toBeGreaterThan(16); // 64 random bytes: at least 17 distinct values, but for 1 in 10^20
    const indirect = await q.submit([{ writable: 32 }, { writable: 32 }], { indirect: true });
    expect(indirect.written).toBe(64);
    expect(q.usedIndex).toBe(3);
  });

  test('wrap counters: many laps of a small ring, one chain at a time and a ring full at once', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize({ ring: 'packed', queueSize: 8 });
    const q = driver.packed(0);
    // Chains of 1-3 entries: laps end inside chains, so chains straddle the end of the ring.
    for (let i = 0; i < 40; i++) {
      const buffers = Array.from({ length: 1 + (i % 3) }, () => ({ writable: 4 }));
      expect((await q.submit(buffers)).written).toBe(4 * buffers.length);
    }
    for (let round = 0; round < 5; round++) {
      const all = Promise.all(Array.from({ length: 8 }, () => q.submit([{ writable: 8 }], { notify: false })));
      await q.kick();
      expect((await all).every((d) => d.written === 8)).toBe(true);
    }
    expect(q.usedIndex).toBe(80);
  });

  test('a queue size that is not a power of two (packed rings allow any)', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize({ ring: 'packed', queueSize: 100 });
    await driver.writeCommon(Common.QUEUE_SELECT, 2, 0);
    expect(Number(await driver.readCommon(Common.QUEUE_SIZE, 2))).toBe(100);
    const q = driver.packed(0);
    for (let i = 0; i < 150; i++) expect((await q.submit([{ writable: 4 }, { writable: 4 }])).written).toBe(8);
  });

  test('virtio-blk: writes land and read back over two packed queues', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'virtio-packed-'));
    t.defer(() => rmSync(dir, { recursive: true, force: true }));
    const image = join(dir, 'disk.img');
    writeFileSync(image, Buffer.alloc(1 << 20));
    const { driver } = await drive(t, new VirtioBlk(BlockDevice.open(image), { queues: 2 }));
    await driver.initialize({ ring: 'packed' });
    const header = (type: number, sector: bigint) => {
      const h = Buffer.alloc(16);
      h.writeUInt32LE(type, 0);
      h.writeBigUInt64LE(sector, 8);
      return h;
    };
    const data = (seed: number) => Buffer.alloc(4096, seed);
    await Promise.all(driver.queues.map(async (q, i) => {
      const write = await q.submit([{ data: header(R.OUT, BigInt(8 * i)) }, { data: data(i + 1) }, { writable: 1 }]);
      expect(write.writable[0][0]).toBe(BlkStatus.OK);
      const read = await q.submit([{ data: header(R.IN, BigInt(8 * i)) }, { writable: 4096 }, { writable: 1 }], { indirect: i === 1 });
      expect(read.written).toBe(4097);
      expect(read.writable[0].equals(data(i + 1))).toBe(true);
    }));
  });

  test('virtio-console: receive buffers held by the device travel with a migration', async () => {
    const device = new VirtioConsole();
    device.attachStream(new PassThrough(), new PassThrough());
    const { driver } = await drive(t, device);
    await driver.initialize({ ring: 'packed' });
    const rx = driver.packed(0);
    // A transmitted chain first, so the held buffers sit past the ring's start.
    await driver.queues[1].submit([{ data: Buffer.from('x') }]);
    const waiting = [rx.submit([{ writable: 4 }, { writable: 4 }]), rx.submit([{ writable: 16 }])];
    await until(() => device.queues[0].pending === 2);
    const input = new PassThrough();
    const { device: destinationDevice, client: to } = await serveDestination(t, new VirtioConsole());
    destinationDevice.attachStream(input, new PassThrough());
    const from = driver.client;
    await driver.moveTo(to);
    await migrate(from, to);
    input.write('after the move!');
    const [a, b] = await Promise.all(waiting);
    expect(Buffer.concat(a.writable).subarray(0, a.written).toString()).toBe('after th');
    expect(b.writable[0].subarray(0, b.written).toString()).toBe('e move!');
    expect(destinationDevice.needsReset).toBeUndefined();
  });

  test('virtio-net: a frame from one NIC to another through the switch', async () => {
    const [a, b] = await lan(t, 2, { ring: 'packed' });
    const received = b.driver.queues[0].submit([{ writable: NET_HEADER + 1514 }]);
    const frame = Buffer.concat([Buffer.alloc(6, 0xff), a.mac, Buffer.from([0x88, 0xb5]), Buffer.from('hello over packed rings')]);
    await a.driver.queues[1].submit([{ data: Buffer.alloc(NET_HEADER) }, { data: frame }]);
    const done = await received;
    expect(done.writable[0].subarray(NET_HEADER, done.written).equals(frame)).toBe(true);
  });
});

describe('packed ring mechanics', () => {
  test('out-of-order completion: each used entry skips the entries of its own chain', async () => {
    const { device, held } = holder();
    const { driver } = await drive(t, device);
    await driver.initialize({ ring: 'packed' });
    const q = driver.packed(0);
    // Chains of 3, 1 and 2 entries; completed last first, with distinct lengths.
    const done = [3, 1, 2].map((n) => q.submit(Array.from({ length: n }, () => ({ writable: 8 }))));
    await until(() => held.length === 3);
    expect(held.map((c) => c.writable.length)).toEqual([3, 1, 2]);
    for (const [i, chain] of [...held].reverse().entries()) device.queues[0].complete(chain, i + 1);
    expect((await Promise.all(done)).map((d) => d.written)).toEqual([3, 2, 1]);
    // The ring is consistent afterwards: the next chains go through.
    const next = q.submit([{ writable: 8 }]);
    await until(() => held.length === 4);
    device.queues[0].complete(held[3], 8);
    expect((await next).written).toBe(8);
    expect(device.needsReset).toBeUndefined();
  });

  test.each([
    ['flags', featureBit(F.RING_INDIRECT_DESC)],
    ['EVENT_IDX', featureBit(F.RING_EVENT_IDX)],
  ])('interrupt suppression by the driver (%s): used entries, no interrupt', async (_, features) => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize({ ring: 'packed', features });
    const q = driver.packed(0);
    await q.submit([{ writable: 8 }]);
    q.forget(); // poll from here on
    q.setInterrupts(false);
    void q.submit([{ writable: 8 }], { notify: false });
    await q.kick();
    await until(() => q.usedIndex === 2);
    expect(driver.vectors[1].take()).toBe(0);
    q.setInterrupts(true);
    void q.submit([{ writable: 8 }], { notify: false });
    const interrupt = driver.vectors[1].next();
    await q.kick();
    expect(await interrupt).toBe(1);
  });

  test('a batch: every available chain taken on one notification, one interrupt for all', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize({ ring: 'packed', features: featureBit(F.RING_INDIRECT_DESC) });
    const q = driver.packed(0);
    let signals = 0;
    driver.vectors[1].on('interrupt', (count) => (signals += count));
    const all = Promise.all(Array.from({ length: 32 }, () => q.submit([{ writable: 8 }], { notify: false })));
    await q.kick();
    expect((await all).every((d) => d.written === 8)).toBe(true);
    expect(signals).toBe(1);
  });

  test('notification suppression by the device: with EVENT_IDX its off_wrap names its next descriptor', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize({ ring: 'packed', queueSize: 4 });
    const q = driver.packed(0);
    const deviceEvent = () => Buffer.from(driver.at(q.deviceArea, EventSuppress.SIZE));
    for (let i = 0; i < 5; i++) await q.submit([{ writable: 8 }]); // five entries: one lap and one more
    expect(deviceEvent().readUInt16LE(EventSuppress.FLAGS)).toBe(EventSuppress.DESC);
    expect(deviceEvent().readUInt16LE(EventSuppress.OFF_WRAP)).toBe(1); // index 1, wrap counter 0
    expect(q.availPosition).toBe(1);
    const next = q.submit([{ writable: 8 }], { notify: false });
    expect(await q.kickIfWanted()).toBe(true);
    await next;
  });

  test('without EVENT_IDX the device enables notifications by flags once it is idle', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize({ ring: 'packed', features: 0n });
    const q = driver.packed(0);
    await q.submit([{ writable: 8 }]);
    expect(Buffer.from(driver.at(q.deviceArea, EventSuppress.SIZE)).readUInt16LE(EventSuppress.FLAGS)).toBe(EventSuppress.ENABLE);
  });

  test('RING_RESET: a packed queue reset and set up again starts from wrap counter 1', async () => {
    const { driver, device } = await drive(t, new VirtioRng());
    await driver.initialize({ ring: 'packed' });
    for (let i = 0; i < 3; i++) await driver.queues[0].submit([{ writable: 8 }]);
    await driver.writeCommon(Common.QUEUE_SELECT, 2, 0);
    await driver.writeCommon(Common.QUEUE_RESET, 2, 1);
    expect(Number(await driver.readCommon(Common.QUEUE_ENABLE, 2))).toBe(0);
    // The driver lays the queue out again (zeroed ring, positions at 0) and enables it.
    await driver.initialize({ ring: 'packed' });
    expect((await driver.queues[0].submit([{ writable: 8 }])).written).toBe(8);
    expect(device.needsReset).toBeUndefined();
  });

  test('migration: ring positions and wrap counters move to a new device; the driver carries on there', async () => {
    const { driver } = await drive(t, new VirtioRng());
    await driver.initialize({ ring: 'packed', queueSize: 8 });
    const q = driver.packed(0);
    for (let i = 0; i < 11; i++) await q.submit([{ writable: 8 }]); // past one lap
    const { device: destinationDevice, client: to } = await serveDestination(t, new VirtioRng());
    await migrate(driver.client, to);
    await driver.moveTo(to);
    expect(destinationDevice.negotiated(F.RING_PACKED)).toBe(true);
    for (let i = 0; i < 9; i++) expect((await q.submit([{ writable: 8 }, { writable: 8 }])).written).toBe(16);
    expect(q.usedIndex).toBe(20);
  });

  test('a packed queue state that does not add up is refused before anything changes', async () => {
    const { device, held } = holder(8);
    const { driver } = await drive(t, device);
    await driver.initialize({ ring: 'packed' });
    void driver.queues[0].submit([{ writable: 4 }, { writable: 4 }]).catch(() => undefined);
    await until(() => held.length === 1);
    const save = async (d: VirtioDevice) => {
      const chunks: Uint8Array[] = [];
      const data = pciFunction(d).migration!.save({ phase: 'stopcopy', index: 0 });
      for await (const c of data as AsyncIterable<Uint8Array> | Iterable<Uint8Array>) chunks.push(c);
      return Buffer.concat(chunks);
    };
    // Nothing held: the device waits for the chain in flight before it stops; complete it first.
    device.queues[0].complete(held[0], 8);
    await pciFunction(device).migration!.stop?.();
    const text = (await save(device)).toString('latin1');
    const json = text.match(/\{"version":\d+.*\}/)![0];
    const tamper = (change: (q: Record<string, unknown>) => void) => {
      const s = JSON.parse(json);
      change(s.queues[0]);
      return Buffer.from(text.replace(json, JSON.stringify(s).padEnd(json.length, ' ')), 'latin1');
    };
    const other = holder(8).device;
    t.defer(() => other.close());
    const bad = [
      tamper((q) => (q.lastAvail = 9 | EventSuppress.WRAP)), // past the ring
      tamper((q) => (q.lastAvail = ((q.lastAvail as number) + 1) & 0xffff)), // an entry in flight that nothing holds
    ];
    for (const data of bad) {
      await expect(Promise.resolve().then(() => pciFunction(other).migration!.load(data, { phase: 'stopcopy', index: 0 }))).rejects.toThrow(/ring position is past|ring entries were in flight|held chains do not fit/);
    }
    expect(other.deviceStatus).toBe(0);
    await pciFunction(device).migration!.start!();
  });
});
