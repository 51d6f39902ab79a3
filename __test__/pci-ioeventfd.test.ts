/** Per-BAR ioeventfds: GET_REGION_IO_FDS, signalling, trapped writes, validation, lifetime. */
import { once } from 'node:events';
import { afterEach, describe, expect, test } from 'vitest';
import {
  EventfdIrq,
  IrqIndex,
  PciDevice,
  Region,
  type IoEventfdDescription,
  type PciDeviceDescription,
} from '../ts/index.js';
import { closeFds, native } from '../ts/native.js';
import { Channel } from '../ts/channel.js';
import { Command, IoFdType, KvmIoeventfdFlags } from '../ts/protocol/index.js';
import * as protocol from '../ts/protocol/index.js';
import { openFdCount, serve, until, type Served } from './helpers.js';
import { base, fieldOf, kvmSignal } from './pci-helpers.js';

let served: Served<PciDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served?.device.close();
  served = undefined;
});

/** BAR0 (memory) with a doorbell at 0x10 and a datamatch pair at 0x20; BAR2 (I/O) with one at 0. */
function kickable(write?: (offset: number, data: Buffer) => void): PciDevice {
  return new PciDevice({
    ...base,
    bars: {
      0: {
        kind: 'memory',
        size: 4096,
        write,
        ioeventfds: [{ offset: 0x10, size: 4 }, { offset: 0x20, size: 2, datamatch: 1 }, { offset: 0x20, size: 2, datamatch: 2 }],
      },
      2: { kind: 'io', size: 8, ioeventfds: [{ offset: 0, size: 0 }] },
    },
  });
}

describe('GET_REGION_IO_FDS', () => {
  test('returns the entries and an fd each; a write to a received copy is seen by the device', async () => {
    served = await serve(kickable());
    const client = await served.client();
    const before = openFdCount();
    const reply = await client.getRegionIoFds(Region.BAR0);
    expect(reply.count).toBe(3);
    expect(reply.entries.map((e) => [e.offset, e.size, e.fdIndex, e.type, e.flags, e.datamatch])).toEqual([
      [0x10n, 4n, 0, IoFdType.IOEVENTFD, 0, 0n],
      [0x20n, 2n, 1, IoFdType.IOEVENTFD, KvmIoeventfdFlags.DATAMATCH, 1n],
      [0x20n, 2n, 2, IoFdType.IOEVENTFD, KvmIoeventfdFlags.DATAMATCH, 2n],
    ]);
    expect(reply.fds).toHaveLength(3);
    const kicks = served.device.bar(0).ioeventfds;
    expect(reply.fds.every((fd) => native.isEventfd(fd) && !kicks.some((k) => k.fd === fd))).toBe(true);
    kvmSignal(reply.fds[1]);
    kvmSignal(reply.fds[1]);
    expect(kicks.map((k) => k.take())).toEqual([0, 2, 0]);
    expect(kicks[1].take()).toBe(0); // take() clears
    reply.fds.forEach((fd) => native.closeFd(fd));
    expect(openFdCount()).toBe(before);
  });

  test('I/O BARs say PIO; BARs without ioeventfds and non-BAR regions answer none', async () => {
    served = await serve(kickable());
    const client = await served.client();
    const io = await client.getRegionIoFds(Region.BAR2);
    expect(io.entries.map((e) => [e.offset, e.size, e.flags])).toEqual([[0n, 0n, KvmIoeventfdFlags.PIO]]);
    io.fds.forEach((fd) => native.closeFd(fd));
    for (const region of [Region.BAR1, Region.CONFIG]) {
      const none = await client.getRegionIoFds(region);
      expect([none.count, none.fds.length]).toEqual([0, 0]);
    }
  });
});

describe("GET_REGION_IO_FDS within the client's max_msg_fds", () => {
  /** A bare channel that negotiated `maxMsgFds` (undefined: the key left out, so the spec's default of 1). */
  async function clientTaking(maxMsgFds: number | undefined): Promise<Channel> {
    const channel = new Channel(native.connectUnix(served!.path), { side: 'client', onCommand: () => {}, onClose: () => {} });
    const capabilities = maxMsgFds === undefined ? { maxDataXferSize: 4096 } : { maxMsgFds };
    await channel.request(Command.VERSION, protocol.encodeVersion({ major: 0, minor: 0, capabilities }));
    return channel;
  }

  test.each([
    [2, [[0x10n, 0], [0x20n, 1]], 2],
    [undefined, [[0x10n, 0]], 1],
    [0, [], 0],
  ])('max_msg_fds %s: only the entries whose fds fit, count and argsz saying so; the rest stay trapped', async (maxMsgFds, expected, fdCount) => {
    served = await serve(kickable());
    const channel = await clientTaking(maxMsgFds);
    const before = openFdCount();
    const reply = await channel.request(Command.DEVICE_GET_REGION_IO_FDS, protocol.encodeRegionIoFdsRequest({ index: Region.BAR0, argsz: 4096 }));
    const decoded = protocol.decodeRegionIoFdsReply(reply.payload);
    expect(decoded.entries.map((e) => [e.offset, e.fdIndex])).toEqual(expected);
    expect([decoded.count, decoded.argsz]).toEqual([expected.length, 16 + 40 * expected.length]);
    expect(reply.fds).toHaveLength(fdCount);
    expect(openFdCount()).toBe(before + fdCount);
    closeFds(reply.fds);
    // The entry left out still works, trapped: the device signals its eventfd itself.
    await channel.request(Command.REGION_WRITE, protocol.encodeRegionWriteRequest({ offset: 0x20n, region: Region.BAR0 }, Buffer.from([2, 0])));
    expect(served.device.bar(0).ioeventfds[2].take()).toBe(1);
    channel.close();
  });
});

