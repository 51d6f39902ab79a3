import { describe, expect, it } from 'vitest';
import {
  Command,
  DmaMapFlags,
  DmaUnmapFlags,
  decodeDmaMapRequest,
  decodeDmaReadReply,
  decodeDmaReadRequest,
  decodeDmaUnmapReply,
  decodeDmaUnmapRequest,
  decodeDmaWriteReply,
  decodeDmaWriteRequest,
  encodeDmaMapRequest,
  encodeDmaReadReply,
  encodeDmaReadRequest,
  encodeDmaUnmapReply,
  encodeDmaUnmapRequest,
  encodeDmaWriteReply,
  encodeDmaWriteRequest,
} from '../ts/protocol/index.js';
import { expectEinval, hex } from './protocol-helpers.js';

describe('DMA_MAP', () => {
  // argsz 32, READ|WRITE, offset 0x1000, address 0x1_0000_0000, size 0x20_0000
  const golden = hex('20000000 03000000 0010000000000000 0000000001000000 0000200000000000');
  const value = {
    argsz: 32,
    flags: DmaMapFlags.READ | DmaMapFlags.WRITE,
    offset: 0x1000n,
    address: 0x1_0000_0000n,
    size: 0x20_0000n,
  };

  it('encodes and decodes the 32-byte request', () => {
    const { flags, offset, address, size } = value;
    expect(encodeDmaMapRequest({ flags, offset, address, size }).toString('hex')).toBe(golden.toString('hex'));
    expect(decodeDmaMapRequest(golden)).toEqual(value);
  });

  it('round-trips a large address', () => {
    const v = { argsz: 32, flags: 1, offset: 0n, address: 0xffff_ffff_ffff_f000n, size: 0x1000n };
    expect(decodeDmaMapRequest(encodeDmaMapRequest(v))).toEqual(v);
  });

  it('rejects a short payload and argsz < 32', () => {
    expectEinval(() => decodeDmaMapRequest(golden.subarray(0, 31)), Command.DMA_MAP);
    expectEinval(
      () => decodeDmaMapRequest(hex('18000000 03000000 0010000000000000 0000000001000000 0000200000000000')),
      Command.DMA_MAP,
    );
  });
});

describe('DMA_UNMAP', () => {
  const C = Command.DMA_UNMAP;
  const golden = hex('18000000 00000000 0000000001000000 0000200000000000');
  const value = { argsz: 24, flags: 0, address: 0x1_0000_0000n, size: 0x20_0000n };

  it('encodes and decodes the 24-byte request', () => {
    expect(encodeDmaUnmapRequest({ flags: 0, address: value.address, size: value.size }).toString('hex')).toBe(
      golden.toString('hex'),
    );
    expect(decodeDmaUnmapRequest(golden)).toEqual(value);
  });

  it('rejects argsz < 24', () => {
    expectEinval(() => decodeDmaUnmapRequest(hex('17000000 00000000 0000000001000000 0000200000000000')), C);
  });

  it("decodes QEMU's unmap-all", () => {
    const r = decodeDmaUnmapRequest(hex('18000000 02000000 0000000000000000 0000000000000000'));
    expect(r.flags).toBe(DmaUnmapFlags.ALL);
    expect(r.bitmap).toBeUndefined();
  });

  it('decodes the legacy dirty-bitmap tail', () => {
    const legacy = hex('30000000 01000000 0000000001000000 0000200000000000 0010000000000000 0800000000000000');
    const r = decodeDmaUnmapRequest(legacy);
    expect(r).toEqual({
      argsz: 48,
      flags: DmaUnmapFlags.GET_DIRTY_BITMAP,
      address: 0x1_0000_0000n,
      size: 0x20_0000n,
      bitmap: { pgsize: 4096n, size: 8 },
    });
    const { flags, address, size, bitmap } = r;
    expect(encodeDmaUnmapRequest({ flags, address, size, bitmap }).toString('hex')).toBe(legacy.toString('hex'));
  });

  it('echoes the request in the reply', () => {
    expect(encodeDmaUnmapReply(value).toString('hex')).toBe(golden.toString('hex'));
    expect(decodeDmaUnmapReply(golden)).toEqual(value);
  });

  it('round-trips a legacy reply with bitmap bytes', () => {
    const bytes = hex('30000000 01000000 0000000001000000 0000200000000000 0010000000000000 0800000000000000 ff00000000000080');
    const r = decodeDmaUnmapReply(bytes);
    expect(r.bitmap).toEqual({ pgsize: 4096n, size: 8 });
    expect(r.bitmapData?.toString('hex')).toBe('ff00000000000080');
    expect(encodeDmaUnmapReply(r).toString('hex')).toBe(bytes.toString('hex'));
  });

  it('rejects malformed requests', () => {
    expectEinval(() => decodeDmaUnmapRequest(golden.subarray(0, 23)), C);
    // dirty bit without the 16-byte bitmap header
    expectEinval(() => decodeDmaUnmapRequest(hex('18000000 01000000 0000000001000000 0000200000000000')), C);
    // both bits set
    expectEinval(
      () =>
        decodeDmaUnmapRequest(
          hex('30000000 03000000 0000000000000000 0000000000000000 0010000000000000 0800000000000000'),
        ),
      C,
    );
    // ALL with a non-zero address
    expectEinval(() => decodeDmaUnmapRequest(hex('18000000 02000000 0010000000000000 0000000000000000')), C);
    expectEinval(() => decodeDmaUnmapReply(golden.subarray(0, 20)), C);
    // legacy reply whose bitmap is shorter than its size
    expectEinval(
      () =>
        decodeDmaUnmapReply(
          hex('30000000 01000000 0000000001000000 0000200000000000 0010000000000000 0800000000000000 ff00'),
        ),
      C,
    );
  });
});

