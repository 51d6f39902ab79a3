import { describe, expect, it } from 'vitest';
import {
  Command,
  DEFAULT_CAPABILITIES,
  ProtocolError,
  decodeVersion,
  encodeVersion,
  negotiateVersion,
} from '../ts/protocol/index.js';
import { expectEinval, hex } from './protocol-helpers.js';

const V = Command.VERSION;

/** The exact JSON QEMU 10.1 sends (digest §4). */
const QEMU_JSON =
  '{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}';

function payload(versionHex: string, json: string, nul = true): Buffer {
  return Buffer.concat([hex(versionHex), Buffer.from(json, 'utf8'), nul ? hex('00') : Buffer.alloc(0)]);
}

describe('VERSION decode', () => {
  it("decodes QEMU's request, legacy migration key included", () => {
    const v = decodeVersion(payload('0000 0000', QEMU_JSON));
    expect(v.major).toBe(0);
    expect(v.minor).toBe(0);
    expect(v.capabilities).toEqual({
      maxMsgFds: 16,
      maxDataXferSize: 1048576,
      maxDmaMaps: 65535,
      pgsizes: 4096,
      twinSocket: { supported: false },
      writeMultiple: true,
      migration: { pgsize: 4096, maxBitmapSize: 268435456 },
    });
    expect(v.unknownKeys).toEqual([]);
    expect(v.presentKeys).toContain('max_msg_fds');
    expect(v.presentKeys).not.toContain('twin_socket');
  });

  it('reads major and minor little-endian', () => {
    const v = decodeVersion(hex('0100 0200'));
    expect([v.major, v.minor]).toEqual([1, 2]);
  });

  it('fills defaults for a bare 4-byte payload, empty JSON and {}', () => {
    const defaults = { ...DEFAULT_CAPABILITIES, twinSocket: { supported: false } };
    expect(decodeVersion(hex('0000 0000')).capabilities).toEqual(defaults);
    expect(decodeVersion(hex('0000 0000 00')).capabilities).toEqual(defaults);
    expect(decodeVersion(payload('0000 0000', '{}')).capabilities).toEqual(defaults);
    expect(decodeVersion(payload('0000 0000', '{"capabilities":{}}')).capabilities).toEqual(defaults);
    expect(defaults).toEqual({
      maxMsgFds: 1,
      maxDataXferSize: 1048576,
      maxDmaMaps: 65535,
      pgsizes: 4096,
      twinSocket: { supported: false },
      writeMultiple: false,
    });
  });

  it('tolerates a missing NUL', () => {
    const v = decodeVersion(payload('0000 0100', '{"capabilities":{"max_msg_fds":8}}', false));
    expect(v.capabilities.maxMsgFds).toBe(8);
    expect(v.minor).toBe(1);
  });

  it('reports unknown keys (alioth max_fds) without failing', () => {
    const v = decodeVersion(
      payload('0000 0200', '{"foo":1,"capabilities":{"max_fds":4,"twin_socket":{"supported":true,"x":0}}}'),
    );
    expect(v.unknownKeys).toEqual(['foo', 'capabilities.max_fds', 'capabilities.twin_socket.x']);
    expect(v.capabilities.twinSocket).toEqual({ supported: true });
    expect(v.capabilities.maxMsgFds).toBe(1);
  });

  it('decodes a twin-socket reply', () => {
    const v = decodeVersion(payload('0000 0000', '{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}'));
    expect(v.capabilities.twinSocket).toEqual({ supported: true, fdIndex: 0 });
  });

  it('rejects malformed payloads with EINVAL', () => {
    expectEinval(() => decodeVersion(hex('000000')), V);
    expectEinval(() => decodeVersion(payload('0000 0000', '{"capabilities":')), V);
    expectEinval(() => decodeVersion(payload('0000 0000', '[]')), V);
    expectEinval(() => decodeVersion(payload('0000 0000', '{"capabilities":5}')), V);
    expectEinval(() => decodeVersion(payload('0000 0000', '{"capabilities":{"max_msg_fds":"16"}}')), V);
    expectEinval(() => decodeVersion(payload('0000 0000', '{"capabilities":{"max_msg_fds":-1}}')), V);
    expectEinval(() => decodeVersion(payload('0000 0000', '{"capabilities":{"pgsizes":4096.5}}')), V);
    expectEinval(() => decodeVersion(payload('0000 0000', '{"capabilities":{"write_multiple":1}}')), V);
    expectEinval(() => decodeVersion(payload('0000 0000', '{"capabilities":{"twin_socket":true}}')), V);
    expectEinval(
      () => decodeVersion(payload('0000 0000', '{"capabilities":{"twin_socket":{"supported":"yes"}}}')),
      V,
    );
    expectEinval(() => decodeVersion(payload('0000 0000', '{"capabilities":{"migration":{}}}')), V);
    expectEinval(() => decodeVersion(Buffer.concat([hex('0000 0000'), hex('7b ff 7d 00')])), V);
  });
});

