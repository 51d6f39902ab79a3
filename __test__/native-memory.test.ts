/**
 * Memory the native layer reads or writes while JS holds views of it: the
 * message slabs and the bytes of regions answered natively. No use
 * of the public API may pull that memory out from under the native side.
 */
import { afterEach, describe, expect, test } from 'vitest';
import { PciDevice, Region } from '../ts/index.js';
import { runChild, serve, type Served } from './helpers.js';
import { base } from './pci-helpers.js';

let served: Served<PciDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served?.device.close();
  served = undefined;
});

/** Moves `buffer` away the way a handler handing data to a worker would. */
function transfer(buffer: ArrayBufferLike): void {
  structuredClone(buffer, { transfer: [buffer as ArrayBuffer] });
}

describe('message slabs', () => {
  test('a handler that transfers its payload buffer leaves the slab in place for the next messages', async () => {
    const seen: number[][] = [];
    served = await serve(new PciDevice({
      ...base,
      bars: {
        0: {
          kind: 'memory',
          size: 0x10000,
          write: (offset, data) => {
            seen.push([offset, ...data.subarray(0, 4)]);
            transfer(data.buffer);
            // Untransferable: the transfer copied, the slab is still whole.
            expect(data.buffer.byteLength).toBeGreaterThan(0);
          },
        },
      },
    }));
    const client = await served.client();
    const big = Buffer.alloc(0x9000, 7); // larger messages get a buffer of their own
    for (let i = 0; i < 50; i++) {
      await client.regionWrite(Region.BAR0, BigInt(4 * i), Buffer.from([i, 1, 2, 3]));
      if (i % 10 === 0) await client.regionWrite(Region.BAR0, 0x1000n, big);
    }
    expect(seen.filter(([offset]) => offset !== 0x1000)).toEqual(Array.from({ length: 50 }, (_, i) => [4 * i, i, 1, 2, 3]));
    expect((await client.regionRead(Region.BAR0, 4n * 49n, 4))[0]).toBe(49);
  });
});

describe('bytes served natively', () => {
  test("a plain-memory BAR's bytes stay where the native reads look when a device transfers them", async () => {
    served = await serve(new PciDevice({ ...base, bars: { 0: { kind: 'memory', size: 4096 } } }));
    const client = await served.client();
    expect((await client.regionRead(Region.BAR0, 0n, 4)).readUInt32LE(0)).toBe(0);
    transfer(served.device.bar(0).bytes!.buffer);
    await client.regionWrite(Region.BAR0, 8n, Buffer.from([1, 2, 3, 4]));
    expect([...await client.regionRead(Region.BAR0, 8n, 4)]).toEqual([1, 2, 3, 4]);
    expect(served.server.session!.readsAnsweredNatively).toBeGreaterThan(0);
  });
});

describe('SharedMemory.close() with a client attached', () => {
  test('the next BAR read is answered EIO from JS, not natively from unmapped memory', () => {
    // In a child: reading unmapped memory natively would kill the process (SIGSEGV).
    const r = runChild(`
      const shared = new lib.SharedMemory(4096);
      shared.bytes[0] = 0x42;
      const device = new lib.PciDevice({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0, bars: { 0: { kind: 'memory', size: 4096, shared } } });
      const failures = [];
      const server = lib.createServer(device).on('deviceError', (error) => failures.push(error.message));
      await server.listen(SOCK);
      const client = await lib.connect(SOCK);
      const first = (await client.regionRead(lib.Region.BAR0, 0n, 4))[0];
      const native = server.session.readsAnsweredNatively;
      shared.close();
      const after = await client.regionRead(lib.Region.BAR0, 0n, 4).then(() => 'answered', (e) => e.errno);
      console.log('RESULT ' + JSON.stringify({ first, native, after, nativeAfter: server.session.readsAnsweredNatively, failures: failures.length }));
      client.close(); await server.close(); device.close();
    `);
    expect(r.signal, r.out).toBeNull();
    const result = JSON.parse(/RESULT (.*)/.exec(r.out)![1]);
    expect(result).toEqual({ first: 0x42, native: 1, after: 5 /* EIO */, nativeAfter: 1, failures: 1 });
    expect(r.status, r.out).toBe(0);
  });
});