describe('DMA_READ', () => {
  const C = Command.DMA_READ;
  const request = hex('0010000000000000 0400000000000000');
  const reply = hex('0010000000000000 0400000000000000 deadbeef');

  it('encodes and decodes the request', () => {
    expect(encodeDmaReadRequest({ address: 0x1000n, count: 4 }).toString('hex')).toBe(request.toString('hex'));
    expect(decodeDmaReadRequest(request)).toEqual({ address: 0x1000n, count: 4 });
  });

  it('encodes and decodes the reply', () => {
    expect(encodeDmaReadReply(0x1000n, hex('deadbeef')).toString('hex')).toBe(reply.toString('hex'));
    const r = decodeDmaReadReply(reply);
    expect(r.address).toBe(0x1000n);
    expect(r.count).toBe(4);
    expect(r.data.toString('hex')).toBe('deadbeef');
  });

  it("accepts QEMU's u32-count form (data at +12)", () => {
    const r = decodeDmaReadReply(hex('0010000000000000 04000000 deadbeef'));
    expect(r).toMatchObject({ address: 0x1000n, count: 4 });
    expect(r.data.toString('hex')).toBe('deadbeef');
  });

  it('rejects a data length that disagrees with count', () => {
    expectEinval(() => decodeDmaReadReply(hex('0010000000000000 0400000000000000 dead')), C);
    expectEinval(() => decodeDmaReadReply(hex('0010000000000000 0400000000000000 deadbeef00')), C);
    expectEinval(() => decodeDmaReadReply(hex('0010')), C);
    expectEinval(() => decodeDmaReadRequest(request.subarray(0, 15)), C);
  });
});

describe('DMA_WRITE', () => {
  const C = Command.DMA_WRITE;
  const request = hex('0020000000000000 0200000000000000 a55a');

  it('encodes and decodes the request', () => {
    expect(encodeDmaWriteRequest(0x2000n, hex('a55a')).toString('hex')).toBe(request.toString('hex'));
    const r = decodeDmaWriteRequest(request);
    expect(r).toMatchObject({ address: 0x2000n, count: 2 });
    expect(r.data.toString('hex')).toBe('a55a');
  });

  it('encodes the 16-byte reply and decodes all three reply forms', () => {
    const full = hex('0020000000000000 0200000000000000');
    expect(encodeDmaWriteReply({ address: 0x2000n, count: 2 }).toString('hex')).toBe(full.toString('hex'));
    expect(decodeDmaWriteReply(full)).toEqual({ address: 0x2000n, count: 2 });
    expect(decodeDmaWriteReply(hex('0020000000000000 02000000'))).toEqual({ address: 0x2000n, count: 2 });
    expect(decodeDmaWriteReply(Buffer.alloc(0))).toBeUndefined(); // QEMU's bare header
  });

  it('rejects malformed messages', () => {
    expectEinval(() => decodeDmaWriteRequest(hex('0020000000000000 0200000000000000 a5')), C);
    expectEinval(() => decodeDmaWriteRequest(hex('0020000000000000 02')), C);
    expectEinval(() => decodeDmaWriteReply(hex('0020000000000000')), C);
    expectEinval(() => decodeDmaWriteReply(hex('0020000000000000 0200000000000000 00')), C);
  });
});
