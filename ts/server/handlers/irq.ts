/** DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS (§6.7, §6.8): interrupts. */
import type { Message } from '../../channel.js';
import { native } from '../../native.js';
import {
  Command,
  decodeIrqInfoRequest,
  decodeSetIrqsRequest,
  encodeIrqInfoReply,
  Errno,
  SetIrqsFlags,
  validateSetIrqs,
} from '../../protocol/index.js';
import { fail, noFds, type HandlerContext, type Reply } from './context.js';

export function deviceGetIrqInfo(session: HandlerContext, message: Message): Reply {
  noFds(message);
  const req = decodeIrqInfoRequest(message.payload);
  if (req.index >= session.device.numIrqs) throw fail(Errno.EINVAL, Command.DEVICE_GET_IRQ_INFO, `no IRQ index ${req.index}`);
  const info = session.device.irqInfo(req.index);
  return { payload: encodeIrqInfoReply({ index: req.index, count: info.count, flags: info.flags }) };
}

export function deviceSetIrqs(session: HandlerContext, message: Message): Reply {
  const req = decodeSetIrqsRequest(message.payload);
  const C = Command.DEVICE_SET_IRQS;
  if (req.index >= session.device.numIrqs) throw fail(Errno.EINVAL, C, `no IRQ index ${req.index}`);
  const errno = validateSetIrqs(req, message.fds.length, session.device.irqInfo(req.index).count);
  if (errno) throw fail(errno, C, 'invalid SET_IRQS');
  if ((req.flags & SetIrqsFlags.DATA_EVENTFD) && (req.flags & SetIrqsFlags.ACTION_TYPE_MASK) !== SetIrqsFlags.ACTION_TRIGGER) {
    throw fail(Errno.EINVAL, C, 'eventfds can only be attached for TRIGGER');
  }
  // Adopting makes each non-blocking: one a client left at its maximum count cannot stall a signal.
  if (!message.fds.every((fd) => native.eventfdAdopt(fd))) throw fail(Errno.EINVAL, C, 'every fd must be an eventfd');
  // The device owns the fds once setIrqs returns; if it throws, they are still ours to close.
  session.device.setIrqs(req, [...message.fds]);
  message.fds.length = 0;
}
