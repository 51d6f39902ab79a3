/**
 * Which handler answers which command. Each handler lives in the file named
 * for its concern (version, dma, device, region, irq, migration).
 */
import { Command } from '../../protocol/index.js';
import type { Handler } from './context.js';
import { deviceGetInfo, deviceReset } from './device.js';
import { dmaMap, dmaUnmap } from './dma.js';
import { deviceGetIrqInfo, deviceSetIrqs } from './irq.js';
import { deviceFeature, migDataRead, migDataWrite } from './migration.js';
import { deviceGetRegionInfo, deviceGetRegionIoFds, regionRead, regionWrite, regionWriteMulti } from './region.js';
import { version } from './version.js';

export { fail, type HandlerContext, type Reply } from './context.js';
export { SERVER_CAPABILITIES, SERVER_VERSION } from './version.js';

/**
 * Handlers by command number. DMA_READ/DMA_WRITE (server to client), 14
 * (removed) and unknown commands have none.
 */
export const handlers: ReadonlyMap<number, Handler> = new Map<number, Handler>([
  [Command.VERSION, version],
  [Command.DMA_MAP, dmaMap],
  [Command.DMA_UNMAP, dmaUnmap],
  [Command.DEVICE_GET_INFO, deviceGetInfo],
  [Command.DEVICE_GET_REGION_INFO, deviceGetRegionInfo],
  [Command.DEVICE_GET_REGION_IO_FDS, deviceGetRegionIoFds],
  [Command.DEVICE_GET_IRQ_INFO, deviceGetIrqInfo],
  [Command.DEVICE_SET_IRQS, deviceSetIrqs],
  [Command.REGION_READ, regionRead],
  [Command.REGION_WRITE, regionWrite],
  [Command.REGION_WRITE_MULTI, regionWriteMulti],
  [Command.DEVICE_RESET, deviceReset],
  [Command.DEVICE_FEATURE, deviceFeature],
  [Command.MIG_DATA_READ, migDataRead],
  [Command.MIG_DATA_WRITE, migDataWrite],
]);
