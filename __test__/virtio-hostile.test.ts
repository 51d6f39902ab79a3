/**
 * A hostile driver: every malformed chain or ring marks the device
 * NEEDS_RESET with a configuration interrupt (never a hang, never a crash),
 * and a reset brings it back.
 */
import { describe, expect, test } from 'vitest';
import {
  featureBit, KIT_FEATURES, VirtioDevice, VirtioFeature as F, VirtioStatus as S, type DescriptorChain, type SplitDriverQueue, type VirtioDriver, type VirtioNotifyMode,
} from '../ts/index.js';
import { Desc } from '../ts/virtio/spec.js';
import { VirtioRng } from '../examples/virtio-rng.js';
import { testCleanups } from './cleanups.js';
import { drive, expectLayoutRefused, GUEST_MEMORY, type QueueLayout } from './virtio-helpers.js';
import { until } from './helpers.js';

const t = testCleanups();
const WRITE = Desc.F_WRITE;
const NEXT = Desc.F_NEXT;
const INDIRECT = Desc.F_INDIRECT;

interface Scene {
  driver: VirtioDriver;
  q: SplitDriverQueue;
  /** Guest memory for a buffer or a table. */
  buffer(length: number): bigint;
  /** Writes an indirect table of entries at a fresh address. */
  table(entries: { addr: bigint; len: number; flags: number; next: number }[]): bigint;
}

/** Every way a notification can arrive: the driver uses the one the device offers. */
const NOTIFY_MODES: readonly VirtioNotifyMode[] = ['mmap', 'ioeventfd', 'trap', 'avail'];

/** Runs `misbehave` against a live rng device notified by `notify`; expects NEEDS_RESET for `reason`, then recovery. */
async function expectNeedsReset(notify: VirtioNotifyMode, reason: RegExp, misbehave: (s: Scene) => void | Promise<void>, features = KIT_FEATURES): Promise<void> {
  const { driver, device } = await drive(t, new VirtioRng({ notify }));
  // 'avail' takes trapped writes too (and watches the rings as well).
  expect(driver.notifyPath).toBe(notify === 'avail' ? 'trap' : notify);
  await driver.initialize({ features });
  const q = driver.split(0);
  const scene: Scene = {
    driver, q,
    buffer: (length) => driver.allocate(length),
    table(entries) {
      const at = driver.allocate(entries.length * Desc.SIZE);
      const view = new DataView(driver.at(at, entries.length * Desc.SIZE).buffer, driver.at(at, 1).byteOffset);
      entries.forEach((e, i) => {
        view.setBigUint64(i * 16, e.addr, true);
        view.setUint32(i * 16 + 8, e.len, true);
        view.setUint16(i * 16 + 12, e.flags, true);
        view.setUint16(i * 16 + 14, e.next, true);
      });
      return at;
    },
  };
  const configChange = driver.vectors[0].next();
  await misbehave(scene);
  await q.kick();
  await configChange;
  expect((await driver.status()) & S.NEEDS_RESET).toBe(S.NEEDS_RESET);
  expect(device.needsReset?.message).toMatch(reason);
  // Nothing more is taken until the driver resets; then the device works again.
  await driver.initialize({ features });
  expect(device.needsReset).toBeUndefined();
  expect((await driver.queues[0].submit([{ writable: 16 }])).written).toBe(16);
}

