import { describe, expect, it } from 'vitest';
import {
  Command,
  IoFdType,
  KvmIoeventfdFlags,
  REGION_READ_REPLY_DATA_OFFSET,
  Region,
  RegionCapId,
  RegionInfoFlags,
  allocRegionReadReplyMessage,
  decodeHeader,
  decodeRegionInfoReply,
  decodeRegionInfoRequest,
  decodeRegionIoFdsReply,
  decodeRegionIoFdsRequest,
  decodeRegionReadReply,
  decodeRegionReadRequest,
  decodeRegionWriteMultiReply,
  decodeRegionWriteMultiRequest,
  decodeRegionWriteReply,
  decodeRegionWriteRequest,
  encodeRegionInfoReply,
  encodeRegionInfoRequest,
  encodeRegionIoFdsReply,
  encodeRegionIoFdsRequest,
  encodeRegionReadReply,
  encodeRegionReadReplyMessage,
  encodeRegionReadRequest,
  encodeRegionWriteMultiReply,
  encodeRegionWriteMultiRequest,
  encodeRegionWriteReply,
  encodeRegionWriteRequest,
  type RegionAccess,
  type RegionCap,
} from '../ts/protocol/index.js';
import { expectEinval, hex } from './protocol-helpers.js';

describe('DEVICE_GET_REGION_INFO', () => {
  const C = Command.DEVICE_GET_REGION_INFO;
  const RWM = RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP;

  // BAR0, 16 KiB, mmappable except page 0: one sparse area {0x1000, 0x3000}
  const bar0 = { flags: RWM, index: Region.BAR0, size: 0x4000n, offset: 0n, caps: [
    { id: RegionCapId.SPARSE_MMAP, areas: [{ offset: 0x1000n, size: 0x3000n }] },
  ] as RegionCap[] };
  const bar0Full = hex(`
    40000000 0f000000 00000000 20000000 0040000000000000 0000000000000000
    0100 0100 00000000 01000000 00000000 0010000000000000 0030000000000000`);
  // Truncated: CAPS clear with the capabilities left out (QEMU refuses CAPS with cap_offset 0).
  const bar0Fixed = hex('40000000 07000000 00000000 00000000 0040000000000000 0000000000000000');

  it('encodes and decodes the request', () => {
    const req = hex('20000000 00000000 07000000 00000000 0000000000000000 0000000000000000');
    expect(encodeRegionInfoRequest({ index: Region.CONFIG }).toString('hex')).toBe(req.toString('hex'));
    expect(decodeRegionInfoRequest(req)).toEqual({ argsz: 32, index: 7 });
  });

  it('emits caps when the request argsz is large enough', () => {
    const { payload, complete } = encodeRegionInfoReply(bar0, 64);
    expect(payload.toString('hex')).toBe(bar0Full.toString('hex'));
    expect(complete).toBe(true);
  });

  it('emits only the fixed part when argsz is too small (two-step)', () => {
    const { payload, complete } = encodeRegionInfoReply(bar0, 32);
    expect(payload.toString('hex')).toBe(bar0Fixed.toString('hex'));
    expect(complete).toBe(false);
    expect(encodeRegionInfoReply(bar0, 63).complete).toBe(false);
  });

  it('decodes both forms', () => {
    expect(decodeRegionInfoReply(bar0Full)).toEqual({
      argsz: 64,
      flags: RWM | RegionInfoFlags.CAPS,
      index: 0,
      capOffset: 32,
      size: 0x4000n,
      offset: 0n,
      caps: bar0.caps,
      unknownCapIds: [],
    });
    const fixed = decodeRegionInfoReply(bar0Fixed);
    expect(fixed.argsz).toBe(64);
    expect(fixed.caps).toEqual([]);
  });

  it('chains a type cap and a sparse cap by next offsets', () => {
    const golden = hex(`
      50000000 0b000000 09000000 20000000 0010000000000000 0000000010000000
      0200 0100 30000000 03000000 01000000
      0100 0100 00000000 01000000 00000000 0000000000000000 0010000000000000`);
    const caps: RegionCap[] = [
      { id: RegionCapId.TYPE, type: 3, subtype: 1 },
      { id: RegionCapId.SPARSE_MMAP, areas: [{ offset: 0n, size: 0x1000n }] },
    ];
    const info = { flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE, index: 9, size: 0x1000n, offset: 0x10_0000_0000n, caps };
    const { payload, complete } = encodeRegionInfoReply(info, 4096);
    expect(complete).toBe(true);
    expect(payload.toString('hex')).toBe(golden.toString('hex'));
    expect(decodeRegionInfoReply(golden).caps).toEqual(caps);
  });

  it('reports no caps and clears CAPS for a region without them', () => {
    const { payload, complete } = encodeRegionInfoReply(
      { flags: RegionInfoFlags.READ | RegionInfoFlags.CAPS, index: 7, size: 0x100n, offset: 0n },
      32,
    );
    expect(complete).toBe(true);
    expect(payload.toString('hex')).toBe(
      hex('20000000 01000000 07000000 00000000 0001000000000000 0000000000000000').toString('hex'),
    );
  });

  it('skips unknown capability ids', () => {
    const r = decodeRegionInfoReply(hex(`
      30000000 08000000 00000000 20000000 0010000000000000 0000000000000000
      0300 0100 00000000 00000000 00000000`));
    expect(r.caps).toEqual([]);
    expect(r.unknownCapIds).toEqual([3]);
  });

  it('rejects malformed replies and requests', () => {
    const fixed = '40000000 0f000000 00000000 %CAP% 0040000000000000 0000000000000000';
    expectEinval(() => decodeRegionInfoReply(bar0Full.subarray(0, 31)), C);
    // cap_offset inside the fixed part
    expectEinval(() => decodeRegionInfoReply(hex(fixed.replace('%CAP%', '10000000') + '0100 0100 00000000')), C);
    // cap_offset past the end
    expectEinval(() => decodeRegionInfoReply(hex(fixed.replace('%CAP%', '20000000'))), C);
    // a cap whose next points to itself
    expectEinval(
      () => decodeRegionInfoReply(hex(fixed.replace('%CAP%', '20000000') + '0200 0100 20000000 03000000 01000000')),
      C,
    );
    // sparse cap claiming 2 areas with room for 1
    expectEinval(
      () =>
        decodeRegionInfoReply(
          hex(fixed.replace('%CAP%', '20000000') + '0100 0100 00000000 02000000 00000000 0010000000000000 0030000000000000'),
        ),
      C,
    );
    expectEinval(() => decodeRegionInfoRequest(hex('20000000 00000000 07000000')), C);
    expectEinval(
      () => decodeRegionInfoRequest(hex('10000000 00000000 07000000 00000000 0000000000000000 0000000000000000')),
      C,
    );
  });
});

