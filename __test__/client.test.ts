/** The client against our server: the commands the GPIO card does not support, timeouts, closing. */
import { once } from 'node:events';
import { createServer as createNetServer } from 'node:net';
import { constants as os } from 'node:os';
import { afterEach, describe, expect, test } from 'vitest';
import { Command, connect, ConnectionClosedError, Errno, PciDevice, Region, TimeoutError, TooManyRequestsError, VfioUserClient } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { native } from '../ts/native.js';
import { serve, tempSocketPath, type Served } from './helpers.js';

let served: Served;
afterEach(async () => served?.close());

describe('client', () => {
  test('DEVICE_FEATURE and migration data on a device without migration are ENOTSUP', async () => {
    const plain = await serve(new PciDevice({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0, migration: false }));
    try {
      const client = await plain.client();
      const get = protocol.DeviceFeatureFlags.GET | protocol.FeatureIndex.MIGRATION;
      await expect(client.deviceFeature(get, undefined, 16)).rejects.toMatchObject({ errno: Errno.ENOTSUP, command: Command.DEVICE_FEATURE });
      await expect(client.migDataRead(4096)).rejects.toMatchObject({ errno: Errno.ENOTSUP, command: Command.MIG_DATA_READ });
      await expect(client.migDataWrite(Buffer.alloc(16))).rejects.toMatchObject({ errno: Errno.ENOTSUP, command: Command.MIG_DATA_WRITE });
    } finally {
      await plain.close();
    }
  });

  test('a server that never answers times out with TimeoutError', async () => {
    const socket = tempSocketPath();
    const silent = createNetServer((s) => s.resume());
    await new Promise<void>((r) => silent.listen(socket.path, r));
    await expect(connect(socket.path, { timeoutMs: 100 })).rejects.toThrow(TimeoutError);
    silent.close();
    socket.cleanup();
  });

  test('requests after close() and requests pending at close() reject with ConnectionClosedError', async () => {
    served = await serve();
    const client = await served.client();
    const pending = client.getDeviceInfo();
    client.close();
    await expect(pending).rejects.toThrow(ConnectionClosedError);
    await expect(client.getIrqInfo(0)).rejects.toThrow(ConnectionClosedError);
  });

  test('with all 65 536 msg_ids awaiting replies, the next request rejects with TooManyRequestsError', async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    served = await serve(new PciDevice({
      vendorId: 1, deviceId: 2, classCode: 0,
      bars: { 2: { kind: 'io', size: 4, read: async () => { await gate; return 7; } } },
    })) as unknown as Served;
    // 65 536 replies take a while on a loaded machine: no per-request timeout gets in the way.
    const client = await connect(served.path, { timeoutMs: 0 });
    const stalled = client.regionRead(Region.BAR2, 0n, 1);
    const behind = Promise.all(Array.from({ length: 0xffff }, () => client.regionRead(Region.CONFIG, 0n, 2)));
    await expect(client.getDeviceInfo()).rejects.toThrow(TooManyRequestsError);
    release();
    expect((await stalled)[0]).toBe(7);
    expect((await behind).every((b) => b.readUInt16LE(0) === 1)).toBe(true);
    expect((await client.getDeviceInfo()).numRegions).toBe(9);
    client.close();
  });

  test('connecting to nothing fails with the errno in the message', async () => {
    const socket = tempSocketPath();
    await expect(connect(socket.path)).rejects.toThrow(/ENOENT|E2:/);
    socket.cleanup();
  });

  test('a server that drops the connection with our request unread: the errno and the waiting command are named', async () => {
    const [serverEnd, clientEnd] = native.socketPair();
    const client = new VfioUserClient(clientEnd);
    const closed = once(client, 'close');
    const request = client.getDeviceInfo().then(() => undefined, (e: ConnectionClosedError) => e);
    native.closeFd(serverEnd); // the request is still in its receive queue: ECONNRESET
    const error = (await request)!;
    expect(error).toBeInstanceOf(ConnectionClosedError);
    expect(error.message).toBe('DEVICE_GET_INFO: connection lost: ECONNRESET (connection reset by peer)');
    expect([error.errno, error.command]).toEqual([os.errno.ECONNRESET, Command.DEVICE_GET_INFO]);
    const [reported] = (await closed) as [ConnectionClosedError];
    expect([reported.message, reported.errno]).toEqual(['connection lost: ECONNRESET (connection reset by peer)', os.errno.ECONNRESET]);
  });
});
