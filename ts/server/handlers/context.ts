/**
 * What every command handler gets: the session's state it may read or
 * change, and the shape of its answer. One file per concern sits beside
 * this one; `index.ts` maps each command to its handler.
 */
import type { Message } from '../../channel.js';
import type { VfioUserDevice } from '../../device.js';
import type { DmaSpace } from '../../dma/space.js';
import { Errno, ProtocolError, type RegionAccess, type Version } from '../../protocol/index.js';
import type { MigrationSession } from '../migration/index.js';

/** A handler's answer: a payload (and fds) for the reply, or a whole prebuilt message. */
export type Reply = { payload?: Uint8Array; fds?: number[]; message?: undefined } | { message: Buffer } | void;

/** Handles one command; a Promise when it finishes later (later commands wait for it). */
export type Handler = (session: HandlerContext, message: Message) => Reply | Promise<Reply>;

export interface HandlerContext {
  readonly device: VfioUserDevice;
  readonly dma: DmaSpace;
  /** Present when the device supports live migration. */
  readonly migration: MigrationSession | undefined;
  /** Reused by REGION_READ decoding, so a read allocates no request object. */
  readonly scratch: RegionAccess;
  /** The client's VERSION once negotiated. */
  readonly negotiated: Version | undefined;
  /**
   * Completes negotiation with `peer`: raises the frame limit, enables native
   * reads, opens the twin socket if offered and attaches the device. Returns
   * the twin socket's client end, for the VERSION reply.
   */
  establish(peer: Version): number | undefined;
  /** Resets the device, leaving migration's ERROR; a reset that succeeds clears a failure (ts/boundary.ts). */
  reset(): Promise<void>;
  /** Ends the session (after the current reply is sent). */
  close(): void;
}

export const fail = (errno: number, command: number, why: string) => new ProtocolError(errno, command, why);

/** Most commands take no fds. */
export function noFds(message: Message): void {
  if (message.fds.length > 0) throw fail(Errno.EINVAL, message.header.command, 'unexpected fds');
}
