/** Asynchronous block I/O between files (or block devices) and guest memory. */
export { BlockDevice, type BlockAlignment, type BlockCallback, type BlockEngine, type BlockOpenOptions } from './device.js';
export { BlockDeviceClosedError, BlockIoError, BlockOpenError, BlockQueueFullError, type BlockOp } from './errors.js';
