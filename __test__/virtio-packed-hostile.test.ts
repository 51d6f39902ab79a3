/**
 * A hostile driver on packed rings: every malformed chain, buffer ID, wrap
 * state or layout marks the device NEEDS_RESET with a configuration
 * interrupt (never a hang, never a crash), and a reset brings it back. The
 * fuzz virtio mode plays such a driver on packed rings too.
 */
import { describe, expect, test } from 'vitest';
import { formatFinding, fuzzDevice } from '../ts/fuzz/index.js';
import { featureBit, KIT_FEATURES, virtioMode, VirtioDevice, VirtioFeature as F, VirtioStatus as S, type DescriptorChain, type PackedDriverQueue, type VirtioDriver } from '../ts/index.js';
import { writePackedTable, type PackedDescriptor } from '../ts/virtio/driver.js';
import { Desc } from '../ts/virtio/spec.js';
import { VirtioRng } from '../examples/virtio-rng.js';
import { testCleanups } from './cleanups.js';
import { drive, expectLayoutRefused, GUEST_MEMORY, type QueueLayout } from './virtio-helpers.js';
import { until } from './helpers.js';

const t = testCleanups();
const WRITE = Desc.F_WRITE;
const NEXT = Desc.F_NEXT;
const INDIRECT = Desc.F_INDIRECT;
const SIZE = 16;

interface Scene {
  driver: VirtioDriver;
  q: PackedDriverQueue;
  /** Guest memory for a buffer. */
  buffer(length: number): bigint;
  /** Writes an indirect table in packed form at a fresh address. */
  table(entries: PackedDescriptor[]): bigint;
}

async function scene(device: VirtioDevice, features = KIT_FEATURES): Promise<Scene> {
  const { driver } = await drive(t, device);
  await driver.initialize({ ring: 'packed', queueSize: SIZE, features });
  return {
    driver,
    q: driver.packed(0),
    buffer: (length) => driver.allocate(length),
    table(entries) {
      const at = driver.allocate(entries.length * Desc.SIZE);
      const bytes = driver.at(at, entries.length * Desc.SIZE);
      writePackedTable(new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), entries);
      return at;
    },
  };
}

/** Runs `misbehave` against a live rng device; expects NEEDS_RESET for `reason`, then recovery. */
async function expectNeedsReset(reason: RegExp, misbehave: (s: Scene) => void | Promise<void>, features = KIT_FEATURES): Promise<void> {
  const device = new VirtioRng();
  const s = await scene(device, features);
  const configChange = s.driver.vectors[0].next();
  await misbehave(s);
  await s.q.kick();
  await configChange;
  expect((await s.driver.status()) & S.NEEDS_RESET).toBe(S.NEEDS_RESET);
  expect(device.needsReset?.message).toMatch(reason);
  // Nothing more is taken until the driver resets; then the device works again.
  s.driver.close();
  await s.driver.initialize({ ring: 'packed', queueSize: SIZE, features });
  expect(device.needsReset).toBeUndefined();
  expect((await s.driver.queues[0].submit([{ writable: 16 }])).written).toBe(16);
}

describe('malformed packed chains', () => {
  test('a chain longer than the queue size (NEXT all the way round)', () => expectNeedsReset(/chain at descriptor 0 is longer than the queue size 16/, ({ q, buffer }) => {
    const b = buffer(8);
    q.offerChain(Array.from({ length: SIZE }, () => ({ addr: b, len: 8, flags: WRITE | NEXT })), 0);
  }));

  test('a chain that continues into a descriptor not made available (NEXT on the last)', () => expectNeedsReset(/descriptor 1 continues the chain at 0 but is not available in wrap 1/, ({ q, buffer }) => {
    q.offerChain([{ addr: buffer(8), len: 8, flags: WRITE | NEXT }], 0);
  }));

  test('a chain whose later descriptor carries the other lap\'s wrap bits', () => expectNeedsReset(/descriptor 1 continues the chain at 0 but is not available/, ({ q, buffer }) => {
    const b = buffer(16);
    q.writeDescriptor(1, { addr: b + 8n, len: 8, id: 0, flags: WRITE | q.availBits(false) });
    q.writeDescriptor(0, { addr: b, len: 8, id: 0, flags: WRITE | NEXT | q.availBits() });
  }));

  test('a buffer id past the queue size', () => expectNeedsReset(/buffer id 300 is past the queue size 16/, ({ q, buffer }) => {
    q.offerChain([{ addr: buffer(8), len: 8, flags: WRITE }], 300);
  }));

  test('a buffer outside guest memory', () => expectNeedsReset(/descriptor 0 \(16 bytes at 0x10\) is outside guest memory/, ({ q }) => {
    q.offerChain([{ addr: 0x10n, len: 16, flags: WRITE }], 0);
  }));

  test('a buffer running off the end of guest memory', () => expectNeedsReset(/outside guest memory/, ({ q, driver }) => {
    q.offerChain([{ addr: driver.iova + BigInt(GUEST_MEMORY) - 8n, len: 16, flags: WRITE }], 0);
  }));

  test('a device-readable buffer after a device-writable one', () => expectNeedsReset(/descriptor 1 is device-readable after a device-writable/, ({ q, buffer }) => {
    const b = buffer(16);
    q.offerChain([{ addr: b, len: 8, flags: WRITE | NEXT }, { addr: b + 8n, len: 8, flags: 0 }], 0);
  }));

  test('a chain across the end of the ring is checked in the next lap', () => expectNeedsReset(/descriptor 0 continues the chain at 15 but is not available in wrap 0/, async ({ q, buffer }) => {
    for (let i = 0; i < SIZE - 1; i++) await q.submit([{ writable: 8 }]);
    // Entry 0 holds the device's used entry of lap 1: not available in lap 0.
    q.offerChain([{ addr: buffer(8), len: 8, flags: WRITE | NEXT }], 0);
  }));
});

