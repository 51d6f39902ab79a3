/**
 * Random input from a peer, with a fixed seed so a failure replays: the
 * server answers or disconnects, never crashes, leaks no fd, keeps the
 * device state, and serves the next client.
 */
import { describe, expect, test } from 'vitest';
import { Command, Region } from '../ts/index.js';
import * as protocol from '../ts/protocol/index.js';
import { native } from '../ts/native.js';
import { Channel } from '../ts/channel.js';
import { closedBy, nextMessage, openFdCount, qemuVersion, rawConnect, rawMessage, serve, until } from './helpers.js';

/** xorshift32: small, deterministic, good enough to pick bytes. */
function random(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

const COMMANDS = [...Object.values(Command), 0, 14, 19, 0xffff];

describe('fuzzed peers', () => {
  test('well-framed messages with random commands, flags and bodies', async () => {
    const served = await serve();
    served.device.setInputs(0x1234);
    const next = random(0x5eed);
    const s = await rawConnect(served.path);
    s.write(qemuVersion());
    await nextMessage(s);
    for (let i = 0; i < 2000; i++) {
      const command = COMMANDS[Math.floor(next() * COMMANDS.length)];
      const body = Buffer.alloc(Math.floor(next() * 64));
      for (let j = 0; j < body.length; j++) body[j] = Math.floor(next() * 256);
      // Commands only (a random type would end the session, tested below); half of them posted.
      const flags = next() < 0.5 ? 0x10 : 0;
      s.write(rawMessage({ msgId: i & 0xffff, command, flags }, body));
    }
    // A final request in step with everything before it proves the stream was never desynchronised.
    s.write(rawMessage({ msgId: 0xbeef, command: Command.REGION_READ }, Buffer.from('0100000000000000020000000100000000', 'hex').subarray(0, 16)));
    let reply: Buffer;
    do reply = await nextMessage(s, 10000);
    while (protocol.decodeHeader(reply).msgId !== 0xbeef);
    expect(reply[32]).toBe(0x34); // inputs 0-7, untouched by the noise
    s.destroy();
    const client = await served.client();
    expect((await client.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).toBe(0x494f);
    await served.close();
  });

  test('random bytes on the wire make the server end the session, and fds sent with them are closed', async () => {
    const served = await serve();
    const before = openFdCount();
    const next = random(0xfeed);
    const garbage = () => {
      const bytes = Buffer.alloc(16 + Math.floor(next() * 256));
      for (let j = 0; j < bytes.length; j++) bytes[j] = Math.floor(next() * 256);
      return bytes;
    };
    for (let round = 0; round < 20; round++) {
      // onClose hears only the peer's close: the client never closes first here.
      let serverClosed = false;
      const channel = new Channel(native.connectUnix(served.path), { side: 'client', onCommand: () => {}, onClose: () => (serverClosed = true) });
      await channel.request(Command.VERSION, Buffer.from([0, 0, 0, 0]));
      const ev = native.eventfdCreate();
      channel.send(garbage(), [ev]);
      native.closeFd(ev);
      // A random header may announce a body the server waits for: more noise follows until it gives up.
      for (let more = 0; !serverClosed; more++) {
        expect(more).toBeLessThan(1000);
        await new Promise((r) => setTimeout(r, 1));
        if (!serverClosed) channel.send(garbage());
      }
      expect(channel.closed).toBe(true);
    }
    await until(() => served.server.session === undefined);
    const s = await rawConnect(served.path);
    s.write(qemuVersion());
    expect(protocol.decodeHeader(await nextMessage(s)).flags).toBe(1);
    s.end();
    await closedBy(s);
    await until(() => openFdCount() === before);
    await served.close();
  });
});
