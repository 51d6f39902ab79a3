/**
 * Nothing a peer does makes a call on the event loop block: connecting to a
 * server whose backlog is full, and signalling an eventfd a client left at
 * its maximum count. Each runs in a child process: a regression freezes the
 * whole process, which only a parent can notice (the child is then killed).
 */
import { describe, expect, test } from 'vitest';
import { runChild } from './helpers.js';

/** Far above what the child needs on a loaded machine: only a frozen one gets there. */
const FROZEN_AFTER_MS = 60_000;

function result(r: { status: number | null; signal: string | null; out: string }): unknown {
  expect(r.signal, `the child was killed (frozen?): ${r.out}`).toBeNull();
  expect(r.status, r.out).toBe(0);
  return JSON.parse(/RESULT (.*)/.exec(r.out)![1]);
}

describe('connect', () => {
  test("to a server whose backlog is full waits without blocking the caller's loop, then connects", () => {
    const r = runChild(`
      const net = await import('node:net');
      const device = new lib.PciDevice({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0 });
      const server = lib.createServer(device);
      await server.listen(SOCK);
      const first = await lib.connect(SOCK); // served: later clients wait in the backlog
      const waiting = [];
      for (;;) {
        const s = net.connect(SOCK);
        const error = await new Promise((resolve) => s.once('connect', () => resolve(undefined)).once('error', resolve));
        if (error) { if (error.code !== 'EAGAIN') throw error; break; }
        waiting.push(s);
      }
      let turns = 0;
      const timer = setInterval(() => turns++, 1);
      let settled = false;
      const pending = lib.connect(SOCK, { timeoutMs: 0 });
      pending.then(() => (settled = true), () => (settled = true));
      // The loop turns while the connect waits (a blocked loop never gets past this).
      while (turns < 3) await new Promise((resolve) => setTimeout(resolve, 1));
      const turnsWhileWaiting = settled ? 0 : turns;
      for (const s of waiting) s.destroy();
      first.close();
      const client = await pending;
      clearInterval(timer);
      console.log('RESULT ' + JSON.stringify({ backlog: waiting.length > 0, looped: turnsWhileWaiting > 0, major: client.server.major }));
      client.close(); await server.close(); device.close();
    `, FROZEN_AFTER_MS);
    expect(result(r)).toEqual({ backlog: true, looped: true, major: 0 });
  }, FROZEN_AFTER_MS + 30_000);
});

describe('SET_IRQS eventfds', () => {
  test('one a client left at its maximum count (and blocking) is signalled without blocking', () => {
    const r = runChild(`
      const { spawnSync } = await import('node:child_process');
      const { readFileSync, writeSync } = await import('node:fs');
      const device = new lib.PciDevice({
        vendorId: 0x1234, deviceId: 0x5678, classCode: 0,
        bars: { 0: { kind: 'memory', size: 0x4000 } },
        capabilities: [{ kind: 'msix', vectors: 1, table: { bar: 0, offset: 0x2000 }, pba: { bar: 0, offset: 0x3000 } }],
      });
      const server = lib.createServer(device);
      await server.listen(SOCK);
      const client = await lib.connect(SOCK);
      const cfg = async (at, n) => client.regionRead(lib.Region.CONFIG, BigInt(at), n);
      let msix = (await cfg(0x34, 1))[0];
      while ((await cfg(msix, 1))[0] !== 0x11) msix = (await cfg(msix + 1, 1))[0];
      await client.regionWrite(lib.Region.CONFIG, 0x04n, Buffer.from([0x06, 0])); // memory, bus master
      await client.regionWrite(lib.Region.CONFIG, BigInt(msix + 2), Buffer.from([0, 0x80])); // MSI-X enable

      const { native } = await import(TESTS + '/../ts/native.ts');
      const fd = native.eventfdCreate();
      // libuv makes a spawned child's stdin blocking, and O_NONBLOCK belongs to
      // the open file, so this turns our non-blocking eventfd into a blocking one.
      spawnSync('true', [], { stdio: [fd, 'ignore', 'ignore'] });
      const flags = () => parseInt(/flags:\\s*(\\d+)/.exec(readFileSync('/proc/self/fdinfo/' + fd, 'utf8'))[1], 8);
      const O_NONBLOCK = 0o4000;
      const blockingBefore = (flags() & O_NONBLOCK) === 0;
      const max = Buffer.alloc(8);
      max.writeBigUInt64LE(0xfffffffffffffffen);
      writeSync(fd, max);

      await client.setIrqs({ index: lib.IrqIndex.MSIX, eventfds: [fd] });
      device.irq.trigger(0); // a blocking write would never return: the counter is full
      const count = Buffer.alloc(8);
      const { readSync } = await import('node:fs');
      readSync(fd, count);
      console.log('RESULT ' + JSON.stringify({ blockingBefore, count: count.readBigUInt64LE(0).toString(16) }));
      client.close(); await server.close(); device.close();
    `, FROZEN_AFTER_MS);
    expect(result(r)).toEqual({ blockingBefore: true, count: 'fffffffffffffffe' });
  }, FROZEN_AFTER_MS + 30_000);
});
