/** Server lifecycle: the socket file, one client at a time, state across clients. */
import { statSync, existsSync, writeFileSync } from 'node:fs';
import { afterEach, describe, expect, test } from 'vitest';
import { connect, createServer, Region, UsageError } from '../ts/index.js';
import { PciIdio16 } from '../examples/gpio.js';
import { serve, tempSocketPath, until, type Served } from './helpers.js';

let served: Served;
afterEach(async () => served?.close());

describe('listening', () => {
  test('the socket is owner-only by default and removed on close()', async () => {
    served = await serve();
    expect(statSync(served.path).mode & 0o777).toBe(0o600);
    await served.server.close();
    expect(existsSync(served.path)).toBe(false);
  });

  test('another mode on request; listening twice or on a live socket is refused', async () => {
    const socket = tempSocketPath();
    const server = createServer(new PciIdio16());
    await server.listen(socket.path, { mode: 0o660 });
    expect(statSync(socket.path).mode & 0o777).toBe(0o660);
    await expect(server.listen(socket.path)).rejects.toThrow(UsageError);
    const other = createServer(new PciIdio16());
    await expect(other.listen(socket.path)).rejects.toThrow(/EADDRINUSE|E98/);
    await server.close();
    socket.cleanup();
  });

  test('a regular file at the path is never replaced', async () => {
    const socket = tempSocketPath();
    writeFileSync(socket.path, 'precious');
    await expect(createServer(new PciIdio16()).listen(socket.path)).rejects.toThrow();
    socket.cleanup();
  });
});

describe('clients', () => {
  test('one at a time: the next waits until the first leaves, and sees the same device state', async () => {
    served = await serve();
    const first = await served.client();
    await first.regionWrite(Region.BAR2, 0n, Buffer.from([0x5a]));
    let secondReady = false;
    const second = connect(served.path).then((c) => { secondReady = true; return c; });
    await new Promise((r) => setTimeout(r, 50));
    expect(secondReady).toBe(false);
    first.close();
    const client = await second;
    expect((await client.regionRead(Region.BAR2, 0n, 1))[0]).toBe(0x5a);
    client.close();
  });

  test('events tell connection and disconnect; close() ends the current session', async () => {
    served = await serve();
    const seen: string[] = [];
    served.server.on('connection', () => seen.push('connection'));
    served.server.on('disconnect', (_s, error) => seen.push(error ? 'error' : 'disconnect'));
    const client = await served.client();
    const closed = new Promise<Error | undefined>((r) => client.on('close', r));
    await served.server.close();
    await closed;
    await until(() => seen.length === 2);
    expect(seen).toEqual(['connection', 'disconnect']);
    await expect(client.getDeviceInfo()).rejects.toThrow(/closed/);
  });
});
