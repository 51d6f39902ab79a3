/** Guest memory for device code, and memory a device shares with the client. */
export { DmaSpace, type DmaWindow, type MapRequest } from './space.js';
export { GuestMemoryAccess, DIRTY_PAGE_SIZE, MAX_VIEW_LENGTH, type SgEntry, type SgList } from './access.js';
export { MessageDma } from './messages.js';
export { SharedMemory, MMAP_PAGE_SIZE, type SharedRegionOptions } from './shared-memory.js';
export { AsyncDmaRequiredError, DmaAccessError, DmaSpaceClosedError, DmaViewError, type DmaViewRefusal } from './errors.js';