describe('VERSION encode', () => {
  it('writes only major/minor without capabilities', () => {
    expect(encodeVersion({ major: 0, minor: 1 }).toString('hex')).toBe(hex('0000 0100').toString('hex'));
  });

  it('writes snake_case keys in digest order, only those given, NUL-terminated', () => {
    const out = encodeVersion({
      major: 0,
      minor: 2,
      capabilities: {
        writeMultiple: false,
        twinSocket: { supported: true, fdIndex: 0 },
        maxMsgFds: 8,
        maxDataXferSize: 1048576,
      },
    });
    const expected = payload(
      '0000 0200',
      '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"twin_socket":{"supported":true,"fd_index":0},"write_multiple":false}}',
    );
    expect(out.toString('hex')).toBe(expected.toString('hex'));
    expect(out[out.length - 1]).toBe(0);
  });

  it('writes an empty capabilities object when given {}', () => {
    expect(encodeVersion({ major: 0, minor: 0, capabilities: {} }).toString('hex')).toBe(
      payload('0000 0000', '{"capabilities":{}}').toString('hex'),
    );
  });

  it('round-trips every key, legacy migration included', () => {
    const caps = {
      maxMsgFds: 16,
      maxDataXferSize: 65536,
      maxDmaMaps: 100,
      pgsizes: 4096 | 2097152,
      twinSocket: { supported: true, fdIndex: 1 },
      writeMultiple: true,
      migration: { pgsize: 4096, maxBitmapSize: 268435456 },
    };
    const v = decodeVersion(encodeVersion({ major: 0, minor: 3, capabilities: caps }));
    expect(v.capabilities).toEqual(caps);
    expect(v.minor).toBe(3);
    expect(v.unknownKeys).toEqual([]);
  });

  it("re-encodes the capabilities decoded from QEMU's JSON", () => {
    // Key order differs from QEMU's (we use the digest's order), so compare parsed values.
    const ours = decodeVersion(
      encodeVersion({ major: 0, minor: 0, capabilities: decodeVersion(payload('0000 0000', QEMU_JSON)).capabilities }),
    );
    expect(ours.capabilities.writeMultiple).toBe(true);
    expect(ours.capabilities.maxMsgFds).toBe(16);
  });

  it('refuses invalid capability values', () => {
    expectEinval(() => encodeVersion({ major: 0, minor: 0, capabilities: { maxMsgFds: -1 } }), V);
    expectEinval(() => encodeVersion({ major: 0, minor: 0, capabilities: { pgsizes: 1.5 } }), V);
  });
});

describe('negotiateVersion', () => {
  it('replies major 0 and the smaller minor', () => {
    expect(negotiateVersion({ major: 0, minor: 5 }, { major: 0, minor: 2 })).toEqual({ major: 0, minor: 2 });
    expect(negotiateVersion({ major: 0, minor: 0 }, { major: 0, minor: 2 })).toEqual({ major: 0, minor: 0 });
    expect(negotiateVersion({ major: 0, minor: 1 }, { major: 0, minor: 1 })).toEqual({ major: 0, minor: 1 });
  });

  it('throws for a major other than 0', () => {
    expect(() => negotiateVersion({ major: 1, minor: 0 }, { major: 0, minor: 2 })).toThrow(ProtocolError);
    expect(() => negotiateVersion({ major: 1, minor: 0 }, { major: 0, minor: 2 })).toThrow(/^VERSION failed/);
  });
});
