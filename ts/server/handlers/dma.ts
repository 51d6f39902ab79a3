/**
 * DMA_MAP and DMA_UNMAP (§6.2, §6.3): the client's guest memory windows.
 * The native window table applies them (crates/core/src/dma.rs), with the
 * same rules whether the connection's reader answers them without entering
 * JS (the common case) or they come here: while an earlier command is still
 * being handled, while messages are observed, or when they carry more fds
 * than max_msg_fds (refused before this by the session).
 */
import type { Message } from '../../channel.js';
import { Command } from '../../protocol/index.js';
import type { HandlerContext, Reply } from './context.js';

export function dmaMap(session: HandlerContext, message: Message): Reply {
  session.dma.applyMessage(Command.DMA_MAP, message.payload, message.fds);
}

export function dmaUnmap(session: HandlerContext, message: Message): Reply {
  // SPDK's NVMe host attaches the window's fd to every DMA_UNMAP, and libvfio-user accepts it:
  // the fds mean nothing here and are closed with the message, like every fd no handler keeps.
  return { payload: session.dma.applyMessage(Command.DMA_UNMAP, message.payload, message.fds) };
}