describe('malformed packed indirect tables', () => {
  test('nested', () => expectNeedsReset(/indirect again \(nested\)/, ({ q, buffer, table }) => {
    const inner = table([{ addr: buffer(8), len: 8, flags: WRITE }]);
    q.offerChain([{ addr: table([{ addr: inner, len: 16, flags: INDIRECT }]), len: 16, flags: INDIRECT }], 0);
  }));

  test('with NEXT beside INDIRECT', () => expectNeedsReset(/also has NEXT/, ({ q, buffer, table }) => {
    const inner = table([{ addr: buffer(8), len: 8, flags: WRITE }]);
    q.offerChain([{ addr: inner, len: 16, flags: INDIRECT | NEXT }, { addr: buffer(8), len: 8, flags: WRITE }], 0);
  }));

  test('after direct descriptors in one chain', () => expectNeedsReset(/indirect descriptor 1 follows direct ones/, ({ q, buffer, table }) => {
    const inner = table([{ addr: buffer(8), len: 8, flags: WRITE }]);
    q.offerChain([{ addr: buffer(8), len: 8, flags: NEXT }, { addr: inner, len: 16, flags: INDIRECT }], 0);
  }));

  test('not negotiated', () => expectNeedsReset(/RING_INDIRECT_DESC was not negotiated/, ({ q, buffer, table }) => {
    q.offerChain([{ addr: table([{ addr: buffer(8), len: 8, flags: WRITE }]), len: 16, flags: INDIRECT }], 0);
  }, featureBit(F.VERSION_1)));

  test('a length that is not whole descriptors', () => expectNeedsReset(/indirect table of 24 bytes/, ({ q, buffer, table }) => {
    q.offerChain([{ addr: table([{ addr: buffer(8), len: 8, flags: WRITE }, { addr: 0n, len: 0, flags: 0 }]), len: 24, flags: INDIRECT }], 0);
  }));

  test('a device-readable entry after a device-writable one', () => expectNeedsReset(/descriptor 1 is device-readable after a device-writable/, ({ q, buffer, table }) => {
    const b = buffer(16);
    q.offerChain([{ addr: table([{ addr: b, len: 8, flags: WRITE }, { addr: b + 8n, len: 8, flags: 0 }]), len: 32, flags: INDIRECT }], 0);
  }));

  test('a table outside guest memory', () => expectNeedsReset(/indirect table .* is outside guest memory/, ({ q }) => {
    q.offerChain([{ addr: 0x1000n, len: 32, flags: INDIRECT }], 0);
  }));
});

describe('packed wrap states and buffer ids', () => {
  test('a descriptor made available with the other lap\'s wrap bits is not taken (and nothing hangs)', async () => {
    const device = new VirtioRng();
    const { driver, q, buffer } = await scene(device);
    q.writeDescriptor(0, { addr: buffer(8), len: 8, id: 0, flags: WRITE | q.availBits(false) });
    await q.kick();
    expect(await driver.status()).toBe(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
    expect(device.queues[0].pending).toBe(0);
    // Made available properly, it is taken.
    q.offerChain([{ addr: buffer(8), len: 8, flags: WRITE }], 0);
    await q.kick();
    await until(() => q.usedIndex === 1);
  });

  test('a buffer id offered again while the device still holds it', async () => {
    const held: DescriptorChain[] = [];
    const device = new VirtioDevice({ deviceId: 63, queues: [{ size: 16 }], onQueue: (queue) => { for (let c = queue.pop(); c; c = queue.pop()) held.push(c); } });
    const { driver, q, buffer } = await scene(device);
    const configChange = driver.vectors[0].next();
    q.offerChain([{ addr: buffer(8), len: 8, flags: WRITE }], 5);
    q.offerChain([{ addr: buffer(8), len: 8, flags: WRITE }], 5);
    await q.kick();
    await configChange;
    expect(held).toHaveLength(1);
    expect(device.needsReset?.message).toMatch(/buffer id 5 is already in flight/);
  });
});

describe('malformed packed layouts', () => {
  function badLayout(reason: RegExp, layout: QueueLayout): Promise<void> {
    return expectLayoutRefused(t, KIT_FEATURES, layout, reason);
  }

  const base = 0x100000n;
  test('a size past the maximum', () => badLayout(/queue_size 300 is not 1-256/, { size: 300, desc: base, driver: base + 0x2000n, device: base + 0x3000n }));
  test('a driver area that is not 4-byte aligned', () => badLayout(/driver area at 0x102002 is not 4-byte aligned/, { size: 8, desc: base, driver: base + 0x2002n, device: base + 0x3000n }));
  test('an event suppression area outside guest memory', () => badLayout(/device event suppression area .* is not in one shared, writable window/, { size: 8, desc: base, driver: base + 0x2000n, device: 0x1000n }));
});

test('the fuzz virtio mode plays its hostile driver on packed rings too', async () => {
  const rings = { packed: 0, split: 0 };
  const counted = () => {
    const device = new VirtioRng();
    const queue = device.queues[0];
    const pop = queue.pop.bind(queue);
    queue.pop = () => {
      const chain = pop();
      if (chain) rings[device.negotiated(F.RING_PACKED) ? 'packed' : 'split']++;
      return chain;
    };
    return device;
  };
  const report = await fuzzDevice(counted, { seed: 7, ops: 200, modes: [virtioMode()] });
  expect(report.finding, report.finding ? formatFinding(report) : '').toBeUndefined();
  expect(rings.packed).toBeGreaterThan(0);
  expect(rings.split).toBeGreaterThan(0);
}, 60_000);
