/** DoorbellSource: mapped pages, guest memory, trapped writes and ioeventfds as one stream of batches. */
import { once } from 'node:events';
import { afterEach, describe, expect, test } from 'vitest';
import { DmaAccessError, DoorbellSource, IoEventfd, SharedMemory, UsageError, type Ring } from '../ts/index.js';
import { native } from '../ts/native.js';
import { serve, type Served } from './helpers.js';
import { testCleanups } from './cleanups.js';
import { DmaTestDevice, PAGE } from './dma-device.js';

const cleanups = testCleanups();
let served: Served<DmaTestDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served?.device.bar.close();
  served = undefined;
});

function source(count = 8): DoorbellSource {
  const s = new DoorbellSource({ count, spinMicros: 20, maxSleepMicros: 2000 });
  cleanups.defer(() => s.close());
  return s;
}

async function nextBatch(s: DoorbellSource): Promise<Ring[]> {
  const [rings] = await once(s, 'ring');
  return [...(rings as Ring[])].sort((a, b) => a.doorbell - b.doorbell);
}

const word = (value: number) => Buffer.from(new Uint32Array([value]).buffer);

describe('DoorbellSource', () => {
  test('a store to the doorbell page the client mapped rings with its value, once per change', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const info = await client.getRegionInfo(0);
    // The client maps the doorbell page, as a VMM does for its guest.
    const page = new native.NativeMapping(info.fd!, info.offset + BigInt(PAGE), BigInt(PAGE), true, true);
    native.closeFd(info.fd!);
    cleanups.defer(() => page.unmap());
    const s = source();
    s.watchShared(0, served.device.bar, PAGE, 0);
    s.watchShared(1, served.device.bar, PAGE + 4, 0);
    page.write(4, word(17));
    expect(await nextBatch(s)).toEqual([{ doorbell: 1, value: 17 }]);
    page.write(0, word(3));
    page.write(4, word(18));
    // One batch or two, depending on when the watcher looked; never a value twice.
    const latest = new Map<number, number | undefined>();
    const seen: Ring[] = [];
    while (latest.get(0) !== 3 || latest.get(1) !== 18) {
      for (const r of await nextBatch(s)) {
        seen.push(r);
        latest.set(r.doorbell, r.value);
      }
    }
    expect(seen.filter((r) => r.doorbell === 0)).toEqual([{ doorbell: 0, value: 3 }]);
    const stats = s.stats();
    expect(stats.rings).toBe(1 + seen.length);
    expect(stats.wakes).toBe(stats.batches);
    expect(stats.scans).toBeGreaterThan(0);
  });

  test('a word of guest memory (a shadow doorbell) rings when the guest stores to it; a kick looks at it', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const ram = cleanups.memory(4 * PAGE);
    await client.dmaMap({ iova: 0x40000n, memory: ram });
    const s = source();
    s.watchGuest(2, served.device.dma, 0x40000n + 8n);
    ram.write(8, word(5));
    expect(await nextBatch(s)).toEqual([{ doorbell: 2, value: 5 }]);
    // A trapped write of a watched doorbell only says "look": the value is memory's.
    s.write(2, 999);
    expect(await nextBatch(s)).toEqual([{ doorbell: 2, value: 5 }]);
    expect(() => s.watchGuest(3, served!.device.dma, 0x90000n)).toThrow(DmaAccessError);
    expect(() => s.watchGuest(3, served!.device.dma, 0x40002n)).toThrow(UsageError);
  });

  test('trapped writes of one turn make one batch with each doorbell once, at its latest value', async () => {
    const s = source();
    const batches: Ring[][] = [];
    s.on('ring', (rings) => batches.push([...rings]));
    s.write(4, 1);
    s.write(5, 7);
    s.write(4, 2);
    await new Promise((resolve) => setImmediate(resolve));
    expect(batches).toEqual([[{ doorbell: 4, value: 2 }, { doorbell: 5, value: 7 }]]);
  });

  test('an ioeventfd signal kicks its doorbell: no value unless the doorbell is watched in memory', async () => {
    const kick = new IoEventfd({ offset: 0, size: 4 });
    cleanups.defer(() => kick.close());
    const s = source();
    s.ringOnSignal(6, kick);
    native.eventfdSignal(kick.fd);
    expect(await nextBatch(s)).toEqual([{ doorbell: 6, value: undefined }]);
    const memory = new SharedMemory(PAGE);
    cleanups.defer(() => memory.close());
    memory.bytes.set(word(42), 24);
    s.watchShared(6, memory, 24);
    native.eventfdSignal(kick.fd);
    expect(await nextBatch(s)).toEqual([{ doorbell: 6, value: 42 }]);
  });

  test('unwatch drops a ring not yet delivered; idle, watching sleeps and reports the time it took', async () => {
    const memory = new SharedMemory(PAGE);
    cleanups.defer(() => memory.close());
    const s = source();
    s.watchShared(0, memory, 0);
    s.kick(0);
    s.unwatch(0);
    s.kick(0);
    expect(await nextBatch(s)).toEqual([{ doorbell: 0, value: undefined }]);
    s.watchShared(0, memory, 0);
    s.configure({ maxSleepMicros: 100 });
    memory.bytes.set(word(1), 0);
    expect(await nextBatch(s)).toEqual([{ doorbell: 0, value: 1 }]);
    // Woken for no doorbell, watching went back to sleep: waits ending in scans.
    while (s.stats().sleeps < 3) await new Promise((resolve) => setTimeout(resolve, 5));
    expect(s.stats().cpuMicros).toBeGreaterThan(0);
  });

  test('with nothing watched, a poke spins the loop (counted and timed) only after a quick answer, a kick rings, and no back-off sleep or scan follows', async () => {
    const s = source();
    s.poke();
    expect(s.stats().spins).toBe(0);
    const kick = once(s, 'ring');
    // A kick microseconds after the poke is a quick answer: the next poke spins (a preempted
    // round is slower than UNWATCHED_SPIN and spins not, so a few rounds are allowed).
    for (let round = 0; round < 20 && s.stats().spins === 0; round++) {
      s.kick(3);
      s.poke();
    }
    expect(s.stats().spins).toBe(1);
    expect((await kick)[0]).toEqual([{ doorbell: 3, value: undefined }]);
    await new Promise((resolve) => setTimeout(resolve, 5));
    const stats = s.stats();
    expect(stats.sleeps).toBe(0);
    expect(stats.scans).toBe(0);
    expect(stats.cpuMicros).toBeGreaterThan(0);
  });

  test('a word the device re-arms itself (rebase) rings only for a later store', async () => {
    const s = source();
    const memory = new SharedMemory(PAGE);
    cleanups.defer(() => memory.close());
    s.watchShared(1, memory, 4);
    memory.bytes.set(word(7), 4);
    expect(await nextBatch(s)).toEqual([{ doorbell: 1, value: 7 }]);
    memory.bytes.set(word(0xffffffff), 4);
    s.rebase(1, 0xffffffff);
    memory.bytes.set(word(7), 4);
    expect(await nextBatch(s)).toEqual([{ doorbell: 1, value: 7 }]);
    expect(() => s.rebase(2, 0)).toThrow(UsageError);
  });

  test('misuse throws UsageError', () => {
    expect(() => new DoorbellSource({ count: 0 })).toThrow(UsageError);
    expect(() => new DoorbellSource({ count: 4, maxSleepMicros: 0 })).toThrow(UsageError);
    const s = source(4);
    const memory = new SharedMemory(PAGE);
    cleanups.defer(() => memory.close());
    expect(() => s.write(4, 0)).toThrow(UsageError);
    expect(() => s.watchShared(0, memory, 2)).toThrow(UsageError);
    expect(() => s.watchShared(0, memory, PAGE)).toThrow(UsageError);
    expect(() => s.configure({ spinMicros: -1 })).toThrow(UsageError);
    s.close();
    expect(() => s.kick(0)).toThrow(UsageError);
    s.close();
  });
});
