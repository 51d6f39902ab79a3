/** DEVICE_GET_INFO and DEVICE_RESET (§6.4, §6.13): the device as a whole. */
import type { Message } from '../../channel.js';
import { Command, decodeDeviceGetInfoRequest, encodeDeviceGetInfoReply, Errno } from '../../protocol/index.js';
import { fail, noFds, type HandlerContext, type Reply } from './context.js';

export function deviceGetInfo(session: HandlerContext, message: Message): Reply {
  noFds(message);
  decodeDeviceGetInfoRequest(message.payload);
  const d = session.device;
  return { payload: encodeDeviceGetInfoReply({ flags: d.flags, numRegions: d.numRegions, numIrqs: d.numIrqs }) };
}

export async function deviceReset(session: HandlerContext, message: Message): Promise<Reply> {
  noFds(message);
  if (message.payload.length !== 0) throw fail(Errno.EINVAL, Command.DEVICE_RESET, 'DEVICE_RESET has no payload');
  // The VMM's way out of a failed device (a guest reboot resets it): a reset that succeeds clears the failure.
  await session.reset();
}
