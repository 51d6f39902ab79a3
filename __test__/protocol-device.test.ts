import { describe, expect, it } from 'vitest';
import {
  Command,
  DeviceInfoFlags,
  decodeDeviceGetInfoReply,
  decodeDeviceGetInfoRequest,
  decodeDeviceResetRequest,
  encodeDeviceGetInfoReply,
  encodeDeviceGetInfoRequest,
  encodeDeviceResetRequest,
} from '../ts/protocol/index.js';
import { expectEinval, hex } from './protocol-helpers.js';

const C = Command.DEVICE_GET_INFO;

describe('DEVICE_GET_INFO', () => {
  const request = hex('10000000 00000000 00000000 00000000');
  const reply = hex('10000000 03000000 09000000 05000000');

  it('encodes and decodes the request', () => {
    expect(encodeDeviceGetInfoRequest().toString('hex')).toBe(request.toString('hex'));
    expect(encodeDeviceGetInfoRequest({ argsz: 64 }).toString('hex')).toBe(
      hex('40000000 00000000 00000000 00000000').toString('hex'),
    );
    expect(decodeDeviceGetInfoRequest(request).argsz).toBe(16);
  });

  it('encodes and decodes the reply (PCI|RESET, 9 regions, 5 IRQ types)', () => {
    const info = { flags: DeviceInfoFlags.PCI | DeviceInfoFlags.RESET, numRegions: 9, numIrqs: 5 };
    expect(encodeDeviceGetInfoReply(info).toString('hex')).toBe(reply.toString('hex'));
    expect(decodeDeviceGetInfoReply(reply)).toEqual({ argsz: 16, ...info });
  });

  it('round-trips a reply with more regions', () => {
    const v = { argsz: 16, flags: 2, numRegions: 12, numIrqs: 5 };
    expect(decodeDeviceGetInfoReply(encodeDeviceGetInfoReply(v))).toEqual(v);
  });

  it('rejects short payloads and argsz < 16', () => {
    expectEinval(() => decodeDeviceGetInfoRequest(request.subarray(0, 15)), C);
    expectEinval(() => decodeDeviceGetInfoRequest(hex('08000000 00000000 00000000 00000000')), C);
    expectEinval(() => decodeDeviceGetInfoReply(reply.subarray(0, 12)), C);
    expectEinval(() => decodeDeviceGetInfoReply(Buffer.alloc(0)), C);
  });
});

describe('DEVICE_RESET', () => {
  it('has empty payloads', () => {
    expect(encodeDeviceResetRequest().length).toBe(0);
    expect(() => decodeDeviceResetRequest(Buffer.alloc(0))).not.toThrow();
    expectEinval(() => decodeDeviceResetRequest(hex('00')), Command.DEVICE_RESET);
  });
});
