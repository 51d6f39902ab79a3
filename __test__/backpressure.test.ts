/**
 * What a client can make the server hold: replies it never reads (bounded,
 * then it is cut off) and fds per message (at most the max_msg_fds the
 * server announced; the rest closed, the message refused).
 */
import { once } from 'node:events';
import { afterEach, describe, expect, test } from 'vitest';
import { Channel } from '../ts/channel.js';
import { native } from '../ts/native.js';
import { IrqIndex, PciDevice, ProtocolError, Region, type ServerSession } from '../ts/index.js';
import {
  Command,
  encodeMessage,
  encodeRegionReadRequest,
  encodeSetIrqsRequest,
  encodeVersion,
  Errno,
  SetIrqsFlags,
} from '../ts/protocol/index.js';
import { SERVER_CAPABILITIES } from '../ts/server/handlers/index.js';
import { openFdCount, rawConnect, serve, type Served } from './helpers.js';
import { base } from './pci-helpers.js';

let served: Served<PciDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served?.device.close();
  served = undefined;
});

const MiB = 1024 * 1024;

describe('replies a client does not read', () => {
  test('a client pipelining 1 MiB REGION_READs without reading is cut off once 8 MiB wait; the server stays small', async () => {
    // A plain-memory BAR: its reads are answered natively, as fast as they arrive.
    served = await serve(new PciDevice({ ...base, bars: { 0: { kind: 'memory', size: MiB } } }));
    const disconnected = once(served.server, 'disconnect') as Promise<[ServerSession, Error?]>;
    const socket = await rawConnect(served.path);
    socket.write(encodeMessage({ msgId: 1, command: Command.VERSION }, encodeVersion({ major: 0, minor: 2, capabilities: {} })));
    await once(socket, 'data');
    socket.pause(); // from here on, nothing is read

    // The peak, not the current RSS: the queue is freed when the client is cut off.
    const peakRss = () => process.resourceUsage().maxRSS * 1024;
    const before = peakRss();
    const requests = 256; // 256 MiB of replies, were they all kept
    const read = encodeRegionReadRequest({ offset: 0n, region: Region.BAR0, count: MiB });
    for (let id = 2; id < 2 + requests; id++) socket.write(encodeMessage({ msgId: id, command: Command.REGION_READ }, read));
    const [, error] = await disconnected;
    const grown = peakRss() - before;
    console.log(`reply queue bound: peak RSS grew ${(grown / MiB).toFixed(1)} MiB for ${requests} unread 1 MiB replies before the cut-off`);
    expect(error?.message).toMatch(/left more than 8388608 bytes unread/);
    expect(grown).toBeLessThan(64 * MiB);
  });

  test('the bound is a server option', async () => {
    served = await serve(new PciDevice({ ...base, bars: { 0: { kind: 'memory', size: MiB } } }));
    await served.server.close();
    const { createServer } = await import('../ts/index.js');
    expect(() => createServer(served!.device, { maxQueuedBytes: 0 })).toThrow(/maxQueuedBytes 0/);
    const server = createServer(served.device, { maxQueuedBytes: 2 * MiB });
    await server.listen(served.path);
    try {
      const disconnected = once(server, 'disconnect') as Promise<[ServerSession, Error?]>;
      const socket = await rawConnect(served.path);
      socket.write(encodeMessage({ msgId: 1, command: Command.VERSION }, encodeVersion({ major: 0, minor: 2, capabilities: {} })));
      await once(socket, 'data');
      socket.pause();
      const read = encodeRegionReadRequest({ offset: 0n, region: Region.BAR0, count: MiB });
      for (let id = 2; id < 40; id++) socket.write(encodeMessage({ msgId: id, command: Command.REGION_READ }, read));
      const [, error] = await disconnected;
      expect(error?.message).toMatch(/left more than 2097152 bytes unread/);
    } finally {
      await server.close();
    }
  });
});

describe('fds per message', () => {
  test(`more fds than max_msg_fds (${SERVER_CAPABILITIES.maxMsgFds}) are closed and the message refused with EINVAL`, async () => {
    const vectors = 32;
    served = await serve(new PciDevice({
      ...base,
      bars: { 0: { kind: 'memory', size: 0x4000 } },
      capabilities: [{ kind: 'msix', vectors, table: { bar: 0, offset: 0x2000 }, pba: { bar: 0, offset: 0x3000 } }],
    }));
    const channel = new Channel(native.connectUnix(served.path), { side: 'client', onCommand: () => {}, onClose: () => {} });
    await channel.request(Command.VERSION, encodeVersion({ major: 0, minor: 2, capabilities: {} }));
    const before = openFdCount();
    const setIrqs = (count: number) => {
      const fds = Array.from({ length: count }, () => native.eventfdCreate());
      const payload = encodeSetIrqsRequest({ flags: SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER, index: IrqIndex.MSIX, start: 0, count });
      return channel.request(Command.DEVICE_SET_IRQS, payload, fds).finally(() => fds.forEach((fd) => native.closeFd(fd)));
    };
    const refused = await setIrqs(SERVER_CAPABILITIES.maxMsgFds + 1).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(ProtocolError);
    expect((refused as ProtocolError).errno).toBe(Errno.EINVAL);
    expect(openFdCount()).toBe(before); // the server kept none of the 17
    await setIrqs(SERVER_CAPABILITIES.maxMsgFds); // exactly the maximum is fine
    channel.close();
  });
});
