/**
 * Malformed input from a peer: the right errno reply, or a clean disconnect
 * when the stream cannot be trusted; never a crash, never a leaked fd, and
 * the device state intact for the next client.
 */
import { afterEach, describe, expect, test } from 'vitest';
import { once } from 'node:events';
import { Command, commandName, ConnectionClosedError, Errno, PciDevice, PeerProtocolError, Region, VfioUserClient } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { native } from '../ts/native.js';
import { Channel } from '../ts/channel.js';
import { closedBy, nextMessage, openFdCount, qemuVersion, rawConnect, rawMessage, serve, until, type Served } from './helpers.js';

let served: Served;
afterEach(async () => served?.close());

async function negotiated() {
  const s = await rawConnect(served.path);
  s.write(qemuVersion());
  await nextMessage(s);
  return s;
}

const errorOf = (reply: Buffer) => {
  const h = protocol.decodeHeader(reply);
  expect(h.flags).toBe(0x21);
  expect(reply.length).toBe(16);
  return h.error;
};

describe('malformed messages', () => {
  test('a size below the header is fatal: the server disconnects', async () => {
    served = await serve();
    const s = await negotiated();
    s.write(rawMessage({ command: Command.DEVICE_GET_INFO, size: 8 }));
    await closedBy(s);
  });

  test('a size beyond the frame limit is fatal', async () => {
    served = await serve();
    const s = await negotiated();
    s.write(rawMessage({ command: Command.REGION_WRITE, size: 64 << 20 }));
    await closedBy(s);
  });

  test('a message that ends mid-body leaves the server serving the next client', async () => {
    served = await serve();
    served.device.setInputs(0x1234);
    const s = await negotiated();
    s.write(rawMessage({ command: Command.REGION_WRITE, size: 64 }).subarray(0, 20));
    s.end();
    await closedBy(s);
    const client = await served.client();
    expect((await client.regionRead(Region.BAR2, 1n, 1))[0]).toBe(0x34);
  });

  test('unknown and removed commands get ENOSYS; server-to-client commands too', async () => {
    served = await serve();
    const s = await negotiated();
    for (const command of [14, 99, Command.DMA_READ, Command.DMA_WRITE]) {
      s.write(rawMessage({ msgId: command, command }, Buffer.alloc(16)));
      expect(errorOf(await nextMessage(s))).toBe(Errno.ENOSYS);
    }
  });

  test('a body that disagrees with its count is EINVAL', async () => {
    served = await serve();
    const s = await negotiated();
    const body = Buffer.alloc(16 + 2);
    body.writeUInt32LE(Region.BAR2, 8);
    body.writeUInt32LE(4, 12); // says 4 bytes, carries 2
    s.write(rawMessage({ command: Command.REGION_WRITE }, body));
    expect(errorOf(await nextMessage(s))).toBe(Errno.EINVAL);
    s.write(rawMessage({ command: Command.DEVICE_GET_INFO }, Buffer.alloc(4)));
    expect(errorOf(await nextMessage(s))).toBe(Errno.EINVAL);
  });

  test('argsz below the fixed part of its request is EINVAL on every command that carries one', async () => {
    served = await serve();
    const s = await negotiated();
    const withArgsz = (argsz: number, body: Buffer) => (body.writeUInt32LE(argsz, 0), body);
    const requests: [number, Buffer][] = [
      [Command.DMA_MAP, withArgsz(31, Buffer.alloc(32))],
      [Command.DMA_UNMAP, withArgsz(0, Buffer.alloc(24))],
      [Command.DEVICE_GET_INFO, withArgsz(15, Buffer.alloc(16))],
      [Command.DEVICE_GET_REGION_INFO, withArgsz(31, Buffer.alloc(32))],
      [Command.DEVICE_GET_REGION_IO_FDS, withArgsz(8, Buffer.alloc(16))],
      [Command.DEVICE_GET_IRQ_INFO, withArgsz(15, Buffer.alloc(16))],
      // A well-formed disable-all of INTx but for its argsz.
      [Command.DEVICE_SET_IRQS, withArgsz(4, Buffer.from('0000000021000000000000000000000000000000', 'hex'))],
      [Command.DEVICE_FEATURE, withArgsz(4, Buffer.from('0000000001000400', 'hex'))], // PROBE of migration
      [Command.MIG_DATA_READ, withArgsz(7, Buffer.alloc(8))],
      [Command.MIG_DATA_WRITE, withArgsz(8, Buffer.from('00000000010000007f', 'hex'))],
    ];
    for (const [command, body] of requests) {
      s.write(rawMessage({ msgId: command, command }, body));
      const reply = await nextMessage(s);
      expect([commandName(command), errorOf(reply)]).toEqual([commandName(command), Errno.EINVAL]);
    }
  });

  test('a message of unknown type is fatal; a stray reply is ignored', async () => {
    served = await serve();
    const s = await negotiated();
    s.write(rawMessage({ msgId: 9, command: Command.DEVICE_GET_INFO, flags: 1 }, Buffer.alloc(16)));
    s.write(rawMessage({ msgId: 10, command: Command.DEVICE_GET_INFO }, Buffer.from('10000000000000000000000000000000', 'hex')));
    const reply = protocol.decodeHeader(await nextMessage(s));
    expect(reply).toMatchObject({ msgId: 10, flags: 1 });
    s.write(rawMessage({ command: Command.DEVICE_GET_INFO, flags: 3 }, Buffer.alloc(16)));
    await closedBy(s);
  });

  test('posted messages that fail get no reply, and the stream stays in step', async () => {
    served = await serve();
    const s = await negotiated();
    s.write(rawMessage({ msgId: 1, command: Command.REGION_WRITE, flags: 0x10 }, Buffer.alloc(16 + 4, 0xff)));
    s.write(rawMessage({ msgId: 2, command: Command.DEVICE_GET_INFO }, Buffer.from('10000000000000000000000000000000', 'hex')));
    expect(protocol.decodeHeader(await nextMessage(s))).toMatchObject({ msgId: 2, flags: 1 });
  });

  test('a header split across writes and bodies trickling in are reassembled', async () => {
    served = await serve();
    const s = await negotiated();
    const msg = rawMessage({ msgId: 5, command: Command.REGION_READ }, Buffer.from('000000000000000007000000040000', 'hex').subarray(0, 15));
    const whole = Buffer.concat([msg, Buffer.from([0])]);
    whole.writeUInt32LE(32, 4);
    for (const byte of whole) {
      s.write(Buffer.from([byte]));
      await new Promise((r) => setImmediate(r));
    }
    const reply = await nextMessage(s);
    expect(reply.readUInt32LE(32)).toBe(0x0dc8494f);
  });
});

