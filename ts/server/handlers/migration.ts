/**
 * DEVICE_FEATURE, MIG_DATA_READ and MIG_DATA_WRITE (§6.14-§6.16): routed to
 * the migration session (ts/server/migration), ENOTSUP without migration.
 */
import type { Message } from '../../channel.js';
import { Errno } from '../../protocol/index.js';
import type { MigrationSession } from '../migration/index.js';
import { fail, noFds, type HandlerContext, type Reply } from './context.js';

function migrating(session: HandlerContext, message: Message): MigrationSession {
  noFds(message);
  if (!session.migration) throw fail(Errno.ENOTSUP, message.header.command, 'the device does not support migration');
  return session.migration;
}

// Not async: a refusal before the migration session runs is answered at once.
export function deviceFeature(session: HandlerContext, message: Message): Promise<Reply> {
  return migrating(session, message).feature(message.payload).then((payload) => ({ payload }));
}

export function migDataRead(session: HandlerContext, message: Message): Promise<Reply> {
  return migrating(session, message).dataRead(message.payload).then((payload) => ({ payload }));
}

export function migDataWrite(session: HandlerContext, message: Message): Promise<Reply> {
  return migrating(session, message).dataWrite(message.payload);
}