describe('DEVICE_GET_REGION_IO_FDS', () => {
  const C = Command.DEVICE_GET_REGION_IO_FDS;
  const entry = {
    offset: 0x1000n,
    size: 4n,
    fdIndex: 0,
    type: IoFdType.IOEVENTFD,
    flags: KvmIoeventfdFlags.DATAMATCH,
    datamatch: 0x2an,
  };
  const spec40 = hex(`
    38000000 00000000 00000000 01000000
    0010000000000000 0400000000000000 00000000 00000000 01000000 00000000 2a00000000000000`);

  it('encodes and decodes the request', () => {
    const req = hex('38000000 00000000 02000000 00000000');
    expect(encodeRegionIoFdsRequest({ index: 2, argsz: 56 }).toString('hex')).toBe(req.toString('hex'));
    expect(decodeRegionIoFdsRequest(req)).toEqual({ argsz: 56, flags: 0, index: 2, count: 0 });
  });

  it('encodes 40-byte entries and decodes them', () => {
    const { payload, complete } = encodeRegionIoFdsReply({ index: 0, entries: [entry] }, 56);
    expect(complete).toBe(true);
    expect(payload.toString('hex')).toBe(spec40.toString('hex'));
    expect(decodeRegionIoFdsReply(spec40)).toEqual({ argsz: 56, flags: 0, index: 0, count: 1, entries: [entry] });
  });

  it('sends only the header when argsz is too small', () => {
    const { payload, complete } = encodeRegionIoFdsReply({ index: 0, entries: [entry] }, 16);
    expect(complete).toBe(false);
    expect(payload.toString('hex')).toBe(hex('38000000 00000000 00000000 01000000').toString('hex'));
    expect(decodeRegionIoFdsReply(payload)).toEqual({ argsz: 56, flags: 0, index: 0, count: 1, entries: [] });
  });

  it("decodes libvfio-user's 48-byte entries (datamatch at +40)", () => {
    const r = decodeRegionIoFdsReply(hex(`
      40000000 00000000 00000000 01000000
      0010000000000000 0400000000000000 00000000 02000000 01000000 05000000 0080000000000000 2a00000000000000`));
    expect(r.entries).toEqual([
      { ...entry, type: IoFdType.IOEVENTFD_SHADOW, shadowFdIndex: 5, shadowOffset: 0x8000n },
    ]);
  });

  it('decodes two spec entries', () => {
    const two = encodeRegionIoFdsReply({ index: 1, entries: [entry, { ...entry, offset: 0x2000n, fdIndex: 1 }] }, 1024);
    expect(two.payload.length).toBe(16 + 80);
    expect(decodeRegionIoFdsReply(two.payload).entries.map((e) => e.offset)).toEqual([0x1000n, 0x2000n]);
  });

  it('rejects malformed messages', () => {
    expectEinval(() => decodeRegionIoFdsRequest(hex('38000000 01000000 00000000 00000000')), C);
    expectEinval(() => decodeRegionIoFdsRequest(hex('38000000 00000000 00000000 01000000')), C);
    expectEinval(() => decodeRegionIoFdsRequest(hex('38000000 00000000')), C);
    expectEinval(() => decodeRegionIoFdsReply(Buffer.concat([spec40, hex('00000000')])), C); // 44-byte stride
    expectEinval(() => decodeRegionIoFdsReply(Buffer.concat([hex('38000000 00000000 00000000 00000000'), spec40.subarray(16)])), C);
  });
});