describe.each(NOTIFY_MODES)('malformed chains, notified by %s', (notify) => {
  test('a loop', () => expectNeedsReset(notify, /longer than the queue size 256 \(a loop\)/, ({ q, buffer }) => {
    const b = buffer(64);
    q.writeDescriptor(0, { addr: b, len: 8, flags: WRITE | NEXT, next: 1 });
    q.writeDescriptor(1, { addr: b, len: 8, flags: WRITE | NEXT, next: 0 });
    q.offer(0);
  }));

  test('a next index past the table', () => expectNeedsReset(notify, /chains to 256, past the 256-entry table/, ({ q, buffer }) => {
    q.writeDescriptor(0, { addr: buffer(8), len: 8, flags: WRITE | NEXT, next: 256 });
    q.offer(0);
  }));

  test('a head past the queue size', () => expectNeedsReset(notify, /descriptor 300, past the queue size/, ({ q }) => q.offer(300)));

  test('a buffer outside guest memory', () => expectNeedsReset(notify, /outside guest memory/, ({ q }) => {
    q.writeDescriptor(0, { addr: 0x10n, len: 16, flags: WRITE, next: 0 });
    q.offer(0);
  }));

  test('a buffer running off the end of guest memory', () => expectNeedsReset(notify, /outside guest memory/, ({ q, driver }) => {
    q.writeDescriptor(0, { addr: driver.iova + BigInt(GUEST_MEMORY) - 8n, len: 16, flags: WRITE, next: 0 });
    q.offer(0);
  }));

  test('a device-readable buffer after a device-writable one', () => expectNeedsReset(notify, /device-readable after a device-writable/, ({ q, buffer }) => {
    const b = buffer(64);
    q.writeDescriptor(0, { addr: b, len: 8, flags: WRITE | NEXT, next: 1 });
    q.writeDescriptor(1, { addr: b + 8n, len: 8, flags: 0, next: 0 });
    q.offer(0);
  }));

  test('an available index further ahead than the queue size', () => expectNeedsReset(notify, /ahead of the device's 0, more than the queue size/, ({ q }) => q.setAvailIndex(1000)));
});

describe.each(NOTIFY_MODES)('malformed indirect tables, notified by %s', (notify) => {
  test('nested', () => expectNeedsReset(notify, /indirect again \(nested\)/, ({ q, buffer, table }) => {
    const inner = table([{ addr: buffer(8), len: 8, flags: WRITE, next: 0 }]);
    const outer = table([{ addr: inner, len: 16, flags: INDIRECT, next: 0 }]);
    q.writeDescriptor(0, { addr: outer, len: 16, flags: INDIRECT, next: 0 });
    q.offer(0);
  }));

  test('with NEXT beside INDIRECT', () => expectNeedsReset(notify, /also has NEXT/, ({ q, buffer, table }) => {
    const inner = table([{ addr: buffer(8), len: 8, flags: WRITE, next: 0 }]);
    q.writeDescriptor(0, { addr: inner, len: 16, flags: INDIRECT | NEXT, next: 1 });
    q.offer(0);
  }));

  test('not negotiated', () => expectNeedsReset(notify, /RING_INDIRECT_DESC was not negotiated/, ({ q, buffer, table }) => {
    const inner = table([{ addr: buffer(8), len: 8, flags: WRITE, next: 0 }]);
    q.writeDescriptor(0, { addr: inner, len: 16, flags: INDIRECT, next: 0 });
    q.offer(0);
  }, featureBit(F.VERSION_1)));

  test('a length that is not whole descriptors', () => expectNeedsReset(notify, /indirect table of 24 bytes/, ({ q, buffer, table }) => {
    const inner = table([{ addr: buffer(8), len: 8, flags: WRITE, next: 0 }, { addr: 0n, len: 0, flags: 0, next: 0 }]);
    q.writeDescriptor(0, { addr: inner, len: 24, flags: INDIRECT, next: 0 });
    q.offer(0);
  }));

  test('a loop inside the table', () => expectNeedsReset(notify, /indirect chain at head 0 is longer than its 2-entry table/, ({ q, buffer, table }) => {
    const b = buffer(8);
    const inner = table([{ addr: b, len: 8, flags: WRITE | NEXT, next: 1 }, { addr: b, len: 8, flags: WRITE | NEXT, next: 0 }]);
    q.writeDescriptor(0, { addr: inner, len: 32, flags: INDIRECT, next: 0 });
    q.offer(0);
  }));

  test('a table outside guest memory', () => expectNeedsReset(notify, /indirect table .* is outside guest memory/, ({ q }) => {
    q.writeDescriptor(0, { addr: 0x1000n, len: 32, flags: INDIRECT, next: 0 });
    q.offer(0);
  }));
});

describe('malformed queue layouts', () => {
  /** Sets queue 0 up by hand with `layout`, then DRIVER_OK: the device refuses it. */
  function badLayout(reason: RegExp, layout: QueueLayout): Promise<void> {
    return expectLayoutRefused(t, KIT_FEATURES & ~featureBit(F.RING_PACKED), layout, reason); // split rings
  }

  const base = 0x100000n;
  test('a size that is not a power of two', () => badLayout(/queue_size 100 is not a power of two/, { size: 100, desc: base, driver: base + 0x1000n, device: base + 0x2000n }));
  test('a misaligned descriptor table', () => badLayout(/desc area at 0x100008 is not 16-byte aligned/, { size: 8, desc: base + 8n, driver: base + 0x1000n, device: base + 0x2000n }));
  test('a misaligned used ring', () => badLayout(/device area at 0x102002 is not 4-byte aligned/, { size: 8, desc: base, driver: base + 0x1000n, device: base + 0x2002n }));
  test('rings outside guest memory', () => badLayout(/descriptor table .* is not in one shared, writable window/, { size: 8, desc: 0n, driver: base + 0x1000n, device: base + 0x2000n }));
});

test('heads offered again while in flight: the device holds at most a queue of chains', async () => {
  const held: DescriptorChain[] = [];
  const device = new VirtioDevice({ deviceId: 63, queues: [{ size: 8 }], onQueue: (q) => { for (let c = q.pop(); c; c = q.pop()) held.push(c); } });
  const { driver } = await drive(t, device);
  await driver.initialize();
  const q = driver.split(0);
  q.forget(); // raw offers: the driver's bookkeeping must not see them
  q.writeDescriptor(0, { addr: driver.allocate(16), len: 16, flags: WRITE, next: 0 });
  // Two queues' worth, never more than a queue ahead of what the device took.
  for (let round = 0; round < 2; round++) {
    for (let i = 0; i < 8; i++) q.offer(0); // the same head, again and again
    await q.kick();
    // A mapped notification returns at once: the device takes the first round before the second is offered.
    if (round === 0) await until(() => device.queues[0].pending === 8);
  }
  await until(() => held.length === 8);
  expect(device.queues[0].pending).toBe(8);
  // Completions make room: the kit comes back for the chains still available.
  for (const chain of held.splice(0)) device.queues[0].complete(chain, 0);
  await until(() => held.length === 8);
  expect(device.needsReset).toBeUndefined();
});
