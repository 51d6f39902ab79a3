import { afterEach, describe, expect, test } from 'vitest';
import { Channel } from '../ts/channel.js';
import { Command, connect, Errno, EventfdIrq, GuestMemory, ProtocolError, UsageError, VfioUserClient } from '../ts/index.js';
import { closeFds, native } from '../ts/native.js';
import { decodeVersion, encodeVersion as encode } from '../ts/protocol/index.js';
import { openFdCount, serve, until, type Served } from './helpers.js';
import { DmaTestDevice, PAGE } from './dma-device.js';

let served: Served<DmaTestDevice>;
const memories: GuestMemory[] = [];
const clients: VfioUserClient[] = [];
afterEach(async () => {
  clients.splice(0).forEach((c) => c.close());
  await served?.close();
  served?.device.bar.close();
  memories.splice(0).forEach((m) => m.close());
});

function memory(size: number): GuestMemory {
  const m = new GuestMemory(size);
  memories.push(m);
  return m;
}

async function client(options: Parameters<typeof connect>[1] = {}): Promise<VfioUserClient> {
  const c = await connect(served.path, options);
  clients.push(c);
  return c;
}

/** Counts DMA_READ/DMA_WRITE the client serves on each socket. */
function countDma(c: VfioUserClient): { main: number; twin: number } {
  const counts = { main: 0, twin: 0 };
  const wrap = (channel: Channel | undefined, key: 'main' | 'twin') => {
    if (!channel) return;
    const handlers = (channel as any).handlers;
    const onCommand = handlers.onCommand;
    handlers.onCommand = (m: any) => {
      counts[key]++;
      return onCommand(m);
    };
  };
  wrap((c as any).channel, 'main');
  wrap((c as any).twin, 'twin');
  return counts;
}

