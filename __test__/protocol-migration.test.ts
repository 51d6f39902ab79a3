import { describe, expect, it } from 'vitest';
import {
  Command,
  decodeMigDataReadReply,
  decodeMigDataReadRequest,
  decodeMigDataWriteRequest,
  encodeMigDataReadReply,
  encodeMigDataReadRequest,
  encodeMigDataWriteReply,
  encodeMigDataWriteRequest,
} from '../ts/protocol/index.js';
import { expectEinval, hex } from './protocol-helpers.js';

describe('MIG_DATA_READ', () => {
  const C = Command.MIG_DATA_READ;

  it('encodes and decodes the request', () => {
    const golden = hex('08010000 00010000');
    expect(encodeMigDataReadRequest({ size: 0x100 }).toString('hex')).toBe(golden.toString('hex'));
    expect(decodeMigDataReadRequest(golden)).toEqual({ argsz: 0x108, size: 0x100 });
  });

  it('rejects argsz < 8 + size and short requests', () => {
    expectEinval(() => decodeMigDataReadRequest(hex('07010000 00010000')), C);
    expectEinval(() => decodeMigDataReadRequest(hex('08010000 0001')), C);
  });

  it('encodes and decodes the reply, taking the length from size', () => {
    const golden = hex('0b000000 03000000 010203');
    expect(encodeMigDataReadReply(hex('010203')).toString('hex')).toBe(golden.toString('hex'));
    expect(encodeMigDataReadReply(hex('010203'), 0x108).toString('hex')).toBe(
      hex('08010000 03000000 010203').toString('hex'),
    );
    const r = decodeMigDataReadReply(golden);
    expect(r).toMatchObject({ argsz: 11, size: 3 });
    expect(r.data.toString('hex')).toBe('010203');
    // Padded to the requested size for libvfio-user's client; size still says 3
    expect(encodeMigDataReadReply(hex('010203'), undefined, 8).toString('hex')).toBe(
      hex('10000000 03000000 010203 0000000000').toString('hex'),
    );
    // libvfio-user allocates the reply at the requested size: trailing bytes are ignored
    const padded = decodeMigDataReadReply(hex('08010000 03000000 010203 00000000'));
    expect(padded.data.toString('hex')).toBe('010203');
  });

  it('rejects a reply whose size exceeds its data', () => {
    expectEinval(() => decodeMigDataReadReply(hex('0c000000 04000000 010203')), C);
    expectEinval(() => decodeMigDataReadReply(hex('0c000000')), C);
  });
});

describe('MIG_DATA_WRITE', () => {
  const C = Command.MIG_DATA_WRITE;

  it('encodes and decodes the request; the reply is empty', () => {
    const golden = hex('0a000000 02000000 cafe');
    expect(encodeMigDataWriteRequest(hex('cafe')).toString('hex')).toBe(golden.toString('hex'));
    const r = decodeMigDataWriteRequest(golden);
    expect(r).toMatchObject({ argsz: 10, size: 2 });
    expect(r.data.toString('hex')).toBe('cafe');
    expect(encodeMigDataWriteReply().length).toBe(0);
  });

  it('rejects argsz < 8 + size', () => {
    expectEinval(() => decodeMigDataWriteRequest(hex('09000000 02000000 cafe')), C);
  });

  it('rejects a request shorter than size', () => {
    expectEinval(() => decodeMigDataWriteRequest(hex('0a000000 02000000 ca')), C);
    expectEinval(() => decodeMigDataWriteRequest(hex('0a000000')), C);
  });
});
