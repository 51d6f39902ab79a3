/**
 * Notifications by every way a VMM may deliver them: stores to the mapped
 * notification page, ioeventfds, trapped writes; with and without
 * VIRTIO_F_NOTIFICATION_DATA. Real sockets, fds and mmaps throughout.
 */
import { describe, expect, test, vi } from 'vitest';
import {
  featureBit, KIT_FEATURES, Region, VirtioDevice, VirtioFeature as F, VirtioStatus as S, type VirtioNotifyMode,
} from '../ts/index.js';
import { RegionCapId } from '../ts/protocol/index.js';
import { Common } from '../ts/virtio/spec.js';
import { closeFds } from '../ts/native.js';
import { TRACE_NAME } from '../ts/virtio/trace.js';
import { VirtioRng } from '../examples/virtio-rng.js';
import { testCleanups } from './cleanups.js';
import { drive } from './virtio-helpers.js';

const t = testCleanups();
const MODES: readonly VirtioNotifyMode[] = ['mmap', 'ioeventfd', 'trap'];
/** The notification area in BAR4. */
const NOTIFY = 0x3000;
const DATA = featureBit(F.NOTIFICATION_DATA);

/** A device of three queues that answers each chain at once and counts the rounds each queue was served. */
class Counter extends VirtioDevice {
  readonly served = [0, 0, 0];

  constructor(notify: VirtioNotifyMode) {
    super({
      deviceId: 63,
      queues: [{ size: 16 }, { size: 16 }, { size: 16 }],
      notify,
      onQueue: (queue) => {
        this.served[queue.index]++;
        for (let chain = queue.pop(); chain; chain = queue.pop()) queue.complete(chain, 0);
      },
    });
  }
}

test('NOTIFICATION_DATA is offered by the kit', () => {
  expect(KIT_FEATURES & DATA).toBe(DATA);
});

describe.each(MODES)("a device with '%s' notifications", (mode) => {
  test('offers the VMM a mappable notification page, an ioeventfd per queue, or neither; the driver uses it', async () => {
    const { driver } = await drive(t, new Counter(mode));
    expect(driver.notifyPath).toBe(mode);
    const info = await driver.client.getRegionInfo(Region.BAR4);
    closeFds(info.fd === undefined ? [] : [info.fd]);
    const sparse = info.caps.find((c) => c.id === RegionCapId.SPARSE_MMAP);
    expect(sparse?.id === RegionCapId.SPARSE_MMAP ? sparse.areas : undefined).toEqual(mode === 'mmap' ? [{ offset: BigInt(NOTIFY), size: 0x1000n }] : undefined);
    const ioFds = await driver.client.getRegionIoFds(Region.BAR4);
    closeFds(ioFds.fds);
    expect(ioFds.entries.map((e) => [Number(e.offset), Number(e.size)])).toEqual(mode === 'ioeventfd' ? [[NOTIFY, 0], [NOTIFY + 4, 0], [NOTIFY + 8, 0]] : []);
  });

  test.each([['without', 0n], ['with', DATA]])('%s NOTIFICATION_DATA: each of 48 notifications in a row is seen, though they write the same value', async (_, data) => {
    const { driver } = await drive(t, new VirtioRng({ notify: mode }));
    // No EVENT_IDX: the driver notifies for every chain (the device never suppresses it while idle).
    await driver.initialize({ features: featureBit(F.RING_INDIRECT_DESC) | data });
    expect(driver.features & DATA).toBe(data);
    const [q] = driver.queues;
    for (let i = 0; i < 48; i++) expect((await q.submit([{ writable: 8 }])).written).toBe(8);
  });

  test("each queue's slot is its own: a notification of queue 2 serves queue 2 only", async () => {
    const { driver, device } = await drive(t, new Counter(mode));
    await driver.initialize();
    const before = [...device.served];
    for (let i = 0; i < 4; i++) await driver.queues[2].submit([{ writable: 4 }]);
    await driver.queues[1].submit([{ writable: 4 }]);
    expect(device.served[0]).toBe(before[0]);
    expect(device.served[1]).toBeGreaterThan(before[1]);
    expect(device.served[2]).toBeGreaterThanOrEqual(before[2] + 4);
  });

  test('a device reset and a new driver: the slots work again', async () => {
    const { driver } = await drive(t, new VirtioRng({ notify: mode }));
    for (const features of [KIT_FEATURES, KIT_FEATURES & ~DATA]) {
      await driver.initialize({ features });
      expect((await driver.queues[0].submit([{ writable: 8 }])).written).toBe(8);
    }
  });
});

test("a VMM that does not map the page: its trapped writes land there and are seen", async () => {
  const { driver, device } = await drive(t, new VirtioRng({ notify: 'mmap' }), 'trap');
  expect(device.notifyMode).toBe('mmap');
  expect(driver.notifyPath).toBe('trap');
  await driver.initialize({ features: featureBit(F.RING_INDIRECT_DESC) });
  for (let i = 0; i < 8; i++) expect((await driver.queues[0].submit([{ writable: 8 }])).written).toBe(8);
});

