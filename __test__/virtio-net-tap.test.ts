/**
 * virtio-net on a host TAP interface (`--tap NAME`): the package's virtio
 * driver sends frames through the TX queue to the host's own network stack
 * and gets the kernel's answers on the RX queue. Needs /dev/net/tun,
 * CAP_NET_ADMIN and iproute2's `ip`; skipped, saying which is missing, without.
 */
import { createSocket } from 'node:dgram';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { describe, expect, test } from 'vitest';
import { featureBit, TapInterface, type DriverQueue, type VirtioDriver } from '../ts/index.js';
import createNet, { NET_HEADER, NetFeature, type VirtioNet } from '../examples/virtio-net/index.js';
import { testCleanups } from './cleanups.js';
import { drive } from './virtio-helpers.js';
import { makeHostTap, tapMissing, type HostTap } from './virtio-net-host.js';

const t = testCleanups();

const skipReason = tapMissing();
const GUEST_MAC = Buffer.from('525400aa0002', 'hex');
const ETHER_ARP = 0x0806;
const ETHER_IPV4 = 0x0800;
/** Frames looked at while waiting for one: the host may send others (none expected with IPv6 off). */
const MAX_FRAMES = 20;

let tap: HostTap;
let HOST_IP: string;
let GUEST_IP: string;

/** This test's host TAP, deleted after it. */
function hostTap(): HostTap {
  tap = makeHostTap();
  t.defer(() => tap.remove());
  HOST_IP = tap.hostIp;
  GUEST_IP = tap.guestIp;
  return tap;
}

/** examples/virtio-net as `vfio-user serve` makes it, on the TAP, initialized by the driver. */
async function nicOnTap(): Promise<{ nic: VirtioNet; driver: VirtioDriver; rx: DriverQueue; tx: DriverQueue }> {
  const nic = await createNet(['--tap', tap.name, '--mac', '52:54:00:aa:00:02']);
  const { driver } = await drive(t, nic);
  await driver.initialize();
  const [rx, tx] = driver.queues;
  return { nic, driver, rx: rx!, tx: tx! };
}

const ipBytes = (dotted: string) => Buffer.from(dotted.split('.').map(Number));

function ethernet(to: Buffer, type: number, payload: Buffer): Buffer {
  const header = Buffer.alloc(14);
  to.copy(header, 0);
  GUEST_MAC.copy(header, 6);
  header.writeUInt16BE(type, 12);
  return Buffer.concat([header, payload]);
}

function arpRequest(target: string): Buffer {
  const arp = Buffer.alloc(28);
  arp.writeUInt16BE(1, 0); // Ethernet
  arp.writeUInt16BE(ETHER_IPV4, 2);
  arp[4] = 6;
  arp[5] = 4;
  arp.writeUInt16BE(1, 6); // request
  GUEST_MAC.copy(arp, 8);
  ipBytes(GUEST_IP).copy(arp, 14);
  ipBytes(target).copy(arp, 24);
  return ethernet(Buffer.alloc(6, 0xff), ETHER_ARP, arp);
}

/** The Internet checksum (RFC 1071) of `bytes`. */
function checksum(bytes: Buffer): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i += 2) sum += (bytes[i]! << 8) | (bytes[i + 1] ?? 0);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >> 16);
  return ~sum & 0xffff;
}

function echoRequest(to: Buffer, id: number, seq: number, data: Buffer): Buffer {
  const icmp = Buffer.concat([Buffer.from([8, 0, 0, 0, id >> 8, id & 0xff, seq >> 8, seq & 0xff]), data]);
  icmp.writeUInt16BE(checksum(icmp), 2);
  const header = Buffer.alloc(20);
  header[0] = 0x45;
  header.writeUInt16BE(20 + icmp.length, 2);
  header.writeUInt16BE(0x4000, 6); // don't fragment
  header[8] = 64; // TTL
  header[9] = 1; // ICMP
  ipBytes(GUEST_IP).copy(header, 12);
  ipBytes(HOST_IP).copy(header, 16);
  header.writeUInt16BE(checksum(header), 10);
  return ethernet(to, ETHER_IPV4, Buffer.concat([header, icmp]));
}

const send = (tx: DriverQueue, frame: Buffer) => tx.submit([{ data: Buffer.alloc(NET_HEADER) }, { data: frame }]);

/** Receives frames until `wanted` accepts one (at most MAX_FRAMES); returns it. */
async function receiveUntil(rx: DriverQueue, wanted: (frame: Buffer) => boolean): Promise<Buffer> {
  for (let i = 0; i < MAX_FRAMES; i++) {
    const done = await rx.submit([{ writable: NET_HEADER + 1518 }]);
    const bytes = done.writable[0]!.subarray(0, done.written);
    // No offload negotiated: the header is zero but for num_buffers.
    expect(bytes.subarray(0, NET_HEADER).equals(Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]))).toBe(true);
    const frame = bytes.subarray(NET_HEADER);
    if (wanted(frame)) return frame;
  }
  throw new Error(`no wanted frame among ${MAX_FRAMES}`);
}

