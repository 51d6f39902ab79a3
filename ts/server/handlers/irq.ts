/** DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS (§6.7, §6.8): interrupts. */
import type { Message } from '../../channel.js';
import { native } from '../../native.js';
import {
  Command,
  decodeIrqInfoRequest,
  decodeSetIrqsRequest,
  encodeIrqInfoReply,
  Errno,
  IrqIndex,
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
  // As kernel VFIO: eventfds trigger any vector, and unmask INTx (its resample eventfd); MASK takes none.
  const action = req.flags & SetIrqsFlags.ACTION_TYPE_MASK;
  if ((req.flags & SetIrqsFlags.DATA_EVENTFD) && action !== SetIrqsFlags.ACTION_TRIGGER &&
      !(action === SetIrqsFlags.ACTION_UNMASK && req.index === IrqIndex.INTX)) {
    throw fail(Errno.EINVAL, C, 'eventfds are for TRIGGER, and for UNMASK of INTx only');
  }
  // Adopting makes each non-blocking: one a client left at its maximum count cannot stall a signal.
  if (!message.fds.every((fd) => native.isEventfd(fd))) throw fail(Errno.EINVAL, C, 'every fd must be an eventfd');
  // The device owns the fds once setIrqs returns; if it throws, they are still ours to close.
  session.device.setIrqs(req, [...message.fds]);
  message.fds.length = 0;
}
