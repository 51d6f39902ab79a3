import { describe, expect, it } from 'vitest';
import {
  Command,
  DeviceFeatureFlags as FF,
  FeatureIndex,
  MigrationFlags,
  MigrationState,
  decodeDeviceFeatureReply,
  decodeDeviceFeatureRequest,
  decodeDmaLoggingReportReply,
  decodeDmaLoggingReportRequest,
  decodeDmaLoggingStart,
  decodeMigDeviceState,
  decodeMigrationFeature,
  dmaLoggingBitmapSize,
  encodeDeviceFeatureReply,
  encodeDeviceFeatureRequest,
  encodeDmaLoggingReportReply,
  encodeDmaLoggingReportRequest,
  encodeDmaLoggingStart,
  encodeDmaLoggingStop,
  encodeMigDeviceState,
  encodeMigrationFeature,
  featureIndex,
} from '../ts/protocol/index.js';
import { expectEinval, hex } from './protocol-helpers.js';

const C = Command.DEVICE_FEATURE;

describe('DEVICE_FEATURE framing', () => {
  it('GET MIGRATION: request and reply with flags u64', () => {
    const request = hex('10000000 01000100');
    const reply = hex('10000000 01000100 0500000000000000');
    const flags = FF.GET | FeatureIndex.MIGRATION;
    expect(encodeDeviceFeatureRequest({ argsz: 16, flags }).toString('hex')).toBe(request.toString('hex'));
    const req = decodeDeviceFeatureRequest(request);
    expect(req).toMatchObject({ argsz: 16, flags });
    expect(req.data.length).toBe(0);
    expect(featureIndex(req.flags)).toBe(FeatureIndex.MIGRATION);

    const data = encodeMigrationFeature({ flags: BigInt(MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY) });
    expect(encodeDeviceFeatureReply({ flags, data }).toString('hex')).toBe(reply.toString('hex'));
    const r = decodeDeviceFeatureReply(reply);
    expect(decodeMigrationFeature(r.data)).toEqual({ flags: 5n });
  });

  it('SET MIG_DEVICE_STATE to STOP_COPY', () => {
    const golden = hex('10000000 02000200 03000000 00000000');
    const flags = FF.SET | FeatureIndex.MIG_DEVICE_STATE;
    const data = encodeMigDeviceState({ deviceState: MigrationState.STOP_COPY });
    expect(encodeDeviceFeatureRequest({ flags, data }).toString('hex')).toBe(golden.toString('hex'));
    const req = decodeDeviceFeatureRequest(golden);
    expect(decodeMigDeviceState(req.data)).toEqual({ deviceState: 3, dataFd: 0 });
  });

  it('accepts GET|SET only together with PROBE', () => {
    expect(decodeDeviceFeatureRequest(hex('08000000 02000700')).flags).toBe(FF.GET | FF.SET | FF.PROBE | 2);
    expectEinval(() => decodeDeviceFeatureRequest(hex('08000000 02000300')), C);
    expectEinval(() => encodeDeviceFeatureRequest({ flags: FF.GET | FF.SET | 2 }), C);
  });

  it('rejects unknown flag bits and short payloads', () => {
    expectEinval(() => decodeDeviceFeatureRequest(hex('08000000 01001100')), C); // bit 20
    expectEinval(() => decodeDeviceFeatureRequest(hex('08000000 010001')), C);
    expectEinval(() => decodeDeviceFeatureReply(hex('0800')), C);
  });
});

describe('feature data', () => {
  it('MIGRATION and MIG_DEVICE_STATE reject short data', () => {
    expectEinval(() => decodeMigrationFeature(hex('05000000')), C);
    expectEinval(() => decodeMigDeviceState(hex('03000000')), C);
  });

  it('DMA_LOGGING_START with one range', () => {
    const golden = hex('0010000000000000 01000000 00000000 0000100000000000 0000200000000000');
    const v = { pageSize: 4096n, ranges: [{ iova: 0x10_0000n, length: 0x20_0000n }] };
    expect(encodeDmaLoggingStart(v).toString('hex')).toBe(golden.toString('hex'));
    expect(decodeDmaLoggingStart(golden)).toEqual(v);
    expect(decodeDmaLoggingStart(hex('0010000000000000 00000000 00000000'))).toEqual({ pageSize: 4096n, ranges: [] });
    expectEinval(() => decodeDmaLoggingStart(hex('0010000000000000 02000000 00000000 0000100000000000 0000200000000000')), C);
    expectEinval(() => decodeDmaLoggingStart(hex('0010000000000000 00000000')), C);
  });

  it('DMA_LOGGING_STOP has no data', () => {
    expect(encodeDmaLoggingStop().length).toBe(0);
  });

  it('DMA_LOGGING_REPORT request and reply with a one-word bitmap', () => {
    const request = hex('0000100000000000 0000040000000000 0010000000000000');
    const reply = hex('0000100000000000 0000040000000000 0010000000000000 0300000000000080');
    const v = { iova: 0x10_0000n, length: 0x4_0000n, pageSize: 0x1000n };
    expect(encodeDmaLoggingReportRequest(v).toString('hex')).toBe(request.toString('hex'));
    expect(decodeDmaLoggingReportRequest(request)).toEqual(v);
    const bitmap = hex('0300000000000080');
    expect(encodeDmaLoggingReportReply({ ...v, bitmap }).toString('hex')).toBe(reply.toString('hex'));
    const r = decodeDmaLoggingReportReply(reply);
    expect(r).toMatchObject(v);
    expect(r.bitmap.readBigUInt64LE(0)).toBe(0x8000_0000_0000_0003n);
    expectEinval(() => decodeDmaLoggingReportRequest(request.subarray(0, 16)), C);
    expectEinval(() => decodeDmaLoggingReportReply(Buffer.concat([reply, hex('00')])), C);
    expectEinval(() => encodeDmaLoggingReportReply({ ...v, bitmap: hex('00') }), C);
  });

  it('sizes bitmaps in whole u64 words', () => {
    expect(dmaLoggingBitmapSize(0x4_0000n, 4096n)).toBe(8); // 64 pages
    expect(dmaLoggingBitmapSize(0x4_1000n, 4096n)).toBe(16); // 65 pages
    expect(dmaLoggingBitmapSize(1n, 4096n)).toBe(8);
    expect(dmaLoggingBitmapSize(0n, 4096n)).toBe(0);
    expectEinval(() => dmaLoggingBitmapSize(0x1000n, 3000n), C);
  });
});