describe('REGION_READ', () => {
  const C = Command.REGION_READ;
  const request = hex('1000000000000000 07000000 04000000');
  const access: RegionAccess = { offset: 0x10n, region: Region.CONFIG, count: 4 };

  it('encodes and decodes the request, reusing an out object', () => {
    expect(encodeRegionReadRequest(access).toString('hex')).toBe(request.toString('hex'));
    const out: RegionAccess = { offset: 0n, region: 0, count: 0 };
    expect(decodeRegionReadRequest(request, out)).toBe(out);
    expect(out).toEqual(access);
  });

  it('encodes the reply payload and the whole reply message', () => {
    expect(encodeRegionReadReply(access, hex('deadbeef')).toString('hex')).toBe(
      hex('1000000000000000 07000000 04000000 deadbeef').toString('hex'),
    );
    const msg = encodeRegionReadReplyMessage(5, access, hex('deadbeef'));
    expect(msg.toString('hex')).toBe(
      hex('0500 0900 24000000 01000000 00000000 1000000000000000 07000000 04000000 deadbeef').toString('hex'),
    );
  });

  it('allocates a reply message to fill in place', () => {
    const msg = allocRegionReadReplyMessage(6, access);
    expect(msg.toString('hex')).toBe(
      hex('0600 0900 24000000 01000000 00000000 1000000000000000 07000000 04000000 00000000').toString('hex'),
    );
    msg.writeUInt32LE(0x11223344, REGION_READ_REPLY_DATA_OFFSET);
    expect(decodeHeader(msg).size).toBe(msg.length);
    expect(decodeRegionReadReply(msg.subarray(16)).data.toString('hex')).toBe('44332211');
  });

  it('decodes the reply', () => {
    const r = decodeRegionReadReply(hex('1000000000000000 07000000 04000000 deadbeef'));
    expect(r).toMatchObject(access);
    expect(r.data.toString('hex')).toBe('deadbeef');
  });

  it('rejects inconsistent lengths', () => {
    expectEinval(() => decodeRegionReadRequest(request.subarray(0, 15)), C);
    expectEinval(() => decodeRegionReadRequest(Buffer.concat([request, hex('00')])), C);
    expectEinval(() => decodeRegionReadReply(hex('1000000000000000 07000000 04000000 dead')), C);
    expectEinval(() => decodeRegionReadReply(hex('1000000000000000 07000000 04000000 deadbeef00')), C);
    expectEinval(() => encodeRegionReadReply(access, hex('dead')), C);
    expectEinval(() => encodeRegionReadReplyMessage(1, access, hex('dead')), C);
  });
});