describe('trapped writes', () => {
  test('a trapped write KVM would have signalled signals the same eventfd instead of reaching the BAR', async () => {
    const writes: [number, number[]][] = [];
    served = await serve(kickable((offset, data) => { writes.push([offset, [...data]]); }));
    const client = await served.client();
    const [doorbell, one, two] = served.device.bar(0).ioeventfds;
    await client.regionWrite(Region.BAR0, 0x10n, Buffer.from([7, 0, 0, 0]));
    await client.regionWrite(Region.BAR0, 0x20n, Buffer.from([2, 0]));
    expect([doorbell.take(), one.take(), two.take()]).toEqual([1, 0, 1]);
    expect(served.device.bar(0).bytes![0x10]).toBe(0);
    // Another value, another size: not what KVM matches, so an ordinary write.
    await client.regionWrite(Region.BAR0, 0x20n, Buffer.from([3, 0]));
    await client.regionWrite(Region.BAR0, 0x10n, Buffer.from([7, 0]));
    expect(writes).toEqual([[0x20, [3, 0]], [0x10, [7, 0]]]);
    expect([doorbell.take(), one.take(), two.take()]).toEqual([0, 0, 0]);
    // Size 0 matches any width.
    await client.regionWrite(Region.BAR2, 0n, Buffer.from([1]));
    await client.regionWrite(Region.BAR2, 0n, Buffer.from([1, 2, 3, 4]));
    expect(served.device.bar(2).ioeventfds[0].take()).toBe(2);
  });
});

describe('a client that wires them (VfioUserClient.wireIoEventfds)', () => {
  test('matching writes signal the eventfd at once and send nothing; others still go as REGION_WRITE', async () => {
    const writes: [number, number[]][] = [];
    served = await serve(kickable((offset, data) => { writes.push([offset, [...data]]); }));
    const unconnected = openFdCount();
    const client = await served.client();
    const connected = openFdCount();
    const wired = await client.wireIoEventfds(Region.BAR0);
    expect(wired.map((e) => [e.offset, e.size, e.datamatch])).toEqual([[0x10n, 4n, 0n], [0x20n, 2n, 1n], [0x20n, 2n, 2n]]);
    expect(openFdCount()).toBe(connected + 3);
    const [doorbell, one, two] = served.device.bar(0).ioeventfds;
    // Signalled before regionWrite returns: no message could have been served yet.
    void client.regionWrite(Region.BAR0, 0x10n, Buffer.from([7, 0, 0, 0]), { posted: true });
    void client.regionWrite(Region.BAR0, 0x20n, Buffer.from([2, 0]), { posted: true });
    expect([doorbell.take(), one.take(), two.take()]).toEqual([1, 0, 1]);
    // Another value or size is no match: a message, which reaches the BAR's handler.
    await client.regionWrite(Region.BAR0, 0x20n, Buffer.from([3, 0]));
    await client.regionWrite(Region.BAR0, 0x10n, Buffer.from([7, 0]));
    expect(writes).toEqual([[0x20, [3, 0]], [0x10, [7, 0]]]);
    // Wiring again replaces the routes; a region without ioeventfds wires none; close() frees the fds.
    await client.wireIoEventfds(Region.BAR0);
    expect(await client.wireIoEventfds(Region.BAR1)).toEqual([]);
    expect(openFdCount()).toBe(connected + 3);
    client.close();
    await until(() => served!.server.session === undefined);
    expect(openFdCount()).toBe(unconnected);
  });
});

