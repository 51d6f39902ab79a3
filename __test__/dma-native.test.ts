/**
 * DMA_MAP and DMA_UNMAP answered by the connection's reader from the native
 * window table, without entering JS: what device code sees of them, in what
 * order, the errnos bad ones get (the same as through JS), and what they
 * leave behind.
 */
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, test } from 'vitest';
import { Command, DmaAccessError, Errno, GuestMemory, type VfioUserClient } from '../ts/index.js';
import { setMessageObserver } from '../ts/channel.js';
import { openFdCount, serve, until, type Served } from './helpers.js';
import { DmaTestDevice, PAGE } from './dma-device.js';

let served: Served<DmaTestDevice>;
const memories: GuestMemory[] = [];
afterEach(async () => {
  setMessageObserver(undefined);
  await served?.close();
  served?.device.bar.close();
  memories.splice(0).forEach((m) => m.close());
});

function memory(size: number, name?: string): GuestMemory {
  const m = new GuestMemory(size, { name });
  memories.push(m);
  return m;
}

function nativeDma(): number {
  return served.server.session!.dmaAnsweredNatively;
}

/** Rings the device's first register with a 64-bit guest address. */
function ring(client: VfioUserClient, iova: bigint): Promise<void> {
  const doorbell = Buffer.alloc(8);
  doorbell.writeBigUInt64LE(iova);
  return client.regionWrite(0, 0n, doorbell);
}

function request(client: VfioUserClient, command: number, payload: Buffer, fds?: number[]): Promise<unknown> {
  return (client as unknown as { request(c: number, p: Buffer, f?: number[]): Promise<unknown> }).request(command, payload, fds);
}

const u32 = (n: number) => Buffer.from(new Uint32Array([n]).buffer);
const u64 = (n: bigint) => Buffer.from(new BigUint64Array([n]).buffer);
const mapPayload = (flags: number, offset: bigint, iova: bigint, size: bigint, argsz = 32) =>
  Buffer.concat([u32(argsz), u32(flags), u64(offset), u64(iova), u64(size)]);
const unmapPayload = (flags: number, iova: bigint, size: bigint, argsz = 24) => Buffer.concat([u32(argsz), u32(flags), u64(iova), u64(size)]);

