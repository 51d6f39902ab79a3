/** Serving a virtio device and driving it with the package's virtio driver, over real sockets and memfd memory. */
import { once } from 'node:events';
import { createConnection } from 'node:net';
import { expect } from 'vitest';
import { VirtioDriver, VirtioStatus as S, type DriverQueue, type InitOptions, type VfioUserClient, type VirtioDevice, type VirtioDriverOptions } from '../ts/index.js';
import { Common } from '../ts/virtio/spec.js';
import { VirtioRng } from '../examples/virtio-rng.js';
import { L2Switch, VirtioNet } from '../examples/virtio-net/index.js';
import { serve, tempSocketPath, type Served } from './helpers.js';
import type { TestCleanups } from './cleanups.js';

export const GUEST_MEMORY = 4 * 1024 * 1024;

export interface Driven<D extends VirtioDevice> {
  served: Served<D>;
  device: D;
  driver: VirtioDriver;
}

/** Serves `device`, connects a client with guest memory and a driver (not initialized; notifying by `notify`, default the best the device offers). */
export async function drive<D extends VirtioDevice>(t: TestCleanups, device: D, notify?: VirtioDriverOptions['notify']): Promise<Driven<D>> {
  const served = await serve(device);
  t.defer(() => device.close());
  t.defer(() => served.close());
  const client = await served.client();
  const driver = await VirtioDriver.connect(client, { memory: t.memory(GUEST_MEMORY), notify });
  t.defer(() => driver.close());
  return { served, device, driver };
}

/** A queue layout a test writes to the common configuration itself: size and the three areas' guest addresses. */
export interface QueueLayout {
  size: number;
  desc: bigint;
  driver: bigint;
  device: bigint;
}

/**
 * Drives a fresh virtio-rng by hand to DRIVER_OK with `features` and queue 0
 * set up as `layout`, notifies it, and expects the device to refuse: NEEDS_RESET
 * with a reason matching `reason`.
 */
export async function expectLayoutRefused(t: TestCleanups, features: bigint, layout: QueueLayout, reason: RegExp): Promise<void> {
  const device = new VirtioRng();
  const { driver } = await drive(t, device);
  await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER);
  await driver.writeDriverFeatures(features);
  await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
  await driver.writeCommon(Common.QUEUE_SIZE, 2, layout.size);
  await driver.writeCommon(Common.QUEUE_DESC, 8, layout.desc);
  await driver.writeCommon(Common.QUEUE_DRIVER, 8, layout.driver);
  await driver.writeCommon(Common.QUEUE_DEVICE, 8, layout.device);
  await driver.writeCommon(Common.QUEUE_ENABLE, 2, 1);
  await driver.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
  await driver.notifyQueue(0);
  expect((await driver.status()) & S.NEEDS_RESET).toBe(S.NEEDS_RESET);
  expect(device.needsReset?.message).toMatch(reason);
}

/** A NIC on a `lan`: its MAC (52:54:00:00:00:n, n from 1), its driver and queues. */
export interface LanNic {
  nic: VirtioNet;
  mac: Buffer;
  driver: VirtioDriver;
  rx: DriverQueue;
  tx: DriverQueue;
}

/** `count` virtio-net NICs, each plugged into one L2Switch and driven (initialized with `init`). */
export async function lan(t: TestCleanups, count: number, init: InitOptions = {}): Promise<LanNic[]> {
  const socket = tempSocketPath('switch.sock');
  t.defer(() => socket.cleanup());
  const l2 = new L2Switch();
  await l2.listen(socket.path);
  t.defer(() => l2.close());
  const nics: LanNic[] = [];
  for (let i = 0; i < count; i++) {
    const mac = Buffer.from([0x52, 0x54, 0, 0, 0, i + 1]);
    const nic = new VirtioNet(mac);
    const wire = createConnection(socket.path);
    await once(wire, 'connect');
    t.defer(() => void wire.destroy());
    nic.plug(wire);
    const { driver } = await drive(t, nic);
    await driver.initialize(init);
    const [rx, tx] = driver.queues;
    nics.push({ nic, mac, driver, rx, tx });
  }
  return nics;
}

/** A migration's destination: `device` served (closed with the test) and a client connected to it. */
export async function serveDestination<D extends VirtioDevice>(t: TestCleanups, device: D): Promise<{ device: D; client: VfioUserClient }> {
  const served = await serve(device);
  t.defer(() => device.close());
  t.defer(() => served.close());
  return { device, client: await served.client() };
}
