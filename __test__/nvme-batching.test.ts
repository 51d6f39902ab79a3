/**
 * Batches through examples/nvme, in every doorbell mode, over a real socket:
 * submission entries fetched together across the SQ's wrap, completions
 * posted together (with the phase tag right at the CQ's wrap, and never into
 * a full CQ), one interrupt per batch, and Interrupt Coalescing (Set Features
 * 0x08) with Interrupt Vector Configuration's Coalescing Disable (0x09).
 *
 * Coalescing's time runs on the device's timers: the tests fake `setTimeout`
 * (only), so a held interrupt stays held until the test moves the clock,
 * whatever the machine's load. They wait with `setImmediate`, which is not faked.
 */
import { afterEach, describe, expect, test, vi } from 'vitest';
import { testCleanups } from './cleanups.js';
import type { Completion, NvmeHost } from './nvme-host.js';
import { bringUpNvme, Op, S, SETUPS } from './nvme-setup.js';

const cleanups = testCleanups();
afterEach(() => {
  vi.useRealTimers();
});

const SET_FEATURES = 0x09;
const INTERRUPT_COALESCING = 0x08;
const INTERRUPT_VECTOR_CONFIG = 0x09;
const COALESCING_DISABLE = 1 << 16;

/** Waits for `predicate` on later turns of the event loop (timers may be faked). */
async function turnsUntil(predicate: () => boolean, turns = 200_000): Promise<void> {
  for (let i = 0; i < turns; i++) {
    if (predicate()) return;
    await new Promise((resolve) => setImmediate(resolve));
  }
  throw new Error('condition not met');
}

/** Interrupts signalled on `vector` since the last call (an eventfd counts each signal). */
const interrupts = (h: NvmeHost, vector: number) => h.vectors[vector].take();

/** A read of one block into a fresh page of guest memory. */
const read = (h: NvmeHost) => ({ opcode: Op.READ, nsid: 1, prp1: h.alloc(4096) });

describe.each(SETUPS)('with %s doorbells', (setup) => {
  test('entries rung together across the SQ wrap are fetched and completed as one batch, with one interrupt', async () => {
    const { host: h, served, deviceErrors } = await bringUpNvme(cleanups, setup, { ioEntries: 16 });
    // Move the ring to slot 12, one command at a time.
    for (let i = 0; i < 12; i++) expect((await h.submit(1, read(h))).status).toBe(S.SUCCESS);
    interrupts(h, 1);
    // Ten writes in slots 12-15 and 0-5, rung once, each with its own data.
    const pages = Array.from({ length: 10 }, (_, i) => {
      const page = h.alloc(4096);
      h.write(page, Buffer.alloc(4096, i + 1));
      return page;
    });
    const writes = pages.map((page, i) => h.enqueue(1, { opcode: Op.WRITE, nsid: 1, prp1: page, cdw10: 8 * i, cdw12: 7 }));
    h.kick(1);
    const done = await Promise.all(writes);
    expect(done.map((c) => c.status)).toEqual(Array(10).fill(S.SUCCESS));
    // Each completion reports the SQ head past the whole batch: it was fetched before any completed.
    expect(done.map((c) => c.sqHead)).toEqual(Array(10).fill(6));
    expect(served.device.sqs[1]!.head).toBe(6);
    await turnsUntil(() => h.vectors[1].take() === 1);
    expect(interrupts(h, 1)).toBe(0);
    for (let i = 0; i < 10; i++) {
      const back = h.alloc(4096);
      expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: back, cdw10: 8 * i, cdw12: 7 })).status).toBe(S.SUCCESS);
      expect(h.read(back, 4096).every((b) => b === i + 1)).toBe(true);
    }
    expect(deviceErrors).toEqual([]);
  });

  test('a full CQ stops fetching until the host frees entries; the rest then complete across the CQ wrap', async () => {
    const { host: h, served, deviceErrors } = await bringUpNvme(cleanups, setup, { ioEntries: 16 });
    h.hold = true;
    const first = Array.from({ length: 15 }, () => h.enqueue(1, read(h)));
    h.kick(1);
    const cq = served.device.cqs[1]!;
    // Fifteen completions fill the 16-entry CQ (one entry always stays free).
    await turnsUntil(() => cq.tail === 15);
    expect(cq.full).toBe(true);
    const more = Array.from({ length: 10 }, () => h.enqueue(1, read(h)));
    h.kick(1);
    await h.reg32(0x1c);
    expect([served.device.sqs[1]!.head, cq.tail]).toEqual([15, 15]);
    h.hold = false;
    const done = await Promise.all([...first, ...more]);
    expect(done.filter((c) => c.status !== S.SUCCESS)).toEqual([]);
    expect(h.stray).toEqual([]);
    // 25 completions in a 16-entry ring: the phase tag flipped at the wrap, or the host would have missed some.
    expect([cq.tail, cq.phase]).toEqual([9, 0]);
    expect(deviceErrors).toEqual([]);
  });

  test('Interrupt Coalescing holds a vector\'s interrupt until THR + 1 completions, or until TIME has passed', async () => {
    const { host: h, served, deviceErrors } = await bringUpNvme(cleanups, setup);
    const cq = served.device.cqs[1]!;
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    interrupts(h, 0);
    // THR 3 (four completions), TIME 50 (5 ms).
    expect((await h.admin({ opcode: SET_FEATURES, cdw10: INTERRUPT_COALESCING, cdw11: (50 << 8) | 3 })).status).toBe(S.SUCCESS);
    // The admin queue is never coalesced.
    expect(interrupts(h, 0)).toBe(1);
    interrupts(h, 1);
    // As an interrupt-driven host: completions stay unconsumed until it is interrupted.
    h.hold = true;
    const commands: Promise<Completion>[] = [];
    const complete = async () => {
      const posted = cq.tail;
      commands.push(h.submit(1, read(h)));
      await turnsUntil(() => cq.tail === (posted + 1) % cq.size);
    };
    for (let i = 0; i < 3; i++) {
      await complete();
      expect(interrupts(h, 1)).toBe(0);
    }
    // The fourth completion reaches the threshold: one interrupt for all four.
    await complete();
    expect(interrupts(h, 1)).toBe(1);
    // A fifth is held, and signalled once TIME has passed: the last interrupt is never lost.
    await complete();
    vi.advanceTimersByTime(4);
    expect(interrupts(h, 1)).toBe(0);
    vi.advanceTimersByTime(1);
    expect(interrupts(h, 1)).toBe(1);
    // Held when the settings change: signalled at once.
    await complete();
    expect(interrupts(h, 1)).toBe(0);
    const adminCq = served.device.cqs[0]!;
    const adminTail = adminCq.tail;
    const off = h.admin({ opcode: SET_FEATURES, cdw10: INTERRUPT_COALESCING, cdw11: 0 });
    await turnsUntil(() => adminCq.tail !== adminTail);
    expect(interrupts(h, 1)).toBe(1);
    h.hold = false;
    expect((await off).status).toBe(S.SUCCESS);
    // Coalescing off again (TIME 0): every completion interrupts.
    expect((await h.submit(1, read(h))).status).toBe(S.SUCCESS);
    expect(interrupts(h, 1)).toBe(1);
    expect((await Promise.all(commands)).filter((c) => c.status !== S.SUCCESS)).toEqual([]);
    expect(deviceErrors).toEqual([]);
  });

  test('Coalescing Disable (Interrupt Vector Configuration) exempts its vector', async () => {
    const { host: h, deviceErrors } = await bringUpNvme(cleanups, setup);
    expect((await h.createIoQueuePair(2, 16)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    expect((await h.admin({ opcode: SET_FEATURES, cdw10: INTERRUPT_COALESCING, cdw11: (200 << 8) | 7 })).status).toBe(S.SUCCESS);
    expect((await h.admin({ opcode: SET_FEATURES, cdw10: INTERRUPT_VECTOR_CONFIG, cdw11: COALESCING_DISABLE | 2 })).status).toBe(S.SUCCESS);
    interrupts(h, 1);
    interrupts(h, 2);
    // Vector 2 interrupts for each completion; vector 1 holds.
    for (let i = 0; i < 3; i++) {
      expect((await h.submit(2, read(h))).status).toBe(S.SUCCESS);
      await turnsUntil(() => h.vectors[2].take() === 1);
      expect((await h.submit(1, read(h))).status).toBe(S.SUCCESS);
      expect(interrupts(h, 1)).toBe(0);
    }
    // Vector 1's held interrupt goes when its time (20 ms) is up; vector 2 had none held.
    vi.advanceTimersByTime(20);
    await turnsUntil(() => h.vectors[1].take() === 1);
    expect(interrupts(h, 2)).toBe(0);
    expect(deviceErrors).toEqual([]);
  });
});

