/** DMA dirty logging (DMA_LOGGING_START/STOP/REPORT): what the device writes through dma.write, at 4 and 8 KiB pages. */
import { afterEach, describe, expect, test } from 'vitest';
import { Command, Errno, GuestMemory, type VfioUserClient } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { serve, type Served } from './helpers.js';
import { CounterDevice } from './migration-device.js';

const K4 = 4096n;
const BASE = 0x100000n;
const SIZE = 1n << 20n;

let served: Served<CounterDevice> | undefined;
const memories: GuestMemory[] = [];
afterEach(async () => {
  await served?.close();
  served = undefined;
  memories.splice(0).forEach((m) => m.close());
});

async function start(): Promise<{ device: CounterDevice; client: VfioUserClient }> {
  served = await serve(new CounterDevice());
  const client = await served.client();
  const ram = new GuestMemory(Number(SIZE));
  memories.push(ram);
  await client.dmaMap({ iova: BASE, memory: ram });
  return { device: served.device, client };
}

/** The set bits of a report. */
function pages(words: BigUint64Array): number[] {
  const out: number[] = [];
  words.forEach((word, w) => {
    for (let b = 0; b < 64; b++) if ((word >> BigInt(b)) & 1n) out.push(w * 64 + b);
  });
  return out;
}

const einval = { errno: Errno.EINVAL, command: Command.DEVICE_FEATURE };

describe('dirty logging', () => {
  test('the report shows exactly the pages the device wrote, at 4 KiB, and forgets them', async () => {
    const { device, client } = await start();
    device.dma.write(BASE, Buffer.from('before logging')); // not reported
    expect(await client.migration.startDirtyLogging(K4)).toBe(K4);
    device.dma.write(BASE + 0x1000n, Buffer.from('one'));
    device.dma.write(BASE + 0x5ffcn, Buffer.alloc(8)); // crosses from page 5 into 6
    device.dma.write(BASE + 0xa000n, Buffer.alloc(8192)); // pages 10 and 11
    device.dma.read(BASE + 0x20000n, 4096); // reads are not logged
    const report = await client.migration.dirtyReport(BASE, SIZE, K4);
    expect(report.length).toBe(4); // 256 pages
    expect(pages(report)).toEqual([1, 5, 6, 10, 11]);
    expect(pages(await client.migration.dirtyReport(BASE, SIZE, K4))).toEqual([]);
  });

  test('at 8 KiB each reported page ORs its two 4 KiB pages', async () => {
    const { device, client } = await start();
    await client.migration.startDirtyLogging(8192n);
    for (const page of [1n, 5n, 6n, 10n, 11n, 255n]) device.dma.writeU8(BASE + page * K4, 1);
    const report = await client.migration.dirtyReport(BASE, SIZE, 8192n);
    expect(report.length).toBe(2); // 128 pages
    expect(pages(report)).toEqual([0, 2, 3, 5, 127]);
    expect(pages(await client.migration.dirtyReport(BASE, SIZE, 4096n))).toEqual([]);
  });

  test('bits stop at the range; pages outside it stay for a later report; fd-less windows are clean', async () => {
    const { device, client } = await start();
    const plain = new GuestMemory(1 << 16);
    memories.push(plain);
    await client.dmaMap({ iova: 0x400000n, memory: plain, shareFd: false });
    await client.migration.startDirtyLogging(K4);
    device.dma.writeU8(BASE + 2n * K4, 1);
    device.dma.writeU8(BASE + 3n * K4, 1);
    await device.dma.writeAsync(0x400000n, Buffer.from('through DMA_WRITE'));
    expect([...(await client.migration.dirtyReport(BASE, 3n * K4, K4))]).toEqual([0b100n]);
    expect(pages(await client.migration.dirtyReport(BASE + 3n * K4, K4, K4))).toEqual([0]);
    expect(pages(await client.migration.dirtyReport(0x400000n, 1n << 16n, K4))).toEqual([]);
    // A range over unmapped IOVA reports clean too.
    expect(pages(await client.migration.dirtyReport(0x300000n, 0x200000n, K4))).toEqual([]);
  });

  test('ranges: reports must stay inside them', async () => {
    const { device, client } = await start();
    await client.migration.startDirtyLogging(K4, [{ iova: BASE + 0x10000n, length: 0x10000n }, { iova: BASE, length: 0x10000n }]);
    device.dma.writeU8(BASE + 0x10000n, 1);
    expect(pages(await client.migration.dirtyReport(BASE, 0x20000n, K4))).toEqual([16]);
    await expect(client.migration.dirtyReport(BASE, 0x21000n, K4)).rejects.toMatchObject(einval);
  });

  test('refusals: page sizes, alignment, overlaps, a second START, REPORT without START, huge bitmaps', async () => {
    const { client } = await start();
    const m = client.migration;
    await expect(m.dirtyReport(BASE, SIZE, K4)).rejects.toMatchObject(einval);
    for (const size of [0n, 2048n, 12288n]) await expect(m.startDirtyLogging(size), `page size ${size}`).rejects.toMatchObject(einval);
    await expect(m.startDirtyLogging(8192n, [{ iova: BASE + K4, length: 8192n }])).rejects.toMatchObject(einval);
    await expect(m.startDirtyLogging(K4, [{ iova: BASE, length: 0n }])).rejects.toMatchObject(einval);
    await expect(m.startDirtyLogging(K4, [{ iova: BASE, length: 2n * K4 }, { iova: BASE + K4, length: K4 }])).rejects.toMatchObject(einval);
    await m.startDirtyLogging(K4);
    await expect(m.startDirtyLogging(K4)).rejects.toMatchObject({ errno: Errno.EBUSY, command: Command.DEVICE_FEATURE });
    await expect(m.dirtyReport(BASE, SIZE, 6144n)).rejects.toThrow(); // not a power of two: the client's codec refuses
    const report = protocol.encodeDmaLoggingReportRequest({ iova: BASE + 1n, length: SIZE, pageSize: K4 });
    await expect(client.deviceFeature(protocol.DeviceFeatureFlags.GET | protocol.FeatureIndex.DMA_LOGGING_REPORT, report, 4096)).rejects.toMatchObject(einval);
    await expect(m.dirtyReport(0n, 1n << 40n, K4)).rejects.toMatchObject({ errno: Errno.E2BIG, command: Command.DEVICE_FEATURE });
    await m.stopDirtyLogging();
    await expect(m.dirtyReport(BASE, SIZE, K4)).rejects.toMatchObject(einval);
    await m.stopDirtyLogging(); // stopping twice is fine
  });

  test('logging ends with the session', async () => {
    const { client } = await start();
    await client.migration.startDirtyLogging(K4);
    client.close();
    const next = await served!.client();
    await expect(next.migration.dirtyReport(BASE, SIZE, K4)).rejects.toMatchObject(einval);
  });
});
