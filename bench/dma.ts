/**
 * `npm run bench`, part 2: guest memory access, in one process, beside a
 * native baseline measured in the same run.
 *
 *   copy       bulk copies into and out of guest memory (a DMA window mapped
 *              from a memfd) through the library helper (dma.readInto /
 *              dma.write) and through a zero-copy view (TypedArray.set),
 *              against a plain memcpy loop in Rust of the same size between
 *              the same buffers (native.memcpyBaseline). Target: >= 0.9x
 *              for 64 KiB and larger.
 *   map        DMA_MAP + DMA_UNMAP of 10 000 4 KiB windows by our client,
 *              pipelined as QEMU does within a memory transaction (the
 *              vIOMMU case).
 *   messages   DMA_READ throughput for a window mapped without an fd, in
 *              64 KiB messages: one awaited at a time, and pipelined.
 *
 * Figures are medians over BENCH_ROUNDS (default 5) interleaved rounds.
 * Prints a table, then one JSON line. Exit code 1 only if something failed.
 */
import { createServer, GuestMemory, connect, type DmaSpace } from '../ts/index.js';
import { native } from '../ts/native.js';
import { PciIdio16 } from '../examples/gpio.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20];
const TARGET_RATIO = 0.9;
const MAPS = 10_000;
const MESSAGE_CHUNK = 64 << 10;
const MESSAGE_BYTES = 32 << 20;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/** Iterations giving ~64 MiB of traffic per measurement (at least 50). */
const iterationsFor = (size: number) => Math.max(50, Math.floor((64 << 20) / size));

function time(iterations: number, op: () => void): number {
  const start = process.hrtime.bigint();
  for (let i = 0; i < iterations; i++) op();
  return Number(process.hrtime.bigint() - start) / iterations;
}

interface CopyResult { size: number; baselineNs: number; helperInNs: number; helperOutNs: number; viewInNs: number; viewOutNs: number }