describe('DMA_MAP and DMA_UNMAP in the native reader', () => {
  test('are answered without entering JS, and device code sees the windows', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const ram = memory(4 * PAGE);
    ram.write(PAGE, Buffer.from('guest'));
    await client.dmaMap({ iova: 0x10000n, memory: ram });
    await client.dmaMap({ iova: 0x20000n, memory: ram, size: PAGE, shareFd: false });
    expect(nativeDma()).toBe(2);
    const dma = served.device.dma;
    expect(dma.read(0x11000n, 5).toString()).toBe('guest');
    expect(dma.list().map((w) => [w.iova, w.size, w.mapping !== undefined])).toEqual([[0x10000n, 0x4000n, true], [0x20000n, 0x1000n, false]]);
    await client.dmaUnmap(0x10000n, 0x4000n);
    await client.dmaUnmapAll();
    expect(nativeDma()).toBe(4);
    expect(dma.count).toBe(0);
  });

  test('a region write sent right behind a DMA_MAP reaches the window; one behind its DMA_UNMAP finds none', async () => {
    served = await serve(new DmaTestDevice());
    const seen: (string | number)[] = [];
    served.device.onWrite = (_offset, data, dma) => {
      const at = data.readBigUInt64LE(0);
      try {
        seen.push(dma.read(at, 5).toString());
        dma.write(at + 8n, Buffer.from('done'));
      } catch (error) {
        seen.push((error as DmaAccessError).errno);
      }
    };
    const client = await served.client();
    const ram = memory(2 * PAGE);
    ram.write(0x100, Buffer.from('first'));
    // Neither waits for the other's reply: both are on the wire before the server reads either.
    const mapped = client.dmaMap({ iova: 0x40000n, memory: ram });
    const rung = ring(client, 0x40100n);
    const unmapped = client.dmaUnmap(0x40000n, BigInt(2 * PAGE));
    const rungAgain = ring(client, 0x40100n);
    await Promise.all([mapped, rung, unmapped, rungAgain]);
    expect(seen).toEqual(['first', Errno.EFAULT]);
    expect(ram.read(0x108, 4).toString()).toBe('done');
    expect(nativeDma()).toBe(2);
  });

  test('a DMA_UNMAP behind a handler still running waits for it: the handler keeps its window', async () => {
    served = await serve(new DmaTestDevice());
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const seen: string[] = [];
    served.device.onWrite = async (_offset, data, dma) => {
      await held;
      seen.push(dma.read(data.readBigUInt64LE(0), 5).toString());
    };
    const client = await served.client();
    const ram = memory(PAGE);
    ram.write(0, Buffer.from('still'));
    await client.dmaMap({ iova: 0x40000n, memory: ram });
    const rung = ring(client, 0x40000n);
    const unmapped = client.dmaUnmap(0x40000n, BigInt(PAGE));
    await until(() => served.server.session!.requestsWaiting === 1);
    release();
    await Promise.all([rung, unmapped]);
    expect(seen).toEqual(['still']);
    expect(served.device.dma.count).toBe(0);
    // The map went natively; the unmap waited in line in JS.
    expect(nativeDma()).toBe(1);
  });

  test('device code takes what changed in one batch, without the windows that came and went meanwhile', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const ram = memory(64 * PAGE);
    const dma = served.device.dma;
    const batches: string[][] = [];
    const take = dma.table.takeChanges.bind(dma.table);
    dma.table.takeChanges = () => {
      const changes = take();
      batches.push(changes.map((c) => `${c.kind} ${c.iova?.toString(16)}`));
      return changes;
    };
    const iova = (i: number) => BigInt(0x100000 + i * PAGE);
    await client.dmaMap({ iova: iova(63), memory: ram, offset: 63 * PAGE, size: PAGE });
    expect(dma.count).toBe(1);
    await Promise.all(Array.from({ length: 8 }, (_, i) => client.dmaMap({ iova: iova(i), memory: ram, offset: i * PAGE, size: PAGE })));
    await Promise.all([0, 1, 2, 3].map((i) => client.dmaUnmap(iova(i), BigInt(PAGE))));
    await client.dmaUnmap(iova(63), BigInt(PAGE));
    expect(nativeDma()).toBe(14);
    expect(batches).toEqual([['map 13f000']]);
    // One lookup, one batch: the windows still mapped, and the one device code had seen go.
    expect(dma.list().map((w) => w.iova)).toEqual([iova(4), iova(5), iova(6), iova(7)]);
    expect(dma.count).toBe(4);
    expect(batches).toEqual([['map 13f000'], ['map 104000', 'map 105000', 'map 106000', 'map 107000', 'unmap 13f000']]);
  });

  test('an unmap detaches the window’s views before its reply, even when device code never looked since', async () => {
    served = await serve(new DmaTestDevice());
    const client = await served.client();
    const ram = memory(PAGE);
    await client.dmaMap({ iova: 0x40000n, memory: ram });
    const view = served.device.dma.view(0x40000n, PAGE);
    const mapping = served.device.dma.find(0x40000n, 1)!.mapping!;
    view[0] = 7;
    expect(ram.read(0, 1)[0]).toBe(7);
    await client.dmaUnmap(0x40000n, BigInt(PAGE));
    expect(view.byteLength).toBe(0);
    expect(mapping.mapped).toBe(false);
    expect(nativeDma()).toBe(2);
  });

  // Each case: the message, its fds, the errno. Run natively and, with a message observer set
  // (which sends DMA_MAP/UNMAP through JS so they can be seen), through JS: the same errnos.
  const ram = () => memory(2 * PAGE);
  const cases: [string, number, (fd: number) => [Buffer, number[]], number][] = [
    ['a DMA_MAP shorter than its struct', Command.DMA_MAP, (fd) => [mapPayload(3, 0n, 0x1000n, 0x1000n).subarray(0, 31), [fd]], Errno.EINVAL],
    ['a DMA_MAP whose argsz is below its struct', Command.DMA_MAP, (fd) => [mapPayload(3, 0n, 0x1000n, 0x1000n, 31), [fd]], Errno.EINVAL],
    ['a DMA_MAP with two fds', Command.DMA_MAP, (fd) => [mapPayload(3, 0n, 0x1000n, 0x1000n), [fd, fd]], Errno.EINVAL],
    ['a FILE_IO map', Command.DMA_MAP, (fd) => [mapPayload(3 | 8, 0n, 0x1000n, 0x1000n), [fd]], Errno.ENOTSUP],
    ['unknown map flags', Command.DMA_MAP, (fd) => [mapPayload(3 | 0x100, 0n, 0x1000n, 0x1000n), [fd]], Errno.EINVAL],
    ['MMAP without an fd', Command.DMA_MAP, () => [mapPayload(3 | 4, 0n, 0x1000n, 0x1000n), []], Errno.EINVAL],
    ['a window of size 0', Command.DMA_MAP, (fd) => [mapPayload(3, 0n, 0x1000n, 0n), [fd]], Errno.EINVAL],
    ['an unaligned window', Command.DMA_MAP, (fd) => [mapPayload(3, 0n, 0x1800n, 0x1000n), [fd]], Errno.EINVAL],
    ['a window past the end of the file', Command.DMA_MAP, (fd) => [mapPayload(3, PAGE_N, 0x1000n, 2n * PAGE_N), [fd]], Errno.EINVAL],
    ['a window overlapping another', Command.DMA_MAP, (fd) => [mapPayload(3, 0n, 0x80000n, 0x1000n), [fd]], Errno.EEXIST],
    ['an unmap of part of a window', Command.DMA_UNMAP, () => [unmapPayload(0, 0x80000n, 0x1000n), []], Errno.ENOENT],
    ['an unmap shorter than its struct', Command.DMA_UNMAP, () => [unmapPayload(0, 0x80000n, 0x2000n).subarray(0, 23), []], Errno.EINVAL],
    ['a legacy dirty-bitmap unmap', Command.DMA_UNMAP, () => [Buffer.concat([unmapPayload(1, 0x80000n, 0x2000n, 40), u64(4096n), u64(8n)]), []], Errno.ENOTSUP],
    ['UNMAP_ALL with an address', Command.DMA_UNMAP, () => [unmapPayload(2, 0x80000n, 0n), []], Errno.EINVAL],
  ];

  for (const path of ['native', 'JS'] as const) {
    test(`bad maps and unmaps get the protocol's errnos (${path}), close their fds and change nothing`, async () => {
      if (path === 'JS') setMessageObserver(() => {});
      served = await serve(new DmaTestDevice());
      const client = await served.client();
      const memory = ram();
      await client.dmaMap({ iova: 0x80000n, memory });
      const fds = openFdCount();
      for (const [what, command, make, errno] of cases) {
        const [payload, sent] = make(memory.fd);
        await expect(request(client, command, payload, sent), what).rejects.toMatchObject({ errno, command });
      }
      expect(openFdCount()).toBe(fds);
      expect(served.device.dma.list().map((w) => [w.iova, w.size])).toEqual([[0x80000n, 0x2000n]]);
      expect(nativeDma()).toBe(path === 'native' ? cases.length + 1 : 0);
    });
  }

  test('map/unmap cycles device code never looks at leave no fd, no mapping, and the windows a new client finds empty', async () => {
    served = await serve(new DmaTestDevice());
    const name = `dma-native-${process.pid}`;
    const mappings = () => readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.includes(name)).length;
    const ram = memory(16 * PAGE, name);
    const [fds, maps] = [openFdCount(), mappings()];
    const client = await served.client();
    for (let round = 0; round < 200; round++) {
      const iovas = Array.from({ length: 16 }, (_, i) => BigInt(0x100000 + i * PAGE));
      await Promise.all(iovas.map((iova, i) => client.dmaMap({ iova, memory: ram, offset: i * PAGE, size: PAGE })));
      await Promise.all(iovas.map((iova) => client.dmaUnmap(iova, BigInt(PAGE))));
    }
    expect(nativeDma()).toBe(200 * 32);
    expect(mappings()).toBe(maps);
    // Windows left mapped when the client goes are unmapped with its session.
    for (let i = 0; i < 4; i++) await client.dmaMap({ iova: BigInt(0x100000 + i * PAGE), memory: ram, offset: i * PAGE, size: PAGE });
    expect(mappings()).toBe(maps + 4);
    client.close();
    await until(() => served.server.session === undefined);
    expect([openFdCount(), mappings()]).toEqual([fds, maps]);
    const next = await served.client();
    await next.dmaMap({ iova: 0x100000n, memory: ram, size: PAGE });
    expect(served.device.dma.list().map((w) => w.iova)).toEqual([0x100000n]);
  });
});

const PAGE_N = BigInt(PAGE);
