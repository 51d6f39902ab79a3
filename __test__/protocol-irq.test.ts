import { describe, expect, it } from 'vitest';
import {
  Command,
  Errno,
  IrqIndex,
  IrqInfoFlags,
  SetIrqsFlags as F,
  decodeIrqInfoReply,
  decodeIrqInfoRequest,
  decodeSetIrqsRequest,
  encodeIrqInfoReply,
  encodeIrqInfoRequest,
  encodeSetIrqsRequest,
  validateSetIrqs,
} from '../ts/protocol/index.js';
import { expectEinval, hex } from './protocol-helpers.js';

describe('DEVICE_GET_IRQ_INFO', () => {
  const C = Command.DEVICE_GET_IRQ_INFO;
  const request = hex('10000000 00000000 02000000 00000000');
  const reply = hex('10000000 01000000 02000000 20000000');

  it('encodes and decodes the request', () => {
    expect(encodeIrqInfoRequest({ index: IrqIndex.MSIX }).toString('hex')).toBe(request.toString('hex'));
    expect(decodeIrqInfoRequest(request)).toEqual({ argsz: 16, flags: 0, index: 2, count: 0 });
  });

  it('encodes and decodes the reply (MSI-X, EVENTFD, 32 vectors)', () => {
    const v = { flags: IrqInfoFlags.EVENTFD, index: IrqIndex.MSIX, count: 32 };
    expect(encodeIrqInfoReply(v).toString('hex')).toBe(reply.toString('hex'));
    expect(decodeIrqInfoReply(reply)).toEqual({ argsz: 16, ...v });
  });

  it('rejects short payloads and argsz < 16', () => {
    expectEinval(() => decodeIrqInfoRequest(request.subarray(0, 8)), C);
    expectEinval(() => decodeIrqInfoRequest(hex('0c000000 00000000 02000000 00000000')), C);
    expectEinval(() => decodeIrqInfoReply(reply.subarray(0, 15)), C);
  });
});

describe('DEVICE_SET_IRQS', () => {
  const C = Command.DEVICE_SET_IRQS;

  it('encodes and decodes EVENTFD|TRIGGER for MSI-X vectors 0..3', () => {
    const golden = hex('14000000 24000000 02000000 00000000 04000000');
    const v = { flags: F.DATA_EVENTFD | F.ACTION_TRIGGER, index: IrqIndex.MSIX, start: 0, count: 4 };
    expect(encodeSetIrqsRequest(v).toString('hex')).toBe(golden.toString('hex'));
    expect(decodeSetIrqsRequest(golden)).toEqual({ argsz: 20, ...v });
  });

  it('encodes and decodes DATA_BOOL with its bytes', () => {
    const golden = hex('16000000 22000000 00000000 00000000 02000000 0100');
    const v = { flags: F.DATA_BOOL | F.ACTION_TRIGGER, index: IrqIndex.INTX, start: 0, count: 2, bools: [true, false] };
    expect(encodeSetIrqsRequest(v).toString('hex')).toBe(golden.toString('hex'));
    expect(decodeSetIrqsRequest(golden)).toEqual({ argsz: 22, ...v });
  });

  it('rejects argsz < 20', () => {
    expectEinval(() => decodeSetIrqsRequest(hex('13000000 21000000 01000000 00000000 00000000')), C);
  });

  it('decodes the disable-all form', () => {
    const r = decodeSetIrqsRequest(hex('14000000 21000000 01000000 00000000 00000000'));
    expect(r).toEqual({ argsz: 20, flags: F.DATA_NONE | F.ACTION_TRIGGER, index: 1, start: 0, count: 0 });
    expect(validateSetIrqs(r, 0, 8)).toBe(0);
  });

  it('rejects bad flags, bool byte counts and short payloads', () => {
    const req = (flags: string, count = '01000000', tail = '') =>
      hex(`14000000 ${flags} 02000000 00000000 ${count} ${tail}`);
    expectEinval(() => decodeSetIrqsRequest(req('26000000')), C); // two DATA bits
    expectEinval(() => decodeSetIrqsRequest(req('04000000')), C); // no ACTION bit
    expectEinval(() => decodeSetIrqsRequest(req('38000000')), C); // no DATA bit, three ACTION bits
    expectEinval(() => decodeSetIrqsRequest(req('19000000')), C); // NONE + MASK|UNMASK
    expectEinval(() => decodeSetIrqsRequest(req('64000000')), C); // unknown bit 0x40
    expectEinval(() => decodeSetIrqsRequest(req('22000000', '02000000', '01')), C); // 1 bool for count 2
    expectEinval(() => decodeSetIrqsRequest(req('22000000', '01000000', '0101')), C); // 2 bools for count 1
    expectEinval(() => decodeSetIrqsRequest(hex('14000000 24000000 02000000 00000000 040000')), C);
    expectEinval(
      () => encodeSetIrqsRequest({ flags: F.DATA_BOOL | F.ACTION_TRIGGER, index: 0, start: 0, count: 2, bools: [true] }),
      C,
    );
    expectEinval(() => encodeSetIrqsRequest({ flags: F.DATA_NONE, index: 0, start: 0, count: 1 }), C);
  });
});

