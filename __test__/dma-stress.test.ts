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

const CYCLES = 100_000;
/** Maps in flight at once, as QEMU sends them in a memory transaction. */
const BATCH = 250;

test(`${CYCLES} DMA_MAP/DMA_UNMAP cycles leave fds and RSS where they were`, async () => {
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
  await cycle(20_000); // warm up: JIT, heap and allocator high-water marks
  gc();
  const fds = openFdCount();
  const rss = process.memoryUsage().rss;
  const started = performance.now();
  await cycle(CYCLES);
  const seconds = (performance.now() - started) / 1000;
  gc();
  const grown = process.memoryUsage().rss - rss;
  console.log(`${CYCLES} map/unmap cycles in ${seconds.toFixed(1)} s; RSS ${(grown / 2 ** 20).toFixed(1)} MiB`);
  expect(served.device.dma.count).toBe(0);
  expect(openFdCount()).toBe(fds);
  expect(grown).toBeLessThan(32 * 2 ** 20);
  ram.close();
}, 60_000);
