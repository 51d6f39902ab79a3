import { describe, expect, it } from 'vitest';
import {
  Command,
  Errno,
  HEADER_SIZE,
  HeaderFlags,
  MessageType,
  ProtocolError,
  commandName,
  decodeHeader,
  encodeErrorReply,
  encodeHeader,
  encodeMessage,
  encodeReply,
  errnoName,
  errorReplyErrno,
  isErrorReply,
  isReply,
  isValidType,
  messageType,
  wantsReply,
} from '../ts/protocol/index.js';
import { expectEinval, hex } from './protocol-helpers.js';

describe('constants', () => {
  it('numbers commands as in the digest §5', () => {
    expect(Command.VERSION).toBe(1);
    expect(Command.REGION_READ).toBe(9);
    expect(Command.DEVICE_RESET).toBe(13);
    expect(Command.REGION_WRITE_MULTI).toBe(15);
    expect(Command.MIG_DATA_WRITE).toBe(18);
    expect(HEADER_SIZE).toBe(16);
  });

  it('names commands, unknown ones included', () => {
    expect(commandName(9)).toBe('REGION_READ');
    expect(commandName(16)).toBe('DEVICE_FEATURE');
    expect(commandName(14)).toBe('UNKNOWN(14)');
    expect(commandName(0)).toBe('UNKNOWN(0)');
  });

  it('names errnos', () => {
    expect(errnoName(22)).toBe('EINVAL');
    expect(errnoName(71)).toBe('EPROTO');
    expect(errnoName(95)).toBe('ENOTSUP');
    expect(errnoName(107)).toBe('ENOTCONN');
    expect(errnoName(4000)).toBe('errno 4000');
  });
});

describe('ProtocolError', () => {
  it('names the command and the errno', () => {
    const e = new ProtocolError(Errno.EINVAL, Command.REGION_READ, 'offset past the region end');
    expect(e).toBeInstanceOf(Error);
    expect(e.message).toBe('REGION_READ failed: EINVAL (offset past the region end)');
    expect(e.errno).toBe(22);
    expect(e.command).toBe(9);
    expect(new ProtocolError(Errno.ENOENT, Command.DMA_UNMAP).message).toBe('DMA_UNMAP failed: ENOENT');
  });
});

describe('header', () => {
  // msg_id 0x1234, command 9, msg_size 20, flags No_reply, error 0, 4 payload bytes
  const golden = hex('3412 0900 14000000 10000000 00000000 aabbccdd');

  it('encodes a command with a payload', () => {
    const m = encodeMessage(
      { msgId: 0x1234, command: Command.REGION_READ, flags: HeaderFlags.NO_REPLY },
      hex('aabbccdd'),
    );
    expect(m.toString('hex')).toBe(golden.toString('hex'));
  });

  it('decodes the same bytes', () => {
    expect(decodeHeader(golden)).toEqual({ msgId: 0x1234, command: 9, size: 20, flags: 0x10, error: 0 });
  });

  it('decodes at an offset and from a plain Uint8Array', () => {
    const buf = Buffer.concat([hex('ffff'), golden]);
    expect(decodeHeader(new Uint8Array(buf), 2).msgId).toBe(0x1234);
  });

  it('encodeHeader writes into an existing buffer', () => {
    const b = Buffer.alloc(20, 0xee);
    encodeHeader(b, { msgId: 1, command: 4, size: 32, flags: 1, error: 0 }, 2);
    expect(b.toString('hex')).toBe(hex('eeee 0100 0400 20000000 01000000 00000000 eeee').toString('hex'));
  });

  it('encodes a bare error reply', () => {
    const m = encodeErrorReply(7, Command.REGION_READ, Errno.EINVAL);
    expect(m.toString('hex')).toBe(hex('0700 0900 10000000 21000000 16000000').toString('hex'));
    const h = decodeHeader(m);
    expect(isReply(h)).toBe(true);
    expect(isErrorReply(h)).toBe(true);
    expect(wantsReply(h)).toBe(false);
  });

  it('encodes a plain reply', () => {
    const m = encodeReply(3, Command.DEVICE_RESET);
    expect(m.toString('hex')).toBe(hex('0300 0d00 10000000 01000000 00000000').toString('hex'));
  });

  it('classifies message types', () => {
    expect(messageType(0x31)).toBe(MessageType.REPLY);
    expect(wantsReply({ flags: 0 })).toBe(true);
    expect(wantsReply({ flags: HeaderFlags.NO_REPLY })).toBe(false);
    expect(isErrorReply({ flags: HeaderFlags.ERROR })).toBe(false); // a command, not a reply
    expect(isValidType(0)).toBe(true);
    expect(isValidType(1 | HeaderFlags.ERROR)).toBe(true);
    expect(isValidType(2)).toBe(false);
  });

  it('maps error values outside 1..4096 to EINVAL', () => {
    expect(errorReplyErrno({ error: 0 })).toBe(Errno.EINVAL);
    expect(errorReplyErrno({ error: 5000 })).toBe(Errno.EINVAL);
    expect(errorReplyErrno({ error: 2 })).toBe(Errno.ENOENT);
  });

  it('rejects a short header and a msg_size below 16', () => {
    expectEinval(() => decodeHeader(golden.subarray(0, 15)), 0);
    expectEinval(() => decodeHeader(hex('0100 0400 0f000000 00000000 00000000')), Command.DEVICE_GET_INFO);
  });
});
