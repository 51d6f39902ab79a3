import { afterEach, describe, expect, test } from 'vitest';
import { Command, Errno, GuestMemory, PciDevice, Region } from '../ts/index.js';
import { native } from '../ts/native.js';
import { openFdCount, serve, until, type Served } from './helpers.js';

let served: Served<PciDevice>;
const memories: GuestMemory[] = [];
afterEach(async () => {
  await served?.close();
  memories.splice(0).forEach((m) => m.close());
});

function memory(size: number): GuestMemory {
  const m = new GuestMemory(size);
  memories.push(m);
  return m;
}

describe('DMA_MAP and DMA_UNMAP', () => {
  test('the server maps the client’s memfd and sees guest memory by IOVA', async () => {
    served = await serve();
    const client = await served.client();
    const ram = memory(1 << 20);
    ram.write(0x2000, Buffer.from('hello guest'));
    await client.dmaMap({ iova: 0x100000n, memory: ram });
    const window = served.device.dma.find(0x102000n, 11)!;
    expect(window.iova).toBe(0x100000n);
    expect(window.mapping!.read(0x2000, 11).toString()).toBe('hello guest');
    window.mapping!.write(0x3000, Buffer.from('from device'));
    expect(ram.read(0x3000, 11).toString()).toBe('from device');
    await client.dmaUnmap(0x100000n, 1n << 20n);
    expect(served.device.dma.count).toBe(0);
    expect(window.mapping!.mapped).toBe(false);
  });

  test('unmap must match exactly; overlaps are EEXIST; exact repeats are accepted', async () => {
    served = await serve();
    const client = await served.client();
    const ram = memory(64 << 10);
    await client.dmaMap({ iova: 0x10000n, memory: ram, size: 32 << 10 });
    await client.dmaMap({ iova: 0x10000n, memory: ram, size: 32 << 10 });
    expect(served.device.dma.count).toBe(1);
    await expect(client.dmaMap({ iova: 0x14000n, memory: ram, offset: 4096, size: 16 << 10 }))
      .rejects.toMatchObject({ errno: Errno.EEXIST, command: Command.DMA_MAP });
    await expect(client.dmaUnmap(0x10000n, 4096n)).rejects.toMatchObject({ errno: Errno.ENOENT, command: Command.DMA_UNMAP });
    await expect(client.dmaUnmap(0x90000n, 4096n)).rejects.toMatchObject({ errno: Errno.ENOENT });
    await client.dmaMap({ iova: 0x20000n, memory: ram, offset: 32 << 10, size: 32 << 10 });
    await client.dmaUnmapAll();
    expect(served.device.dma.count).toBe(0);
  });

  test('the same range backed by another file is not a repeat: EEXIST, and the first mapping stays', async () => {
    served = await serve();
    const client = await served.client();
    const first = memory(8192);
    const second = memory(8192);
    first.write(0, Buffer.from('first'));
    second.write(0, Buffer.from('other'));
    await client.dmaMap({ iova: 0x40000n, memory: first });
    await expect(client.dmaMap({ iova: 0x40000n, memory: second })).rejects.toMatchObject({ errno: Errno.EEXIST, command: Command.DMA_MAP });
    expect(served.device.dma.read(0x40000n, 5).toString()).toBe('first');
  });

  test('bad ranges are refused with EINVAL: size 0, wrap-around, unaligned, past the file', async () => {
    served = await serve();
    const client = await served.client();
    const ram = memory(8192);
    const send = (address: bigint, size: bigint, offset = 0n) => (client as any).request(Command.DMA_MAP,
      Buffer.concat([u32(32), u32(3), u64(offset), u64(address), u64(size)]), [ram.fd]);
    await expect(send(0x1000n, 0n)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(send(0xfffffffffffff000n, 0x2000n)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(send(0x1001n, 0x1000n)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(send(0x1000n, 0x4000n)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(send(0x1000n, 0x1000n, 0x2000n)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(served.device.dma.count).toBe(0);
  });

  test('a window without an fd that wraps past 2^64 is EINVAL; one ending at 2^64 is kept', async () => {
    served = await serve();
    const client = await served.client();
    const send = (address: bigint, size: bigint) => (client as any).request(Command.DMA_MAP,
      Buffer.concat([u32(32), u32(3), u64(0n), u64(address), u64(size)]));
    await expect(send(0xfffffffffffff000n, 0x2000n)).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.DMA_MAP });
    await expect(send(0x8000000000000000n, 0x8000000000001000n)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(served.device.dma.count).toBe(0);
    await send(0xfffffffffffff000n, 0x1000n);
    expect(served.device.dma.find(0xffffffffffffffffn, 1)?.end).toBe(1n << 64n);
  });

  test('maps without an fd are kept as message-based windows', async () => {
    served = await serve();
    const client = await served.client();
    const ram = memory(8192);
    await client.dmaMap({ iova: 0x4000n, memory: ram, shareFd: false });
    const w = served.device.dma.find(0x4000n, 1)!;
    expect(w.mapping).toBeUndefined();
    expect(w.size).toBe(8192n);
  });

  test('a client that leaves takes its maps with it, and no fd leaks', async () => {
    served = await serve();
    const before = openFdCount();
    const client = await served.client();
    const ram = memory(1 << 16);
    for (let i = 0; i < 8; i++) await client.dmaMap({ iova: BigInt(i) << 20n, memory: ram, size: 4096, offset: i * 4096 });
    expect(served.device.dma.count).toBe(8);
    client.close();
    await until(() => served.server.session === undefined);
    // The device state survives; guest memory does not.
    expect(() => served.device.dma).toThrow(/no client/);
    ram.close();
    memories.splice(0);
    expect(openFdCount()).toBe(before);
  });

  test('DMA_UNMAP with the window\'s fd attached, as SPDK sends it, is accepted and the fd closed', async () => {
    served = await serve();
    const client = await served.client();
    const ram = memory(8192);
    const before = openFdCount();
    await client.dmaMap({ iova: 0x4000n, memory: ram });
    const reply = await (client as any).request(Command.DMA_UNMAP, Buffer.concat([u32(24), u32(0), u64(0x4000n), u64(8192n)]), [ram.fd]);
    expect(reply.header.error).toBe(0);
    expect(served.device.dma.count).toBe(0);
    expect(openFdCount()).toBe(before);
  });

  test('fds where none belong are refused and closed', async () => {
    served = await serve();
    const client = await served.client();
    const before = openFdCount();
    const ev = native.eventfdCreate();
    await expect((client as any).request(Command.DEVICE_GET_INFO, Buffer.from('10000000000000000000000000000000', 'hex'), [ev]))
      .rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect((client as any).request(Command.DMA_MAP, Buffer.concat([u32(32), u32(3), u64(0n), u64(0x1000n), u64(0x1000n)]), [ev, ev]))
      .rejects.toMatchObject({ errno: Errno.EINVAL });
    native.closeFd(ev);
    expect(openFdCount()).toBe(before);
    expect((await client.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).toBe(0x494f);
  });
});

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
}
function u64(n: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(n);
  return b;
}
