import { afterEach, describe, expect, test } from 'vitest';
import { Command, Errno, ProtocolError, connect } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { closedBy, nextMessage, qemuVersion, rawConnect, rawMessage, serve, until, type Served } from './helpers.js';

let served: Served;
afterEach(async () => served?.close());

describe('VERSION negotiation', () => {
  test('answers QEMU with major 0, its own minor capped at the peer’s, and its capabilities', async () => {
    served = await serve();
    const s = await rawConnect(served.path);
    s.write(qemuVersion(7));
    const reply = await nextMessage(s);
    const header = protocol.decodeHeader(reply);
    expect(header).toMatchObject({ msgId: 7, command: Command.VERSION, flags: 1, error: 0 });
    const version = protocol.decodeVersion(reply.subarray(16));
    // QEMU fails on a minor above the 0 it proposed.
    expect(version.major).toBe(0);
    expect(version.minor).toBe(0);
    expect(version.capabilities).toMatchObject({ maxMsgFds: 16, maxDataXferSize: 1048576, maxDmaMaps: 65535, pgsizes: 4096, writeMultiple: true });
    expect(reply[reply.length - 1]).toBe(0);
    s.destroy();
  });

  test('a client proposing a higher minor gets ours', async () => {
    served = await serve();
    const client = await served.client();
    expect(client.server.major).toBe(0);
    expect(client.server.minor).toBe(2);
  });

  test('tolerates unknown and legacy keys and missing JSON', async () => {
    served = await serve();
    for (const json of ['{"capabilities":{"max_fds":8,"future":{"x":1}}}', '']) {
      const s = await rawConnect(served.path);
      const payload = Buffer.concat([Buffer.from([0, 0, 1, 0]), Buffer.from(json), json ? Buffer.from([0]) : Buffer.alloc(0)]);
      s.write(rawMessage({ command: Command.VERSION }, payload));
      const reply = await nextMessage(s);
      expect(protocol.decodeHeader(reply).flags).toBe(1);
      expect(protocol.decodeVersion(reply.subarray(16)).minor).toBe(1);
      s.destroy();
      await until(() => served.server.session === undefined);
    }
  });

  test('any other first message gets EINVAL and the session goes on', async () => {
    served = await serve();
    const s = await rawConnect(served.path);
    s.write(rawMessage({ msgId: 3, command: Command.DEVICE_GET_INFO }, Buffer.from('10000000000000000000000000000000', 'hex')));
    const reply = protocol.decodeHeader(await nextMessage(s));
    expect(reply).toMatchObject({ msgId: 3, command: Command.DEVICE_GET_INFO, flags: 0x21, error: Errno.EINVAL });
    s.write(qemuVersion());
    expect(protocol.decodeHeader(await nextMessage(s)).flags).toBe(1);
    s.destroy();
  });

  test('a major we cannot speak is refused and the next client is served', async () => {
    served = await serve();
    const s = await rawConnect(served.path);
    s.write(rawMessage({ command: Command.VERSION }, Buffer.from([1, 0, 0, 0])));
    const reply = protocol.decodeHeader(await nextMessage(s));
    expect(reply.flags & 0x20).toBe(0x20);
    await closedBy(s);
    const client = await connect(served.path);
    expect((await client.getDeviceInfo()).numRegions).toBe(9);
    client.close();
  });

  test('malformed JSON is EINVAL, and VERSION twice is EINVAL', async () => {
    served = await serve();
    const s = await rawConnect(served.path);
    s.write(rawMessage({ command: Command.VERSION }, Buffer.concat([Buffer.from([0, 0, 0, 0]), Buffer.from('{"capabilities":'), Buffer.from([0])])));
    expect(protocol.decodeHeader(await nextMessage(s)).error).toBe(Errno.EINVAL);
    await closedBy(s);

    const client = await served.client();
    await expect(client.negotiate()).rejects.toThrow(ProtocolError);
    await expect(client.negotiate()).rejects.toMatchObject({ errno: Errno.EINVAL, command: Command.VERSION });
  });
});
