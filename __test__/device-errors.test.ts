/** Errors in device code are reported where they were made: the handler, the access, the value, the .ts line. */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { connect, Errno, HandlerResultError, PciDevice, Region, type RegisterValue } from '../ts/index.js';
import { BareDevice } from './bare-device.js';
import { serve, SPAWNING_TEST_MS, STARTED_MS, tempSocketPath, until, type Served } from './helpers.js';

const root = join(__dirname, '..');

let served: Served<PciDevice | BareDevice> | undefined;
afterEach(async () => {
  await served?.close();
  served = undefined;
});

/** Serves a device whose BAR2 read handler answers `answer(offset)`; collects the server's device errors. */
async function serveAnswering(answer: (offset: number) => unknown): Promise<Error[]> {
  const device = new PciDevice({
    vendorId: 0x1234, deviceId: 0x5678, classCode: 0,
    bars: { 2: { kind: 'memory', size: 4096, read: (offset) => answer(offset) as RegisterValue } },
    capabilities: [{ kind: 'vendor', data: Buffer.alloc(4), read: () => undefined as unknown as RegisterValue }],
  });
  served = await serve<PciDevice>(device, { deviceErrors: 'expected' });
  const errors: Error[] = [];
  served.server.on('deviceError', (error) => errors.push(error));
  return errors;
}

describe('a read handler that answers the wrong thing', () => {
  test.each([
    ['nothing', () => undefined, 'bars[2].read at offset 0x10, size 4, returned nothing: expected an integer (number or bigint) or a Uint8Array of 4 bytes'],
    ['a fraction', () => 1.5, 'bars[2].read at offset 0x10, size 4, returned 1.5: expected an integer (number or bigint) or a Uint8Array of 4 bytes'],
    ['NaN', () => NaN, 'bars[2].read at offset 0x10, size 4, returned NaN: expected an integer'],
    ['a string', () => '7', 'bars[2].read at offset 0x10, size 4, returned the string "7": expected an integer'],
    ['too few bytes', () => Buffer.alloc(2), 'bars[2].read at offset 0x10, size 4, returned a Buffer of 2 bytes: a read of 4 bytes needs 4 bytes'],
    ['too many bytes', () => Buffer.alloc(8), 'bars[2].read at offset 0x10, size 4, returned a Buffer of 8 bytes: a read of 4 bytes needs 4 bytes'],
    ['an object', () => ({ value: 1 }), 'bars[2].read at offset 0x10, size 4, returned an object (Object): expected an integer'],
    ['a promise of nothing', async () => undefined, 'bars[2].read at offset 0x10, size 4, returned nothing'],
  ])('%s: the client gets EIO, deviceError names the BAR, offset, size and value', async (_, answer, message) => {
    const errors = await serveAnswering(answer);
    const client = await served!.client();
    await expect(client.regionRead(Region.BAR2, 0x10n, 4)).rejects.toMatchObject({ errno: Errno.EIO });
    expect(errors).toHaveLength(1);
    expect(errors[0]).toBeInstanceOf(HandlerResultError);
    expect(errors[0].message.startsWith(message)).toBe(true);
    expect(errors[0]).toMatchObject({ handler: 'bars[2].read', offset: 0x10, size: 4 });
  });

  test('an integer gives its low bytes (two\'s complement when negative); bytes of the right length are taken as they are', async () => {
    const answers: Record<number, unknown> = { 0: 0x1234fffe, 2: -2, 4: 0x1234n, 8: Buffer.from([1, 2]) };
    const errors = await serveAnswering((offset) => answers[offset]);
    const client = await served!.client();
    expect([...(await client.regionRead(Region.BAR2, 0n, 2))]).toEqual([0xfe, 0xff]);
    expect([...(await client.regionRead(Region.BAR2, 2n, 2))]).toEqual([0xfe, 0xff]);
    expect((await client.regionRead(Region.BAR2, 4n, 4)).readUInt32LE(0)).toBe(0x1234);
    expect([...(await client.regionRead(Region.BAR2, 8n, 2))]).toEqual([1, 2]);
    expect(errors).toEqual([]);
  });

  test('a capability register hook is named by its place in the description', async () => {
    const errors = await serveAnswering(() => 0);
    const client = await served!.client();
    const at = await client.pci.findCapability(0x09);
    await expect(client.regionRead(Region.CONFIG, BigInt(at! + 3), 2)).rejects.toMatchObject({ errno: Errno.EIO });
    expect(errors.map((e) => e.message)).toEqual([
      'capabilities[0].read at offset 0x0, size 2, returned nothing: expected an integer (number or bigint) or a Uint8Array of 2 bytes',
    ]);
  });
});

class ShortReads extends BareDevice {
  readonly numRegions = 1;
  regionInfo() {
    return { size: 64n, flags: 0b11 };
  }
  read(_region: number, _offset: number, count: number): Uint8Array {
    return Buffer.alloc(count - 1);
  }
  write(): void {}
}

test('a device without the PCI model that reads short is named with the region', async () => {
  served = await serve<BareDevice>(new ShortReads(), { deviceErrors: 'expected' });
  const errors: Error[] = [];
  served.server.on('deviceError', (error) => errors.push(error));
  const client = await served.client();
  await expect(client.regionRead(0, 8n, 4)).rejects.toMatchObject({ errno: Errno.EIO });
  expect(errors.map((e) => e.message)).toEqual([
    'device.read of region 0 at offset 0x8, size 4, returned a Buffer of 3 bytes: a read of 4 bytes needs a Uint8Array of 4 bytes',
  ]);
});

describe('stack traces', { timeout: SPAWNING_TEST_MS }, () => {
  test('vfio-user serve run from dist reports a throwing handler at its .ts file and line, and the library at its .ts files', async () => {
    const fixture = join(root, '__test__/fixtures/throwing-device.ts');
    const line = readFileSync(fixture, 'utf8').split('\n').findIndex((l) => l.includes('THROW-LINE')) + 1;
    const socket = tempSocketPath();
    const child = spawn(process.execPath, [join(root, 'dist/ts/cli/main.js'), 'serve', fixture, '--socket', socket.path], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk));
    try {
      await until(() => stderr.includes('serving'), STARTED_MS);
      const client = await connect(socket.path);
      await expect(client.regionRead(Region.BAR2, 0n, 4)).rejects.toMatchObject({ errno: Errno.EIO });
      client.close();
      await until(() => stderr.includes('bars.ts'));
    } finally {
      child.kill();
      socket.cleanup();
    }
    expect(stderr).toContain('Error: register 0 is write-only');
    expect(stderr).toContain(`throwing-device.ts:${line}:`);
    expect(stderr).toMatch(/ts\/pci\/bars\.ts:\d+:\d+/);
    expect(stderr).not.toMatch(/dist\/ts\/pci\/bars\.js/);
  });
});