const isArpReply = (frame: Buffer) => frame.readUInt16BE(12) === ETHER_ARP && frame.readUInt16BE(20) === 2;
const isEchoReply = (frame: Buffer, id: number) => frame.readUInt16BE(12) === ETHER_IPV4 && frame[23] === 1 && frame[34] === 0 && frame.readUInt16BE(38) === id;

describe.skipIf(skipReason)(`virtio-net on a host TAP${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  test('an ARP request through TX gets the host kernel’s reply on RX; MTU and link are in the configuration', async () => {
    const host = hostTap();
    const { driver, rx, tx } = await nicOnTap();
    const mtuBit = featureBit(NetFeature.MTU);
    expect(driver.features & mtuBit).toBe(mtuBit);
    const config = await driver.readConfig(0, 12);
    expect(config.subarray(0, 6).equals(GUEST_MAC)).toBe(true);
    expect(config.readUInt16LE(6)).toBe(1); // link up
    expect(config.readUInt16LE(10)).toBe(Number(readFileSync(`/sys/class/net/${tap.name}/mtu`, 'utf8')));

    const reply = receiveUntil(rx, isArpReply);
    await send(tx, arpRequest(HOST_IP));
    const arp = (await reply).subarray(14);
    expect(arp.subarray(8, 14).equals(host.mac)).toBe(true); // the host's MAC...
    expect([...arp.subarray(14, 18)].join('.')).toBe(HOST_IP); // ...has the host's address
    expect(arp.subarray(18, 24).equals(GUEST_MAC)).toBe(true);
  });

  test('an ICMP echo request to the host’s address gets the kernel’s echo reply', async () => {
    const host = hostTap();
    const { rx, tx } = await nicOnTap();
    // The kernel learns our MAC from the ARP request, so it can answer the echo at once.
    const arp = receiveUntil(rx, isArpReply);
    await send(tx, arpRequest(HOST_IP));
    await arp;
    const data = Buffer.from('vfio-user virtio-net over a TAP');
    const reply = receiveUntil(rx, (f) => isEchoReply(f, 0x1234));
    await send(tx, echoRequest(host.mac, 0x1234, 1, data));
    const frame = await reply;
    expect(frame.subarray(0, 6).equals(GUEST_MAC)).toBe(true);
    expect([...frame.subarray(26, 30)].join('.')).toBe(HOST_IP);
    expect(frame.subarray(42).equals(data)).toBe(true);
  });

  test('frames the host sends while no receive buffer waits are held by the kernel, then delivered', async () => {
    hostTap();
    const { rx } = await nicOnTap();
    // The host sends the guest's address a datagram with no buffer posted: first it asks who has it (ARP).
    const udp = createSocket('udp4');
    t.defer(() => void udp.close());
    await new Promise<void>((resolve, reject) => udp.send('hello', 9, GUEST_IP, (error) => (error ? reject(error) : resolve())));
    const frame = await receiveUntil(rx, () => true);
    expect(frame.readUInt16BE(12)).toBe(ETHER_ARP);
    expect([...frame.subarray(38, 42)].join('.')).toBe(GUEST_IP); // who has the guest's address
  });

  test('a frame longer than the MTU goes nowhere; a receive buffer too small comes back empty; deleting the interface takes the link down', async () => {
    const { received } = hostTap();
    const { nic, driver, rx, tx } = await nicOnTap();
    const before = received();
    await send(tx, Buffer.concat([arpRequest(HOST_IP), Buffer.alloc(1500)]));
    expect(received()).toBe(before);
    // The first reply meets a buffer too small for it: dropped, the buffer returned empty; the second reply fits the next.
    const small = rx.submit([{ writable: NET_HEADER + 20 }]);
    const reply = receiveUntil(rx, isArpReply);
    await send(tx, arpRequest(HOST_IP));
    expect((await small).written).toBe(0);
    await send(tx, arpRequest(HOST_IP));
    await reply;
    expect(received()).toBe(before + 2);
    expect(nic.dropped).toBe(1);
    // A waiting receive buffer's reader finds the interface gone (EBADFD): the cable is unplugged.
    void rx.submit([{ writable: NET_HEADER + 1518 }]);
    const configChanged = once(driver.vectors[0]!, 'interrupt');
    tap.remove();
    await configChanged;
    expect((await driver.readConfig(6, 2)).readUInt16LE(0)).toBe(0); // link down
    expect(nic.needsReset).toBeUndefined();
  });

  test('TapError carries the errno: a name Linux refuses, a TAP already attached, a closed TAP', () => {
    expect(() => TapInterface.open('no/slash')).toThrow(expect.objectContaining({ errno: 22, operation: 'open' }));
    const { name } = hostTap();
    const opened = TapInterface.open(name);
    expect(opened.name).toBe(name);
    expect(() => TapInterface.open(name)).toThrow(expect.objectContaining({ errno: 16 })); // EBUSY
    opened.close();
    expect(() => opened.read()).toThrow(expect.objectContaining({ errno: 9, operation: 'read' })); // EBADF
  });
});
