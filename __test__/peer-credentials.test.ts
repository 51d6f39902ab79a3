/**
 * `allowedPeers`: the server accepts only processes whose SO_PEERCRED
 * credentials it allows, closing the others at accept, before VERSION.
 */
import { execFile } from 'node:child_process';
import { chmodSync } from 'node:fs';
import { dirname } from 'node:path';
import { once } from 'node:events';
import { promisify } from 'node:util';
import { afterEach, describe, expect, test } from 'vitest';
import { connect, ConnectionClosedError, createServer, type PeerCredentials, type VfioUserServer } from '../ts/index.js';
import { PciIdio16 } from '../examples/gpio.js';
import { tempSocketPath } from './helpers.js';

let server: VfioUserServer | undefined;
let cleanup: (() => void) | undefined;
afterEach(async () => {
  await server?.close();
  cleanup?.();
  server = undefined;
  cleanup = undefined;
});

async function listen(options: Parameters<typeof createServer>[1], mode?: number): Promise<string> {
  const socket = tempSocketPath();
  cleanup = socket.cleanup;
  server = createServer(new PciIdio16(), options);
  await server.listen(socket.path, { mode });
  return socket.path;
}

const NOBODY = 65534;

describe('allowedPeers', () => {
  test('a peer whose uid is not listed is closed before VERSION and reported', async () => {
    const path = await listen({ allowedPeers: { uids: [process.getuid!() + 1] } });
    const refused = once(server!, 'connectionRefused') as Promise<[PeerCredentials, string]>;
    await expect(connect(path)).rejects.toBeInstanceOf(ConnectionClosedError);
    const [peer, reason] = await refused;
    expect(peer).toEqual({ pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
    expect(reason).toBe(`uid ${process.getuid!()} is not allowed`);
    expect(server!.session).toBeUndefined();
  });

  test('a listed uid with an unlisted pid is refused; all lists matching is served', async () => {
    const path = await listen({ allowedPeers: { uids: [process.getuid!()], pids: [process.pid + 1] } });
    const refused = once(server!, 'connectionRefused') as Promise<[PeerCredentials, string]>;
    await expect(connect(path)).rejects.toBeInstanceOf(ConnectionClosedError);
    expect((await refused)[1]).toBe(`pid ${process.pid} is not allowed`);
    await server!.close();
    server = createServer(new PciIdio16(), { allowedPeers: { uids: [process.getuid!()], gids: [process.getgid!()], pids: [process.pid] } });
    await server.listen(path);
    const client = await connect(path);
    expect(client.server.major).toBe(0);
    client.close();
  });

  test('lists that are not arrays of ids are a usage error', () => {
    expect(() => createServer(new PciIdio16(), { allowedPeers: { uids: [-1] } })).toThrow(/allowedPeers.uids/);
  });

  test.skipIf(process.getuid?.() !== 0)('a process of another uid (needs root to start one) is refused, or served once listed', async () => {
    // The socket must be reachable by that uid for the test: mode 0666 in a searchable directory.
    const runAs = async (path: string) => {
      const script = `const s = require('net').connect(${JSON.stringify(path)});
        s.on('data', () => {}); s.on('connect', () => console.log('connected'));
        s.on('end', () => { console.log('ended by the server'); s.destroy(); });
        const timer = setTimeout(() => s.destroy(), 2000); s.on('close', () => clearTimeout(timer));`;
      const { stdout } = await promisify(execFile)(process.execPath, ['-e', script], { uid: NOBODY, gid: NOBODY, cwd: '/' });
      return stdout.trim().split('\n');
    };
    const path = await listen({ allowedPeers: { uids: [0] } }, 0o666);
    chmodSync(dirname(path), 0o755);
    const refused = once(server!, 'connectionRefused') as Promise<[PeerCredentials, string]>;
    const [output, [peer, reason]] = await Promise.all([runAs(path), refused]);
    expect(output).toEqual(['connected', 'ended by the server']);
    expect([peer.uid, peer.gid, reason]).toEqual([NOBODY, NOBODY, `uid ${NOBODY} is not allowed`]);

    await server!.close();
    server = createServer(new PciIdio16(), { allowedPeers: { uids: [0, NOBODY] } });
    await server.listen(path, { mode: 0o666 });
    const accepted = once(server, 'connection');
    const [served] = await Promise.all([runAs(path), accepted]);
    expect(served).toEqual(['connected']); // the server waited for its VERSION
  });
});