describe('validateSetIrqs (§6.8)', () => {
  const evt = F.DATA_EVENTFD | F.ACTION_TRIGGER;
  const cases: [string, { flags: number; index: number; start: number; count: number }, number, number, number][] = [
    ['assign 4 eventfds', { flags: evt, index: 2, start: 0, count: 4 }, 4, 32, 0],
    ['de-assign (no fds)', { flags: evt, index: 2, start: 2, count: 2 }, 0, 32, 0],
    ['fd count differs from count', { flags: evt, index: 2, start: 0, count: 4 }, 3, 32, Errno.EINVAL],
    ['fds with DATA_NONE', { flags: F.DATA_NONE | F.ACTION_TRIGGER, index: 2, start: 0, count: 1 }, 1, 32, Errno.EINVAL],
    ['fds with DATA_BOOL', { flags: F.DATA_BOOL | F.ACTION_MASK, index: 0, start: 0, count: 1 }, 1, 1, Errno.EINVAL],
    ['start + count past the end', { flags: evt, index: 2, start: 30, count: 4 }, 4, 32, Errno.EINVAL],
    ['start at the end', { flags: evt, index: 2, start: 32, count: 1 }, 1, 32, Errno.EINVAL],
    ['last vector', { flags: evt, index: 2, start: 31, count: 1 }, 1, 32, 0],
    ['count 0 with start 1', { flags: F.DATA_NONE | F.ACTION_TRIGGER, index: 1, start: 1, count: 0 }, 0, 8, Errno.EINVAL],
    ['count 0 with DATA_EVENTFD', { flags: evt, index: 1, start: 0, count: 0 }, 0, 8, Errno.EINVAL],
    ['count 0 with MASK', { flags: F.DATA_NONE | F.ACTION_MASK, index: 1, start: 0, count: 0 }, 0, 8, Errno.EINVAL],
    ['ERR trigger count 1', { flags: evt, index: IrqIndex.ERR, start: 0, count: 1 }, 1, 1, 0],
    ['REQ mask', { flags: F.DATA_NONE | F.ACTION_MASK, index: IrqIndex.REQ, start: 0, count: 1 }, 0, 1, Errno.EINVAL],
    ['ERR count 2', { flags: evt, index: IrqIndex.ERR, start: 0, count: 2 }, 2, 2, Errno.EINVAL],
    ['INTx unmask bool', { flags: F.DATA_BOOL | F.ACTION_UNMASK, index: 0, start: 0, count: 1 }, 0, 1, 0],
    ['two DATA bits', { flags: F.DATA_BOOL | F.DATA_NONE | F.ACTION_TRIGGER, index: 0, start: 0, count: 1 }, 0, 1, Errno.EINVAL],
  ];
  for (const [name, req, fds, irqs, want] of cases) {
    it(name, () => expect(validateSetIrqs(req, fds, irqs)).toBe(want));
  }
});