describe('message-based DMA (maps without an fd)', () => {
  test('the same API reaches the memory through DMA_READ/DMA_WRITE, split at max_data_xfer_size', async () => {
    served = await serve(new DmaTestDevice());
    const c = await client({ maxDataXferSize: 4096 });
    const counts = countDma(c);
    const ram = memory(64 * 1024);
    await c.dmaMap({ iova: 0x100000n, memory: ram, shareFd: false });
    const data = Buffer.from(Array.from({ length: 40000 }, (_, i) => i & 0xff));
    ram.write(100, data);
    const dma = served.device.dma;
    expect(await dma.readAsync(0x100000n + 100n, data.length)).toEqual(data);
    expect(counts.main).toBe(Math.ceil(data.length / 4096));
    await dma.writeAsync(0x100000n + 50000n, data.subarray(0, 9000));
    expect(ram.read(50000, 9000)).toEqual(data.subarray(0, 9000));
    await dma.writeSgAsync([{ iova: 0x100000n, length: 2 }, { iova: 0x10fffen, length: 2 }], Buffer.from([1, 2, 3, 4]));
    expect([...ram.read(0, 2), ...ram.read(0xfffe, 2)]).toEqual([1, 2, 3, 4]);
    // Messages never mark dirty pages: for fd-less windows that is the client's job (§6.10).
    expect(dma.dirtyPages(0x100000n, 64 * 1024)[0]).toBe(0n);
  });

  test('a write and a read far larger than the outgoing queue bound are paced, not cut off', async () => {
    served = await serve(new DmaTestDevice());
    const c = await client();
    const ram = memory(24 * 1024 * 1024); // three times the default 8 MiB bound
    await c.dmaMap({ iova: 0x1000000n, memory: ram, shareFd: false });
    const data = Buffer.alloc(ram.size);
    for (let i = 0; i < data.length; i += 4096) data.writeUInt32LE(i, i);
    const dma = served.device.dma;
    await Promise.all([dma.writeAsync(0x1000000n, data.subarray(0, 16 << 20)), dma.writeAsync(0x2000000n, data.subarray(16 << 20))]);
    expect(ram.read(0, ram.size).equals(data)).toBe(true);
    // Read back: the client's replies are paced the same way.
    expect((await dma.readAsync(0x1000000n, ram.size)).equals(data)).toBe(true);
    expect(served.server.session?.closed).toBe(false);
  });

  test('dma.messages reaches a window mapped with an fd through the client too, which tracks its writes', async () => {
    served = await serve(new DmaTestDevice());
    const c = await client({ maxDataXferSize: 1024 });
    const counts = countDma(c);
    const ram = memory(PAGE);
    await c.dmaMap({ iova: 0x20000n, memory: ram });
    const dma = served.device.dma;
    await dma.messages!.write(0x20000n, Buffer.alloc(PAGE, 'm'));
    expect(ram.read(0, PAGE)).toEqual(Buffer.alloc(PAGE, 'm'));
    ram.write(10, Buffer.from('client side'));
    const back = Buffer.alloc(2048);
    await dma.messages!.read(0x20000n, back);
    expect(back.subarray(10, 21).toString()).toBe('client side');
    expect(counts.main).toBe(PAGE / 1024 + 2);
    expect(dma.dirtyPages(0x20000n, PAGE)[0]).toBe(0n); // written by the client, not the server
  });

  test('an SG copy mixing mapped and message-based windows goes through a bounce buffer', async () => {
    served = await serve(new DmaTestDevice());
    const c = await client();
    const shared = memory(2 * PAGE);
    const remote = memory(2 * PAGE);
    await c.dmaMap({ iova: 0x10000n, memory: shared });
    await c.dmaMap({ iova: 0x12000n, memory: remote, shareFd: false }); // adjacent: one entry spans both
    shared.write(PAGE, Buffer.from('0123456789'));
    const dma = served.device.dma;
    await dma.copySgAsync([{ iova: 0x11ffbn, length: 10 }], [{ iova: 0x11000n, length: 10 }]);
    expect(Buffer.concat([shared.read(2 * PAGE - 5, 5), remote.read(0, 5)]).toString()).toBe('0123456789');
    expect(() => dma.copySg([{ iova: 0x12000n, length: 4 }], [{ iova: 0x11000n, length: 4 }])).toThrow(/async/);
  });

  test('the client’s error replies reach the device as ProtocolError', async () => {
    served = await serve(new DmaTestDevice());
    const c = await client();
    const ram = memory(PAGE);
    await c.dmaMap({ iova: 0x10000n, memory: ram, shareFd: false, writable: false });
    // The server checks the window's flags itself: EPERM, no message sent.
    await expect(served.device.dma.writeAsync(0x10000n, Buffer.from([1]))).rejects.toMatchObject({ errno: Errno.EPERM });
    // Forget the window on the client only: its DMA_READ answer is an error reply.
    (c as any).windows.length = 0;
    await expect(served.device.dma.readAsync(0x10000n, 4)).rejects.toEqual(expect.any(ProtocolError));
    await expect(served.device.dma.readAsync(0x10000n, 4)).rejects.toMatchObject({ errno: Errno.EFAULT, command: Command.DMA_READ });
  });

  for (const twinSocket of [false, true]) {
    test(`a REGION_WRITE handler that awaits DMA does not deadlock (${twinSocket ? 'twin socket' : 'single socket'})`, async () => {
      served = await serve(new DmaTestDevice());
      const c = await client({ twinSocket });
      expect(c.twinSocket).toBe(twinSocket);
      expect(served.server.session!.twinSocket).toBe(twinSocket);
      const counts = countDma(c);
      const ram = memory(16 * PAGE);
      await c.dmaMap({ iova: 0x100000n, memory: ram, shareFd: false });
      ram.write(0, Buffer.from('doorbell payload'));
      const seen: string[] = [];
      served.device.onWrite = async (offset, data, dma) => {
        const bytes = await dma.readAsync(0x100000n, 16); // DMA_READ while REGION_WRITE is pending
        await dma.writeAsync(0x100000n + BigInt(PAGE * (data[0] + 1)), bytes);
        seen.push(`${offset}:${data[0]}`);
      };
      // A posted write queued right behind, then a non-posted one: the hazard of §6.10.
      const first = c.regionWrite(0, 0n, Buffer.from([0]));
      await c.regionWrite(0, 4n, Buffer.from([1]), { posted: true });
      await c.regionWrite(0, 8n, Buffer.from([2]));
      await first;
      expect(seen).toEqual(['0:0', '4:1', '8:2']);
      for (const i of [1, 2, 3]) expect(ram.read(PAGE * i, 16).toString()).toBe('doorbell payload');
      expect(twinSocket ? counts.twin : counts.main).toBe(6);
      expect(twinSocket ? counts.main : counts.twin).toBe(0);
    });
  }

  test('the twin socket closes with the session and leaks no fd', async () => {
    served = await serve(new DmaTestDevice());
    const before = openFdCount();
    const c = await connect(served.path, { twinSocket: true });
    expect(c.twinSocket).toBe(true);
    c.close();
    await until(() => served.server.session === undefined);
    expect(openFdCount()).toBe(before);
  });

  test('a DMA in flight when the client leaves rejects, and the next client is served', async () => {
    served = await serve(new DmaTestDevice());
    const c = await client();
    const ram = memory(PAGE);
    await c.dmaMap({ iova: 0x10000n, memory: ram, shareFd: false });
    (c as any).serve = () => {}; // never answers
    const pending = served.device.dma.readAsync(0x10000n, 4);
    c.close();
    await expect(pending).rejects.toThrow(/closed|lost/);
    const next = await client();
    expect((await next.regionRead(0, 0n, 4)).length).toBe(4);
  });
});