describe('a flooding peer', () => {
  /** A device whose BAR2 reads wait for `release()`; BAR0 is plain memory. */
  function stallingDevice() {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const device = new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      bars: { 0: { kind: 'memory', size: 1 << 20 }, 2: { kind: 'io', size: 4, read: async () => { await gate; return 0; } } },
    });
    return { device, release };
  }

  test('more than 64 MiB queued behind a pending handler ends the session, not the server', async () => {
    const { device, release } = stallingDevice();
    served = await serve(device) as unknown as Served;
    const why = new Promise<Error | undefined>((r) => served!.server.once('disconnect', (_session, error) => r(error)));
    const s = await negotiated();
    s.write(rawMessage({ command: Command.REGION_READ }, Buffer.from('000000000000000002000000' + '01000000', 'hex'))); // BAR2 stalls
    // Posted 1 MiB REGION_WRITEs, written as fast as the server reads them (a raw socket has no send cap of its own).
    const write = rawMessage({ command: Command.REGION_WRITE, flags: 0x10 }, Buffer.concat([protocol.encodeRegionWriteRequest({ region: Region.BAR0, offset: 0n }, Buffer.alloc((1 << 20) - 16, 7))]));
    s.on('error', () => {}); // the server may reset a socket it cut off with data unread
    const closed = closedBy(s, 20_000);
    let sent = 0;
    const pump = () => {
      while (!s.destroyed && sent < 100 && s.write(write)) sent++;
      if (!s.destroyed && sent < 100) s.once('drain', pump);
    };
    pump();
    await closed;
    // The cause: the queue behind the pending handler, not a framing error or anything else.
    expect((await why)?.message).toMatch(/queued more than 67108864 bytes behind a pending handler/);
    release();
    const next = await served.client();
    expect((await next.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).toBe(1);
  });

  test('endless empty messages behind a pending handler end the session too', async () => {
    const { device, release } = stallingDevice();
    served = await serve(device) as unknown as Served;
    const s = await negotiated();
    const stall = Buffer.from('000000000000000002000000' + '01000000', 'hex'); // REGION_READ BAR2, 1 byte
    s.write(rawMessage({ command: Command.REGION_READ }, stall));
    // 16-byte posted DEVICE_RESETs: no payload at all, yet each one waits in memory.
    const empties = Buffer.concat(Array.from({ length: 4096 }, () => rawMessage({ command: Command.DEVICE_RESET, flags: 0x10 })));
    s.on('error', () => {}); // the server may reset a socket it cut off with data unread
    const closed = closedBy(s, 20_000);
    let sent = 0;
    const pump = () => {
      while (!s.destroyed && sent < 1 << 20 && s.write(empties)) sent += 4096;
      if (!s.destroyed && sent < 1 << 20) s.once('drain', pump);
    };
    pump();
    await closed;
    // Far fewer than a million: the cap, not the pump's end, closed it.
    expect(sent).toBeLessThan(1 << 20);
    release();
    const next = await served.client();
    expect((await next.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).toBe(1);
  });

  test('fds piling up behind a pending handler end the session, and every one is closed', async () => {
    const { device, release } = stallingDevice();
    served = await serve(device) as unknown as Served;
    const before = openFdCount();
    const channel = new Channel(native.connectUnix(served.path), { side: 'client', onCommand: () => {}, onClose: () => {} });
    await channel.request(Command.VERSION, Buffer.from([0, 0, 0, 0]));
    const stalled = channel.request(Command.REGION_READ, Buffer.from('000000000000000002000000' + '01000000', 'hex')).catch((e: Error) => e);
    const ev = native.eventfdCreate();
    const map = Buffer.alloc(32);
    map.writeUInt32LE(32, 0);
    map.writeUInt32LE(3, 4); // READ | WRITE
    map.writeBigUInt64LE(4096n, 24);
    // 16 fds a message, 4 096 messages: 65 536 fds would wait in the server without a bound.
    const replies = [];
    for (let i = 0; i < 4096 && !channel.closed; i++) {
      replies.push(channel.request(Command.DMA_MAP, map, new Array(16).fill(ev)).catch((e: Error) => e));
      if (i % 64 === 63) await new Promise((r) => setImmediate(r));
    }
    expect(await stalled).toBeInstanceOf(ConnectionClosedError);
    expect(replies.length).toBeLessThan(4096);
    channel.close();
    native.closeFd(ev);
    release();
    await until(() => served.server.session === undefined);
    expect(openFdCount()).toBe(before);
  });
});

