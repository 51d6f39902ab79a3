/** VERSION (§6.1): negotiation, the first command of every session. */
import type { Message } from '../../channel.js';
import {
  Command,
  decodeVersion,
  encodeVersion,
  Errno,
  negotiateVersion,
  type Capabilities,
  type Version,
} from '../../protocol/index.js';
import { fail, noFds, type HandlerContext, type Reply } from './context.js';

/** What this server offers in VERSION. */
export const SERVER_VERSION = { major: 0, minor: 2 } as const;
export const SERVER_CAPABILITIES = {
  maxMsgFds: 16,
  maxDataXferSize: 1024 * 1024,
  maxDmaMaps: 65535,
  pgsizes: 4096,
  writeMultiple: true,
} as const;

export function version(session: HandlerContext, message: Message): Reply {
  if (session.negotiated) throw fail(Errno.EINVAL, Command.VERSION, 'VERSION was already negotiated');
  let peer: Version;
  let reply: { major: number; minor: number };
  try {
    noFds(message);
    peer = decodeVersion(message.payload);
    reply = negotiateVersion(peer, SERVER_VERSION);
  } catch (error) {
    // A client we cannot talk to: tell it why, then serve the next one.
    setImmediate(() => session.close());
    throw error;
  }
  const twinFd = session.establish(peer);
  const capabilities: Partial<Capabilities> = { ...SERVER_CAPABILITIES };
  if (twinFd !== undefined) capabilities.twinSocket = { supported: true, fdIndex: 0 };
  return {
    payload: encodeVersion({ ...reply, capabilities }),
    fds: twinFd === undefined ? undefined : [twinFd],
  };
}