describe('twin socket negotiation, server side', () => {
  test('a client that takes no fds (max_msg_fds 0) is not given the twin socket, which is an fd', async () => {
    served = await serve(new DmaTestDevice());
    const before = openFdCount();
    const channel = new Channel(native.connectUnix(served.path), { side: 'client', onCommand: () => {}, onClose: () => {} });
    const reply = await channel.request(Command.VERSION, encode({ major: 0, minor: 0, capabilities: { maxMsgFds: 0, twinSocket: { supported: true } } }));
    expect(decodeVersion(reply.payload).capabilities.twinSocket).toEqual({ supported: false });
    expect(reply.fds).toEqual([]);
    expect(served.server.session!.twinSocket).toBe(false);
    channel.close();
    await until(() => served.server.session === undefined);
    expect(openFdCount()).toBe(before);
  });
});

describe('a server that takes no fds (max_msg_fds 0)', () => {
  test('gets DMA_MAP without the memfd (it uses DMA_READ/WRITE), and no eventfds', async () => {
    const [serverFd, clientFd] = native.socketPair();
    const fdsSeen: number[] = [];
    const server: Channel = new Channel(serverFd, {
      side: 'server',
      onCommand: (m) => {
        fdsSeen.push(m.fds.length);
        closeFds(m.fds);
        server.reply(m.header, m.header.command === Command.VERSION ? encode({ major: 0, minor: 0, capabilities: { maxMsgFds: 0 } }) : undefined);
      },
      onClose: () => {},
    });
    const c = new VfioUserClient(clientFd);
    clients.push(c);
    await c.negotiate();
    await c.dmaMap({ iova: 0x10000n, memory: memory(PAGE) });
    expect(fdsSeen).toEqual([0, 0]);
    await expect(c.dmaMap({ iova: 0x20000n, memory: memory(PAGE), shareFd: true })).rejects.toThrow(UsageError);
    const irq = new EventfdIrq();
    await expect(c.setIrqs({ index: 4, eventfds: [irq] })).rejects.toThrow(/takes no fds/);
    expect(fdsSeen).toEqual([0, 0]);
    irq.close();
    server.close();
  });
});

describe('twin socket negotiation, client side', () => {
  /** A fake server on a socket pair that answers VERSION with `capabilities` and `fds`. */
  async function negotiateWith(capabilities: object, fds: number[]): Promise<unknown> {
    const [serverFd, clientFd] = native.socketPair();
    const server = new Channel(serverFd, {
      side: 'server',
      onCommand: (m) => {
        server.reply(m.header, encode({ major: 0, minor: 0, capabilities: capabilities as any }), fds);
      },
      onClose: () => {},
    });
    const c = new VfioUserClient(clientFd, { twinSocket: true });
    try {
      await c.negotiate();
      return c;
    } catch (error) {
      return error;
    } finally {
      c.close();
      server.close();
    }
  }

  test('supported with no valid fd_index is inconsistent: the client closes', async () => {
    const before = openFdCount();
    const [a, b] = native.socketPair();
    expect(await negotiateWith({ twinSocket: { supported: true } }, [])).toMatchObject({ errno: Errno.EPROTO });
    expect(await negotiateWith({ twinSocket: { supported: true, fdIndex: 1 } }, [a])).toMatchObject({ errno: Errno.EPROTO });
    expect(await negotiateWith({ twinSocket: { supported: false } }, [a])).toBeInstanceOf(VfioUserClient);
    native.closeFd(a);
    native.closeFd(b);
    expect(openFdCount()).toBe(before);
  });
});