function benchCopies(dma: DmaSpace, iova: bigint): CopyResult[] {
  const results: CopyResult[] = [];
  for (const size of SIZES) {
    const heap = Buffer.alloc(size, 1);
    const view = dma.view(iova, size);
    const n = iterationsFor(size);
    const rounds: Omit<CopyResult, 'size'>[] = [];
    for (let r = 0; r < ROUNDS; r++) {
      rounds.push({
        baselineNs: native.memcpyBaseline(heap, view, n),
        helperInNs: time(n, () => dma.write(iova, heap)),
        helperOutNs: time(n, () => dma.readInto(iova, heap)),
        viewInNs: time(n, () => view.set(heap)),
        viewOutNs: time(n, () => heap.set(view)),
      });
    }
    const pick = (k: keyof Omit<CopyResult, 'size'>) => median(rounds.map((x) => x[k]));
    results.push({ size, baselineNs: pick('baselineNs'), helperInNs: pick('helperInNs'), helperOutNs: pick('helperOutNs'), viewInNs: pick('viewInNs'), viewOutNs: pick('viewOutNs') });
  }
  return results;
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vfu-bench-'));
  const path = join(dir, 'dma.sock');
  const device = new PciIdio16();
  const server = createServer(device);
  await server.listen(path);
  const client = await connect(path, { maxDataXferSize: MESSAGE_CHUNK, timeoutMs: 0 });
  const ram = new GuestMemory(64 << 20);
  try {
    // ---- copies ----
    await client.dmaMap({ iova: 0x1_0000_0000n, memory: ram, size: 32 << 20 });
    const copies = benchCopies(device.dma, 0x1_0000_0000n);
    await client.dmaUnmapAll();

    // ---- map/unmap rate ----
    const mapRounds: number[] = [];
    for (let r = 0; r < ROUNDS; r++) {
      const start = performance.now();
      for (let done = 0; done < MAPS; done += 1000) {
        const iovas = Array.from({ length: 1000 }, (_, i) => BigInt(0x2_0000_0000 + (done + i) * 8192));
        await Promise.all(iovas.map((iova, i) => client.dmaMap({ iova, memory: ram, offset: i * 4096, size: 4096 })));
      }
      for (let done = 0; done < MAPS; done += 1000) {
        const iovas = Array.from({ length: 1000 }, (_, i) => BigInt(0x2_0000_0000 + (done + i) * 8192));
        await Promise.all(iovas.map((iova) => client.dmaUnmap(iova, 4096n)));
      }
      mapRounds.push(performance.now() - start);
    }
    const mapMs = median(mapRounds);

    // ---- message-based DMA ----
    await client.dmaMap({ iova: 0x3_0000_0000n, memory: ram, offset: 32 << 20, size: 32 << 20, shareFd: false });
    const target = Buffer.alloc(MESSAGE_CHUNK);
    const serialRounds: number[] = [];
    const pipelinedRounds: number[] = [];
    const big = Buffer.alloc(4 << 20);
    for (let r = 0; r < ROUNDS; r++) {
      let start = performance.now();
      for (let at = 0; at < MESSAGE_BYTES; at += MESSAGE_CHUNK) await device.dma.readIntoAsync(0x3_0000_0000n + BigInt(at % (32 << 20)), target);
      serialRounds.push(MESSAGE_BYTES / 2 ** 20 / ((performance.now() - start) / 1000));
      start = performance.now();
      for (let at = 0; at < MESSAGE_BYTES; at += big.length) await device.dma.readIntoAsync(0x3_0000_0000n + BigInt(at % (32 << 20)), big);
      pipelinedRounds.push(MESSAGE_BYTES / 2 ** 20 / ((performance.now() - start) / 1000));
    }

    // ---- report ----
    const kib = (n: number) => (n >= 1 << 20 ? `${n >> 20} MiB` : `${n >> 10} KiB`);
    const gbps = (size: number, ns: number) => (size / ns).toFixed(2);
    console.log('\nDMA copies (GB/s; ratio = memcpy time / our time, target >= 0.9 from 64 KiB)');
    console.log('size      memcpy  helper-in        helper-out       view-in          view-out');
    for (const c of copies) {
      const cell = (ns: number) => `${gbps(c.size, ns).padStart(6)} (${(c.baselineNs / ns).toFixed(2)}x)`.padEnd(17);
      console.log(`${kib(c.size).padEnd(9)} ${gbps(c.size, c.baselineNs).padStart(6)}  ${cell(c.helperInNs)}${cell(c.helperOutNs)}${cell(c.viewInNs)}${cell(c.viewOutNs)}`);
    }
    console.log(`\nDMA_MAP + DMA_UNMAP of ${MAPS} 4 KiB windows: ${mapMs.toFixed(0)} ms (${((2 * MAPS) / (mapMs / 1000)).toFixed(0)} commands/s)`);
    console.log(`DMA_READ, 64 KiB messages: ${median(serialRounds).toFixed(0)} MiB/s one at a time, ${median(pipelinedRounds).toFixed(0)} MiB/s pipelined (4 MiB reads)`);
    const below = copies.filter((c) => c.size >= 64 << 10 && Math.min(c.helperInNs, c.helperOutNs) > 0 && c.baselineNs / Math.max(c.helperInNs, c.helperOutNs) < TARGET_RATIO);
    console.log(below.length === 0 ? 'helper copies meet the 0.9x target' : `helper copies below 0.9x at: ${below.map((c) => kib(c.size)).join(', ')}`);
    console.log(JSON.stringify({
      bench: 'dma',
      copies: copies.map((c) => ({ ...c, helperInRatio: c.baselineNs / c.helperInNs, helperOutRatio: c.baselineNs / c.helperOutNs, viewInRatio: c.baselineNs / c.viewInNs, viewOutRatio: c.baselineNs / c.viewOutNs })),
      mapUnmap: { maps: MAPS, ms: mapMs, commandsPerSec: (2 * MAPS) / (mapMs / 1000) },
      dmaRead: { chunk: MESSAGE_CHUNK, serialMiBps: median(serialRounds), pipelinedMiBps: median(pipelinedRounds) },
    }));
  } finally {
    client.close();
    ram.close();
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