describe('REGION_WRITE', () => {
  const C = Command.REGION_WRITE;
  const request = hex('0400000000000000 00000000 04000000 01020304');

  it('encodes and decodes the request', () => {
    expect(encodeRegionWriteRequest({ offset: 4n, region: Region.BAR0 }, hex('01020304')).toString('hex')).toBe(
      request.toString('hex'),
    );
    const r = decodeRegionWriteRequest(request);
    expect(r).toMatchObject({ offset: 4n, region: 0, count: 4 });
    expect(r.data.toString('hex')).toBe('01020304');
  });

  it('encodes and decodes the reply', () => {
    const reply = hex('0400000000000000 00000000 04000000');
    expect(encodeRegionWriteReply({ offset: 4n, region: 0, count: 4 }).toString('hex')).toBe(reply.toString('hex'));
    expect(decodeRegionWriteReply(reply)).toEqual({ offset: 4n, region: 0, count: 4 });
  });

  it('requires a body of exactly 16 + count bytes', () => {
    expectEinval(() => decodeRegionWriteRequest(request.subarray(0, 19)), C);
    expectEinval(() => decodeRegionWriteRequest(Buffer.concat([request, hex('05')])), C);
    expectEinval(() => decodeRegionWriteRequest(request.subarray(0, 12)), C);
    expectEinval(() => decodeRegionWriteReply(request), C);
  });
});

describe('REGION_WRITE_MULTI', () => {
  const C = Command.REGION_WRITE_MULTI;
  const golden = hex(`
    0200000000000000
    1000000000000000 00000000 01000000 aa00000000000000
    2000000000000000 02000000 08000000 0102030405060708`);

  it('encodes and decodes the request', () => {
    const entries = [
      { offset: 0x10n, region: 0, data: hex('aa') },
      { offset: 0x20n, region: 2, data: hex('0102030405060708') },
    ];
    expect(encodeRegionWriteMultiRequest(entries).toString('hex')).toBe(golden.toString('hex'));
    const d = decodeRegionWriteMultiRequest(golden);
    expect(d.map((e) => [e.offset, e.region, e.count, e.data.toString('hex')])).toEqual([
      [0x10n, 0, 1, 'aa'],
      [0x20n, 2, 8, '0102030405060708'],
    ]);
  });

  it('encodes and decodes the reply', () => {
    expect(encodeRegionWriteMultiReply(2).toString('hex')).toBe(hex('0200000000000000').toString('hex'));
    expect(decodeRegionWriteMultiReply(hex('c800000000000000'))).toBe(200);
  });

  it('rejects malformed messages', () => {
    expectEinval(() => decodeRegionWriteMultiRequest(golden.subarray(0, golden.length - 1)), C);
    expectEinval(() => decodeRegionWriteMultiRequest(Buffer.concat([hex('03'), golden.subarray(1)])), C);
    expectEinval(() => decodeRegionWriteMultiRequest(hex('01000000 0000000000000000 00000000 09000000 0000000000000000')), C);
    expectEinval(() => decodeRegionWriteMultiRequest(hex('0100')), C);
    expectEinval(() => encodeRegionWriteMultiRequest([{ offset: 0n, region: 0, data: Buffer.alloc(9) }]), C);
    expectEinval(() => decodeRegionWriteMultiReply(hex('02000000')), C);
  });
});
