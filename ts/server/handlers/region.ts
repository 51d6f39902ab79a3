/**
 * The device's regions (§6.5, §6.6, §6.9-§6.11): DEVICE_GET_REGION_INFO,
 * DEVICE_GET_REGION_IO_FDS, REGION_READ, REGION_WRITE, REGION_WRITE_MULTI.
 * REGION_READs of natively shared regions usually never get here: see
 * ts/server/ordering.ts.
 */
import type { Message } from '../../channel.js';
import { native } from '../../native.js';
import { HandlerResultError } from '../../errors.js';
import {
  allocRegionReadReplyMessage,
  Command,
  decodeRegionInfoRequest,
  decodeRegionIoFdsRequest,
  decodeRegionReadRequest,
  decodeRegionWriteMultiRequest,
  decodeRegionWriteRequest,
  encodeRegionInfoReply,
  encodeRegionIoFdsReply,
  encodeRegionWriteMultiReply,
  Errno,
  IoFdType,
  REGION_READ_REPLY_DATA_OFFSET,
  RegionCapId,
  RegionInfoFlags,
  type IoFdEntry,
} from '../../protocol/index.js';
import { fail, noFds, type HandlerContext, type Reply } from './context.js';
import { SERVER_CAPABILITIES } from './version.js';

export function deviceGetRegionInfo(session: HandlerContext, message: Message): Reply {
  noFds(message);
  const req = decodeRegionInfoRequest(message.payload);
  const { device } = session;
  if (req.index >= device.numRegions) throw fail(Errno.EINVAL, Command.DEVICE_GET_REGION_INFO, `no region ${req.index}`);
  const region = device.regionInfo(req.index);
  // A client that takes no fds (max_msg_fds 0) cannot map: it gets the region as trapped-only.
  const trappedOnly = peerMaxFds(session) === 0;
  const { payload, complete } = encodeRegionInfoReply(
    {
      flags: trappedOnly ? region.flags & ~RegionInfoFlags.MMAP : region.flags,
      index: req.index,
      size: region.size,
      offset: region.offset ?? 0n,
      caps: trappedOnly ? region.caps?.filter((cap) => cap.id !== RegionCapId.SPARSE_MMAP) : region.caps,
    },
    req.argsz,
  );
  // The fd goes only with the complete reply (the one a client maps from).
  const withFd = complete && !trappedOnly && region.flags & RegionInfoFlags.MMAP && region.fd !== undefined;
  return { payload, fds: withFd ? [native.dupFd(region.fd!)] : undefined };
}

/**
 * The ioeventfds that fit the client's max_msg_fds, in the device's order:
 * an entry whose fd is already sent costs nothing. The reply describes just
 * those (count and argsz included); writes to the others stay trapped and
 * reach the same eventfd through REGION_WRITE (the device signals it).
 */
export function deviceGetRegionIoFds(session: HandlerContext, message: Message): Reply {
  noFds(message);
  const req = decodeRegionIoFdsRequest(message.payload);
  const { device } = session;
  if (req.index >= device.numRegions) throw fail(Errno.EINVAL, Command.DEVICE_GET_REGION_IO_FDS, `no region ${req.index}`);
  const maxFds = peerMaxFds(session);
  // Entries sharing an eventfd share its fd_index.
  const fds: number[] = [];
  const entries: IoFdEntry[] = [];
  for (const e of device.regionIoFds?.(req.index) ?? []) {
    let fdIndex = fds.indexOf(e.fd);
    if (fdIndex < 0 && fds.length === maxFds) continue;
    if (fdIndex < 0) fdIndex = fds.push(e.fd) - 1;
    entries.push({ offset: e.offset, size: e.size, fdIndex, type: IoFdType.IOEVENTFD, flags: e.flags ?? 0, datamatch: e.datamatch ?? 0n });
  }
  const { payload, complete } = encodeRegionIoFdsReply({ index: req.index, entries }, req.argsz);
  // As for region info: fds only with the complete reply, and always dups.
  return { payload, fds: complete && fds.length > 0 ? fds.map((fd) => native.dupFd(fd)) : undefined };
}

/** Most fds the client said one message to it may carry (VERSION comes first, so it is known). */
function peerMaxFds(session: HandlerContext): number {
  return session.negotiated!.capabilities.maxMsgFds;
}

/** Validates an access against the region and the transfer limit; returns the offset as a number. */
function checkAccess(session: HandlerContext, command: number, region: number, offset: bigint, count: number, flag: number): number {
  const { device } = session;
  if (region >= device.numRegions) throw fail(Errno.EINVAL, command, `no region ${region}`);
  if (count > SERVER_CAPABILITIES.maxDataXferSize) throw fail(Errno.E2BIG, command, `count ${count} exceeds max_data_xfer_size`);
  const info = device.regionInfo(region);
  if (!(info.flags & flag)) throw fail(Errno.EINVAL, command, `region ${region} does not allow this access`);
  if (offset + BigInt(count) > info.size) throw fail(Errno.EINVAL, command, `offset ${offset} + ${count} is past the region's ${info.size} bytes`);
  return Number(offset);
}

export function regionRead(session: HandlerContext, message: Message): Reply | Promise<Reply> {
  noFds(message);
  const a = decodeRegionReadRequest(message.payload, session.scratch);
  const offset = checkAccess(session, Command.REGION_READ, a.region, a.offset, a.count, RegionInfoFlags.READ);
  const reply = allocRegionReadReplyMessage(message.header.msgId, a);
  if (a.count === 0) return { message: reply };
  // `a` is the session's scratch, which the next REGION_READ overwrites while this one may still wait for the device.
  const { region, count } = a;
  const data = session.device.read(region, offset, count);
  const fill = (bytes: Uint8Array): Reply => {
    if (!(bytes instanceof Uint8Array) || bytes.length !== count) {
      throw new HandlerResultError(`device.read of region ${region}`, offset, count, bytes, `a read of ${count} bytes needs a Uint8Array of ${count} bytes`);
    }
    reply.set(bytes, REGION_READ_REPLY_DATA_OFFSET);
    return { message: reply };
  };
  return data instanceof Promise ? data.then(fill) : fill(data);
}

export function regionWrite(session: HandlerContext, message: Message): Reply | Promise<Reply> {
  noFds(message);
  const w = decodeRegionWriteRequest(message.payload);
  const offset = checkAccess(session, Command.REGION_WRITE, w.region, w.offset, w.count, RegionInfoFlags.WRITE);
  const ack = { payload: message.payload.subarray(0, 16) };
  if (w.count === 0) return ack;
  const done = session.device.write(w.region, offset, w.data);
  return done instanceof Promise ? done.then(() => ack) : ack;
}

export async function regionWriteMulti(session: HandlerContext, message: Message): Promise<Reply> {
  noFds(message);
  const entries = decodeRegionWriteMultiRequest(message.payload);
  // All or nothing: a bad entry anywhere refuses the message before any write lands.
  const offsets = entries.map((w) => checkAccess(session, Command.REGION_WRITE_MULTI, w.region, w.offset, w.count, RegionInfoFlags.WRITE));
  for (const [i, w] of entries.entries()) await session.device.write(w.region, offsets[i], w.data);
  return { payload: encodeRegionWriteMultiReply(entries.length) };
}