describe("'signal' events on the event loop", () => {
  test('a kick wakes a listener with the count; paused, the count stays for take(); no listener, no watch', async () => {
    served = await serve(kickable());
    const client = await served.client();
    const reply = await client.getRegionIoFds(Region.BAR0);
    const [doorbell, match1] = served.device.bar(0).ioeventfds;
    const signalled = once(doorbell, 'signal');
    kvmSignal(reply.fds[0]);
    kvmSignal(reply.fds[0]);
    expect(await signalled).toEqual([2]);
    expect(doorbell.take()).toBe(0); // the event consumed the count

    doorbell.pause();
    kvmSignal(reply.fds[0]);
    await client.regionRead(Region.BAR0, 0n, 4); // the loop turns without an event
    expect(doorbell.take()).toBe(1);
    doorbell.resume();
    const again = once(doorbell, 'signal');
    kvmSignal(reply.fds[0]);
    expect(await again).toEqual([1]);

    // A trapped write that KVM would have signalled reaches the listener too.
    const matched = once(match1, 'signal');
    await client.regionWrite(Region.BAR0, 0x20n, Buffer.from([1, 0]));
    expect(await matched).toEqual([1]);

    doorbell.removeAllListeners('signal');
    kvmSignal(reply.fds[0]);
    await client.regionRead(Region.BAR0, 0n, 4);
    expect(doorbell.take()).toBe(1); // nobody watches any more
    reply.fds.forEach((fd) => native.closeFd(fd));
  });
});

describe('lifetime', () => {
  test('a client leaving keeps the eventfds (the device owns them); close() frees them', async () => {
    const start = openFdCount();
    const device = kickable();
    expect(openFdCount()).toBe(start + 4);
    served = await serve(device);
    const before = openFdCount();
    const client = await served.client();
    const reply = await client.getRegionIoFds(Region.BAR0);
    reply.fds.forEach((fd) => native.closeFd(fd));
    client.close();
    await until(() => served!.server.session === undefined);
    expect(openFdCount()).toBe(before);
    expect(native.isEventfd(device.bar(0).ioeventfds[0].fd)).toBe(true);
    await served.close();
    served = undefined;
    device.close();
    expect(openFdCount()).toBe(start);
  });

  test('SET_IRQS eventfds and ioeventfds are separate: detaching drops only the client\'s', async () => {
    served = await serve(new PciDevice({ ...base, intx: 'A', bars: { 0: { kind: 'memory', size: 16, ioeventfds: [{ offset: 0, size: 4 }] } } }));
    const client = await served.client();
    const irq = new EventfdIrq();
    await client.setIrqs({ index: IrqIndex.INTX, eventfds: [irq] });
    irq.close();
    client.close();
    await until(() => served!.server.session === undefined);
    expect(native.isEventfd(served.device.bar(0).ioeventfds[0].fd)).toBe(true);
  });
});

describe('invalid ioeventfds throw InvalidDeviceError naming the field', () => {
  const on = (ioeventfds: IoEventfdDescription[], extra: Partial<PciDeviceDescription> = {}): PciDeviceDescription => ({
    ...base,
    bars: { 0: { kind: 'memory', size: 8192, shared: true, mmap: [{ offset: 4096, size: 4096 }], ioeventfds } },
    ...extra,
  });
  const cases: [string, PciDeviceDescription, string][] = [
    ['not an array', on({} as never), 'bars[0].ioeventfds'],
    ['a size of 3', on([{ offset: 0, size: 3 as never }]), 'bars[0].ioeventfds[0].size'],
    ['past the BAR', on([{ offset: 8190, size: 4 }]), 'bars[0].ioeventfds[0].offset'],
    ['a negative offset', on([{ offset: -4, size: 4 }]), 'bars[0].ioeventfds[0].offset'],
    ['in a mappable area', on([{ offset: 0, size: 4 }, { offset: 4096, size: 4 }]), 'bars[0].ioeventfds[1].offset'],
    ['datamatch with size 0', on([{ offset: 0, size: 0, datamatch: 1 }]), 'bars[0].ioeventfds[0].datamatch'],
    ['datamatch too wide', on([{ offset: 0, size: 1, datamatch: 0x100 }]), 'bars[0].ioeventfds[0].datamatch'],
    ['a fractional datamatch', on([{ offset: 0, size: 4, datamatch: 1.5 }]), 'bars[0].ioeventfds[0].datamatch'],
    ['a repeat', on([{ offset: 0, size: 4, datamatch: 5n }, { offset: 0, size: 4, datamatch: 5 }]), 'bars[0].ioeventfds[1]'],
    [
      'over the MSI-X table',
      on([{ offset: 0x20, size: 4 }], { capabilities: [{ kind: 'msix', vectors: 4, table: { bar: 0, offset: 0 }, pba: { bar: 0, offset: 0x800 } }] }),
      'capabilities[0].table.offset',
    ],
  ];
  test.each(cases)('%s', (_name, description, field) => {
    expect(fieldOf(description)).toBe(field);
  });
});
