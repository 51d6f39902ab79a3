/** Poll handles on a Worker's loop close with it: terminate() must not abort the process. */
import { Worker } from 'node:worker_threads';
import { join } from 'node:path';
import { once } from 'node:events';
import { describe, expect, test } from 'vitest';
import { connect, Region } from '../ts/index.js';
import { tempSocketPath } from './helpers.js';

describe('servers in worker threads', () => {
  test('serve a client, then terminate the worker with the connection open', async () => {
    const socket = tempSocketPath();
    const worker = new Worker(join(__dirname, 'fixtures/worker-server.js'), { workerData: { path: socket.path } });
    const [message] = await once(worker, 'message');
    expect(message).toBe('listening');
    const client = await connect(socket.path);
    expect((await client.regionRead(Region.CONFIG, 0n, 2)).readUInt16LE(0)).toBe(0x494f);
    const closed = new Promise((r) => client.on('close', r));
    expect(await worker.terminate()).toBe(1);
    await closed; // the worker's socket went away with it
    client.close();
    socket.cleanup();
  });
});