test('a driver asking for a path the device does not offer gets a UsageError', async () => {
  await expect(drive(t, new VirtioRng({ notify: 'trap' }), 'mmap')).rejects.toThrow(/notification area be mapped/);
  await expect(drive(t, new VirtioRng({ notify: 'mmap' }), 'ioeventfd')).rejects.toThrow(/no ioeventfds/);
});

test('a notify mode that does not exist is a UsageError', () => {
  expect(() => new VirtioRng({ notify: 'poll' as VirtioNotifyMode })).toThrow(/notify 'poll' is not one of mmap, trap, ioeventfd/);
});

describe("a device with 'avail' notifications", () => {
  test.each([['without', 0n], ['with', DATA]])('%s NOTIFICATION_DATA: chains offered with no notification are served, as a polling driver (SPDK\'s) expects, and notified ones too', async (_, data) => {
    const { driver } = await drive(t, new Counter('avail'));
    expect(driver.notifyPath).toBe('trap');
    await driver.initialize({ features: KIT_FEATURES & ~DATA | data });
    for (const q of [2, 0]) {
      for (let i = 0; i < 8; i++) expect((await driver.queues[q].submit([{ writable: 4 }], { notify: false })).written).toBe(0);
    }
    // A notification's value is what the driver wrote, but the watched ring rings with memory's: no false NEEDS_RESET.
    for (let i = 0; i < 4; i++) await driver.queues[1].submit([{ writable: 4 }]);
    expect(await driver.status() & S.NEEDS_RESET).toBe(0);
  });

  test('RING_PACKED is not offered: a packed ring has no available index to watch', async () => {
    const packed = featureBit(F.RING_PACKED);
    expect(new Counter('avail').offered & packed).toBe(0n);
    expect(new Counter('trap').offered & packed).toBe(packed);
    const { driver } = await drive(t, new Counter('avail'));
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER);
    await driver.writeDriverFeatures(featureBit(F.VERSION_1) | packed);
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    expect((await driver.status()) & S.FEATURES_OK).toBe(0);
  });

  test('a ring outside memory shared by fd cannot be watched: NEEDS_RESET when the queue is enabled', async () => {
    const { driver, device } = await drive(t, new Counter('avail'));
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER);
    await driver.writeDriverFeatures(featureBit(F.VERSION_1));
    await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    await driver.writeCommon(Common.QUEUE_SIZE, 2, 16);
    await driver.writeCommon(Common.QUEUE_DRIVER, 8, 0x2000n); // below guest memory (1 MiB up)
    await driver.writeCommon(Common.QUEUE_ENABLE, 2, 1);
    expect(device.needsReset?.message).toMatch(/0x2000/);
  });
});

// An ioeventfd carries no value, so only these two paths can carry a wrong one.
test.each(['mmap', 'trap'] as const)('%s: notification data naming another queue marks the device NEEDS_RESET; a reset recovers', async (mode) => {
  const { driver, device } = await drive(t, new Counter(mode));
  await driver.initialize();
  const configChange = driver.vectors[0].next();
  await driver.notifyQueue(1, 1, (7 << 16) | 2); // vqn 2 at queue 1's address
  await configChange;
  expect((await driver.status()) & S.NEEDS_RESET).toBe(S.NEEDS_RESET);
  expect(device.needsReset?.message).toMatch(/names queue 2 at queue 1's address/);
  await driver.initialize();
  expect(device.needsReset).toBeUndefined();
  expect((await driver.queues[1].submit([{ writable: 4 }])).written).toBe(0);
});

test(`DEBUG=${TRACE_NAME}: each notification and interrupt of a queue is timed against the other`, async () => {
  const lines: string[] = [];
  const debug = process.env.DEBUG;
  process.env.DEBUG = TRACE_NAME;
  const device = new VirtioRng();
  if (debug === undefined) delete process.env.DEBUG;
  else process.env.DEBUG = debug;
  const write = vi.spyOn(process.stderr, 'write').mockImplementation((chunk) => {
    if (String(chunk).startsWith('virtio ')) lines.push(String(chunk));
    return true;
  });
  t.defer(() => write.mockRestore());
  const { driver } = await drive(t, device);
  await driver.initialize({ features: featureBit(F.RING_INDIRECT_DESC) });
  for (let i = 0; i < 3; i++) await driver.queues[0].submit([{ writable: 8 }]);
  const timed = lines.filter((l) => !l.includes('NaN'));
  expect(timed.filter((l) => /^virtio q0 notified: \d+\.\d us after its last interrupt\n$/.test(l))).toHaveLength(2);
  expect(timed.filter((l) => /^virtio q0 interrupt: \d+\.\d us after its last notification\n$/.test(l))).toHaveLength(3);
});
