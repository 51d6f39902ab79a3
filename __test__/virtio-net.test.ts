/** virtio-net NICs on the userspace switch, each driven by the package's virtio driver over its own client. */
import { describe, expect, test } from 'vitest';
import { featureBit, type DriverQueue } from '../ts/index.js';
import { NET_HEADER, NetFeature } from '../examples/virtio-net/index.js';
import { testCleanups } from './cleanups.js';
import { lan as lanOf } from './virtio-helpers.js';

const t = testCleanups();
const BROADCAST = Buffer.alloc(6, 0xff);

const lan = (count: number) => lanOf(t, count);

function frame(to: Buffer, from: Buffer, payload: string): Buffer {
  return Buffer.concat([to, from, Buffer.from([0x88, 0xb5]), Buffer.from(payload)]);
}

const send = (tx: DriverQueue, f: Buffer) => tx.submit([{ data: Buffer.alloc(NET_HEADER) }, { data: f }]);
/** The next frame `rx` receives: a receive buffer, filled. */
async function receive(rx: DriverQueue): Promise<Buffer> {
  const done = await rx.submit([{ writable: NET_HEADER + 1514 }]);
  const bytes = done.writable[0].subarray(0, done.written);
  expect(bytes.readUInt16LE(10)).toBe(1); // num_buffers
  return bytes.subarray(NET_HEADER);
}

describe('virtio-net on the switch', () => {
  test('MAC and link status in the configuration', async () => {
    const [a] = await lan(1);
    expect(a.driver.features & featureBit(NetFeature.MAC)).toBe(featureBit(NetFeature.MAC));
    const config = await a.driver.readConfig(0, 8);
    expect(config.subarray(0, 6).equals(a.mac)).toBe(true);
    expect(config.readUInt16LE(6)).toBe(1);
  });

  test('unicast reaches its NIC, broadcast every other one, learned unicast only its own', async () => {
    const [a, b, c] = await lan(3);
    // Unknown destination: flooded, so B hears A's hello.
    const bHears = receive(b.rx);
    const cHears = receive(c.rx);
    await send(a.tx, frame(b.mac, a.mac, 'hello b'));
    expect((await bHears).equals(frame(b.mac, a.mac, 'hello b'))).toBe(true);
    expect((await cHears).equals(frame(b.mac, a.mac, 'hello b'))).toBe(true);
    // B answers: the switch knows A now, and learns B.
    const aHears = receive(a.rx);
    await send(b.tx, frame(a.mac, b.mac, 'hello a'));
    expect((await aHears).equals(frame(a.mac, b.mac, 'hello a'))).toBe(true);
    // A to B is now unicast: C's next frame is the broadcast that follows it, not the unicast.
    const cNext = receive(c.rx);
    const bNext = receive(b.rx);
    await send(a.tx, frame(b.mac, a.mac, 'just for b'));
    await send(a.tx, frame(BROADCAST, a.mac, 'everyone'));
    expect((await cNext).equals(frame(BROADCAST, a.mac, 'everyone'))).toBe(true);
    expect((await bNext).equals(frame(b.mac, a.mac, 'just for b'))).toBe(true);
  });

  test('a frame too short for Ethernet, or a chain without a header, goes nowhere; the NIC carries on', async () => {
    const [a, b] = await lan(2);
    await a.tx.submit([{ data: Buffer.alloc(NET_HEADER + 5) }]);
    await a.tx.submit([{ data: Buffer.alloc(3) }]);
    const bHears = receive(b.rx);
    await send(a.tx, frame(BROADCAST, a.mac, 'still here'));
    expect((await bHears).equals(frame(BROADCAST, a.mac, 'still here'))).toBe(true);
    expect(a.nic.needsReset).toBeUndefined();
  });
});
