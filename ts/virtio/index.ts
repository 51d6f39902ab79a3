/** The virtio kit: devices on the virtio 1.2 PCI transport, and a driver to test them without a VM. */
export { VirtioDevice, KIT_FEATURES, type VirtioDeviceDescription, type VirtioQueueDescription } from './device.js';
export { Virtqueue } from './queue.js';
export type { VirtioNotifyMode } from './notify.js';
export { DescriptorChain, VirtqueueError, type SavedChain } from './chain.js';
export { Feature as VirtioFeature, Status as VirtioStatus, VirtioDeviceType, featureBit } from './spec.js';
export {
  VirtioDriver, DriverQueue, SplitDriverQueue, PackedDriverQueue, type PackedDescriptor, type ChainBuffer, type Completion, type InitOptions,
  type NotifyPath, type VirtioDriverOptions,
} from './driver.js';
export { virtioMode, type VirtioOp } from './fuzz.js';
