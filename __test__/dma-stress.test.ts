import { afterEach, expect, test } from 'vitest';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { GuestMemory } from '../ts/index.js';
import { openFdCount, serve, type Served } from './helpers.js';
import { DmaTestDevice, PAGE } from './dma-device.js';
import { bytesPerStep } from './leaks.js';

let served: Served<DmaTestDevice>;
afterEach(async () => {
  await served?.close();
  served?.device.bar.close();
});

setFlagsFromString('--expose-gc');
const gc: () => void = runInNewContext('gc');

/** Maps in flight at once, as QEMU sends them in a memory transaction. */
const BATCH = 250;
const WARM_UP = 20_000;
/** Cycles between samples of the live heap, and how many samples the trend is fitted over. */
const SAMPLE_EVERY = 5_000;
const SAMPLES = 8;
/**
 * The live heap's growth allowed per cycle (one DMA_MAP and one DMA_UNMAP), fitted over every
 * sample (taken after a full GC). Measured: -2 to +1 bytes a cycle; a leak planted in the session,
 * 16 bytes a request (32 a cycle), measured 37 and fails.
 */
const MAX_HEAP_BYTES_PER_CYCLE = 8;

test(`${WARM_UP + SAMPLE_EVERY * SAMPLES} DMA_MAP/DMA_UNMAP cycles leave fds where they were and the live heap flat`, async () => {
  served = await serve(new DmaTestDevice());
  const client = await served.client();
  const ram = new GuestMemory(BATCH * PAGE);
  const cycle = async (n: number) => {
    for (let done = 0; done < n; done += BATCH) {
      const iovas = Array.from({ length: BATCH }, (_, i) => BigInt(0x1000_0000 + i * PAGE * 2));
      await Promise.all(iovas.map((iova, i) => client.dmaMap({ iova, memory: ram, offset: i * PAGE, size: PAGE })));
      served.device.dma.write(iovas[0], Buffer.from([done & 0xff]));
      await Promise.all(iovas.map((iova) => client.dmaUnmap(iova, BigInt(PAGE))));
    }
  };
  await cycle(WARM_UP); // JIT, and the heap's working size
  const fds = openFdCount();
  const heap: number[] = [];
  for (let i = 0; i < SAMPLES; i++) {
    await cycle(SAMPLE_EVERY);
    gc();
    heap.push(process.memoryUsage().heapUsed);
    expect(openFdCount()).toBe(fds);
  }
  const perCycle = bytesPerStep(heap) / SAMPLE_EVERY;
  console.log(`dma-stress: live heap ${heap.map((b) => (b / 2 ** 20).toFixed(2)).join(' ')} MiB; ${perCycle.toFixed(1)} bytes a cycle`);
  expect(served.device.dma.count).toBe(0);
  expect(perCycle).toBeLessThan(MAX_HEAP_BYTES_PER_CYCLE);
  ram.close();
}, 120_000);