describe('with mmap doorbells', () => {
  test('an I/O CQ head store runs nothing: the controller reads the head when the CQ looks full', async () => {
    const { host: h, served, deviceErrors } = await bringUpNvme(cleanups, 'mmap', { ioEntries: 4 });
    const cq = served.device.cqs[1]!;
    // Longer than the watch's longest sleep: the admin CQ's last head store is found first.
    const settle = () => new Promise((resolve) => setTimeout(resolve, 20));
    await settle();
    const batches = served.device.doorbellStats.batches;
    // Ten commands in turn through a CQ of four, the host storing each CQ head before the next command.
    for (let i = 0; i < 10; i++) expect((await h.submit(1, read(h))).status).toBe(S.SUCCESS);
    await settle();
    // One batch per command (its SQ tail): the ten head stores ran nothing.
    expect(served.device.doorbellStats.batches - batches).toBe(10);
    // The head was read each time the CQ looked full (after completions 3, 5, 7 and 9: 2, 0, 2, 0);
    // the host's last store (2) was not needed.
    expect([cq.head, cq.tail]).toEqual([0, 2]);
    expect(h.stray).toEqual([]);
    expect(deviceErrors).toEqual([]);
  });
});

// Without shadow doorbells every CQ head write reaches the controller (with them, only those EventIdx asks for).
describe.each(['trap', 'mmap'] as const)('with %s doorbells, no shadow', (setup) => {
  test('Interrupt Coalescing: a host that consumed every completion is not interrupted for them', async () => {
    const { host: h, served, deviceErrors } = await bringUpNvme(cleanups, setup);
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    expect((await h.admin({ opcode: SET_FEATURES, cdw10: INTERRUPT_COALESCING, cdw11: (50 << 8) | 3 })).status).toBe(S.SUCCESS);
    interrupts(h, 1);
    // A polling host consumes the completion and writes the CQ head: the held interrupt would announce nothing.
    expect((await h.submit(1, read(h))).status).toBe(S.SUCCESS);
    const cq = served.device.cqs[1]!;
    await turnsUntil(() => cq.head === cq.tail);
    vi.advanceTimersByTime(5);
    expect(interrupts(h, 1)).toBe(0);
    // One left unconsumed is interrupted for when the time is up.
    h.hold = true;
    const held = h.submit(1, read(h));
    await turnsUntil(() => cq.head !== cq.tail);
    vi.advanceTimersByTime(5);
    expect(interrupts(h, 1)).toBe(1);
    h.hold = false;
    expect((await held).status).toBe(S.SUCCESS);
    expect(deviceErrors).toEqual([]);
  });
});
