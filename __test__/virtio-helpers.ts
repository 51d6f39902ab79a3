/** Serving a virtio device and driving it with the package's virtio driver, over real sockets and memfd memory. */
import { VirtioDriver, type VirtioDevice, type VirtioDriverOptions } from '../ts/index.js';
import { serve, type Served } from './helpers.js';
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
