/** DMA_MAP and DMA_UNMAP (§6.2, §6.3): the client's guest memory windows. */
import type { Message } from '../../channel.js';
import {
  Command,
  decodeDmaMapRequest,
  decodeDmaUnmapRequest,
  DmaMapFlags,
  DmaUnmapFlags,
  encodeDmaUnmapReply,
  Errno,
} from '../../protocol/index.js';
import { fail, type HandlerContext, type Reply } from './context.js';

export function dmaMap(session: HandlerContext, message: Message): Reply {
  const req = decodeDmaMapRequest(message.payload);
  if (message.fds.length > 1) throw fail(Errno.EINVAL, Command.DMA_MAP, 'at most one fd');
  if (req.flags & DmaMapFlags.FILE_IO) throw fail(Errno.ENOTSUP, Command.DMA_MAP, 'FILE_IO maps are not supported');
  const known = DmaMapFlags.READ | DmaMapFlags.WRITE | DmaMapFlags.MMAP;
  if (req.flags & ~known) throw fail(Errno.EINVAL, Command.DMA_MAP, `unknown flags 0x${req.flags.toString(16)}`);
  const fd = message.fds[0];
  if (fd === undefined && req.flags & DmaMapFlags.MMAP) throw fail(Errno.EINVAL, Command.DMA_MAP, 'MMAP without an fd');
  session.dma.map({
    iova: req.address,
    size: req.size,
    readable: (req.flags & DmaMapFlags.READ) !== 0,
    writable: (req.flags & DmaMapFlags.WRITE) !== 0,
    fd,
    fileOffset: fd === undefined ? 0n : req.offset,
  });
}

export function dmaUnmap(session: HandlerContext, message: Message): Reply {
  // SPDK's NVMe host attaches the window's fd to every DMA_UNMAP, and libvfio-user accepts it:
  // the fds mean nothing here and are closed with the message, like every fd no handler keeps.
  const req = decodeDmaUnmapRequest(message.payload);
  if (req.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) {
    throw fail(Errno.ENOTSUP, Command.DMA_UNMAP, 'migration v1 dirty bitmaps are not supported');
  }
  if (req.flags & DmaUnmapFlags.ALL) session.dma.unmapAll();
  else session.dma.unmap(req.address, req.size);
  return { payload: encodeDmaUnmapReply({ argsz: 24, flags: req.flags, address: req.address, size: req.size }) };
}
