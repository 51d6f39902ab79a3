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

/**
 * Child code: a served device with one MSI-X vector, enabled, and a client
 * connected in the same process; `fd` is an eventfd in blocking mode, as a
 * client may hand one over.
 */
const MSIX_SERVER_WITH_BLOCKING_EVENTFD = `
      const { spawnSync } = await import('node:child_process');
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
`;

describe('SET_IRQS eventfds', () => {
  test('one a client left at its maximum count (and blocking) is signalled without blocking', () => {
    const r = runChild(`
      const { readFileSync, writeSync } = await import('node:fs');
      ${MSIX_SERVER_WITH_BLOCKING_EVENTFD}
      const flags = () => parseInt(/flags:\\s*(\\d+)/.exec(readFileSync('/proc/self/fdinfo/' + fd, 'utf8'))[1], 8);
      const O_NONBLOCK = 0o4000;
      const blockingBefore = (flags() & O_NONBLOCK) === 0;
      const max = Buffer.alloc(8);
      max.writeBigUInt64LE(0xfffffffffffffffen);
      writeSync(fd, max);

      await client.setIrqs({ index: lib.IrqIndex.MSIX, eventfds: [fd] });
      device.irq.raise(0); // a blocking write would never return: the counter is full
      const count = Buffer.alloc(8);
      const { readSync } = await import('node:fs');
      readSync(fd, count);
      console.log('RESULT ' + JSON.stringify({ blockingBefore, count: count.readBigUInt64LE(0).toString(16) }));
      client.close(); await server.close(); device.close();
    `, FROZEN_AFTER_MS);
    expect(result(r)).toEqual({ blockingBefore: true, count: 'fffffffffffffffe' });
  }, FROZEN_AFTER_MS + 30_000);

  test('one a client fills to its maximum while interrupts fire does not stop the loop answering', (context) => {
    // The racer (a process of its own, as a client is) drains the eventfd and
    // fills it to its maximum, over and over, racing the server's
    // check-then-write. When it sees the server's thread waiting on the
    // eventfd (its only wait there is a write) it has won: it stops for good,
    // holding the counter full, and the server's write must still return
    // (interrupted) for the reads that follow to be answered.
    const r = runChild(`
      const { spawn } = await import('node:child_process');
      ${MSIX_SERVER_WITH_BLOCKING_EVENTFD}
      await client.setIrqs({ index: lib.IrqIndex.MSIX, eventfds: [fd] });
      const racer = spawn(process.execPath, ['-e', \`
        const { openSync, readSync, writeSync } = require('node:fs');
        const { Worker } = require('node:worker_threads');
        const waiting = (path) => {
          const file = openSync(path, 'r');
          const text = Buffer.alloc(64);
          return () => text.toString('latin1', 0, readSync(file, text, 0, 64, 0)) === 'do_wait_intr_irq';
        };
        const serverWaits = waiting('/proc/' + process.argv[1] + '/wchan');
        const won = new Int32Array(new SharedArrayBuffer(4));
        // Our own full write waits when the server signalled since our read:
        // a second thread reads then (the counter is not zero) to let it go on.
        new Worker(\\\`
          const { workerData: { won, main } } = require('node:worker_threads');
          const { openSync, readSync } = require('node:fs');
          const file = openSync('/proc/self/task/' + main + '/syscall', 'r');
          const text = Buffer.alloc(256);
          const write = process.arch === 'arm64' ? '64' : '1';
          const count = Buffer.alloc(8);
          while (!Atomics.load(won, 0)) {
            Atomics.wait(won, 0, 0, 1);
            if (text.toString('latin1', 0, readSync(file, text, 0, 256, 0)).split(' ')[0] === write) readSync(3, count);
          }
        \\\`, { eval: true, workerData: { won, main: process.pid } });
        const full = Buffer.alloc(8);
        full.writeBigUInt64LE(0xfffffffffffffffen);
        const count = Buffer.alloc(8);
        for (let round = 1; ; round++) {
          readSync(3, count);
          writeSync(3, full);
          if (serverWaits()) { Atomics.store(won, 0, 1); console.log('won after ' + round + ' rounds'); break; }
        }
        // Hold the counter full until the server's process is gone.
        process.stdin.on('end', () => process.exit(0)).resume();
      \`, String(process.pid)], { stdio: ['pipe', 'pipe', 'inherit', fd] });
      let won = '';
      racer.stdout.on('data', (d) => (won += d));
      let firing = true;
      const fire = () => { for (let i = 0; i < 100; i++) device.irq.raise(0); if (firing) setImmediate(fire); };
      fire();
      let reads = 0;
      while (!won && reads < 20000) {
        await cfg(0, 4);
        reads++;
      }
      for (let i = 0; i < 100; i++) await cfg(0, 4); // the racer holds the counter full from here on
      firing = false;
      racer.kill('SIGKILL');
      console.error('racer: ' + (won.trim() || 'never won') + ', ' + reads + ' reads');
      console.log('RESULT ' + JSON.stringify({ answered: true, won: Boolean(won), reads }));
      client.close(); await server.close(); device.close();
    `, FROZEN_AFTER_MS);
    console.log(r.out);
    const { answered, won, reads } = result(r) as { answered: boolean; won: boolean; reads: number };
    expect(answered).toBe(true);
    // Without a win the server never met a full counter: nothing was tested, and the test says so.
    if (!won) context.skip(`the racer never caught the server writing the eventfd in ${reads} reads: the race was not run`);
  }, FROZEN_AFTER_MS + 30_000);
});
