import { afterEach, expect, test } from 'vitest';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { GuestMemory } from '../ts/index.js';
import { openFdCount, serve, type Served } from './helpers.js';
import { DmaTestDevice, PAGE } from './dma-device.js';

let served: Served<DmaTestDevice>;
afterEach(async () => {
  await served?.close();
  served?.device.bar.close();
});

setFlagsFromString('--expose-gc');
const gc: () => void = runInNewContext('gc');

/** Maps in flight at once, as QEMU sends them in a memory transaction. */
const BATCH = 250;
const ROUND = 50_000;
const ROUNDS = 3;

// RSS climbs for the first 100-150k cycles as V8's heap and malloc's arenas reach their high-water
// marks, in steps whose timing depends on the machine. A leak grows every round by the same amount;
// so the test asserts that at least one round after warm-up left RSS where it was (< 4 MiB, which a
// leak of 80 bytes per cycle would exceed).
test(`${ROUND * ROUNDS} DMA_MAP/DMA_UNMAP cycles leave fds where they were and RSS levels off`, async () => {
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
  await cycle(ROUND); // warm up: JIT, heap and allocator high-water marks
  gc();
  const fds = openFdCount();
  const growths: number[] = [];
  const started = performance.now();
  for (let round = 0; round < ROUNDS; round++) {
    const rss = process.memoryUsage().rss;
    await cycle(ROUND);
    gc();
    growths.push(process.memoryUsage().rss - rss);
  }
  const seconds = (performance.now() - started) / 1000;
  const mib = growths.map((bytes) => (bytes / 2 ** 20).toFixed(1)).join(', ');
  console.log(`${ROUND * ROUNDS} map/unmap cycles in ${seconds.toFixed(1)} s; RSS growth per ${ROUND}: ${mib} MiB`);
  expect(served.device.dma.count).toBe(0);
  expect(openFdCount()).toBe(fds);
  expect(Math.min(...growths)).toBeLessThan(4 * 2 ** 20);
  ram.close();
}, 120_000);
