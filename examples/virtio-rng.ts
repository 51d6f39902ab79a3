/**
 * A virtio entropy device (virtio-rng, type 4) that fills the driver's
 * buffers from the host's CSPRNG. One queue, no configuration, no device
 * features: Linux's virtio-rng driver serves it as /dev/hwrng.
 *
 *   vfio-user serve examples/virtio-rng --socket /tmp/rng.sock
 */
import { randomFillSync } from 'node:crypto';
import { VirtioDevice, VirtioDeviceType, type VirtioNotifyMode, type Virtqueue } from 'vfio-user';

export class VirtioRng extends VirtioDevice {
  /** `notify`: how notifications arrive (docs/virtio.md; default 'trap'). */
  constructor(options: { notify?: VirtioNotifyMode } = {}) {
    super({
      deviceId: VirtioDeviceType.ENTROPY,
      queues: [{ size: 256 }],
      notify: options.notify,
      onQueue: (queue) => this.fill(queue),
    });
  }

  /** Fills each chain's writable buffers in place: no copy through a bounce buffer. */
  private fill(queue: Virtqueue): void {
    for (let chain = queue.pop(); chain; chain = queue.pop()) {
      for (const buffer of chain.writable) {
        if (buffer.length > 0) chain.memory.withView(buffer.iova, buffer.length, (view) => randomFillSync(view));
      }
      queue.complete(chain, chain.writableLength);
    }
  }
}

export default function createDevice(): VirtioRng {
  return new VirtioRng();
}