describe('fds from a misbehaving peer', () => {
  test('too many fds, or fds on the wrong command, are refused and none leak', async () => {
    served = await serve();
    const before = openFdCount();
    const replies: Buffer[] = [];
    const channel = new Channel(native.connectUnix(served.path), { side: 'client', onCommand: () => {}, onClose: () => {} });
    await channel.request(Command.VERSION, Buffer.from([0, 0, 0, 0]));
    const ev = native.eventfdCreate();
    const set = Buffer.alloc(20);
    set.writeUInt32LE(20, 0);
    set.writeUInt32LE(0x24, 4); // EVENTFD | TRIGGER
    set.writeUInt32LE(3, 8); // ERR
    set.writeUInt32LE(1, 16);
    for (const fds of [new Array(70).fill(ev), [ev, ev], new Array(17).fill(ev)]) {
      await channel.request(Command.DEVICE_SET_IRQS, set, fds).then(
        () => replies.push(Buffer.from('ok')),
        (e) => replies.push(Buffer.from(String(e.errno))),
      );
    }
    expect(replies.map(String)).toEqual([String(Errno.EINVAL), String(Errno.EINVAL), String(Errno.EINVAL)]);
    channel.close();
    native.closeFd(ev);
    await until(() => served.server.session === undefined);
    expect(openFdCount()).toBe(before);
  });

  test("a server reply with more fds than the client's max_msg_fds ends the connection; every fd is closed", async () => {
    const before = openFdCount();
    const [serverFd, clientFd] = native.socketPair();
    const ev = native.eventfdCreate();
    const server: Channel = new Channel(serverFd, {
      side: 'server',
      onCommand: (m) => {
        if (m.header.command === Command.VERSION) return server.reply(m.header, protocol.encodeVersion({ major: 0, minor: 0, capabilities: {} }));
        // 17 entries, an fd each: one more than the client announced.
        const entries = Array.from({ length: 17 }, (_, i) => ({ offset: BigInt(4 * i), size: 4n, fdIndex: i, type: 0, flags: 0, datamatch: 0n }));
        server.reply(m.header, protocol.encodeRegionIoFdsReply({ index: 0, entries }, 4096).payload, new Array(17).fill(ev));
      },
      onClose: () => {},
    });
    const client = new VfioUserClient(clientFd);
    await client.negotiate();
    const closed = once(client, 'close');
    await expect(client.getRegionIoFds(0)).rejects.toThrow(PeerProtocolError);
    expect(await closed).toEqual([expect.any(PeerProtocolError)]);
    server.close();
    native.closeFd(ev);
    expect(openFdCount()).toBe(before);
  });
});
