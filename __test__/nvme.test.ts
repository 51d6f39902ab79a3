/** The NVMe example driven by a host driver over the client: bring-up, I/O with PRP lists, errors, interrupts, resets. */
import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { CapabilityId, connect, EventfdIrq, IrqIndex, Region } from '../ts/index.js';
import createDevice from '../examples/nvme/index.js';
import { Csts, MSIX_PBA, MSIX_TABLE, NSSR_RESET, Register, type NvmeController } from '../examples/nvme/controller.js';
import { openFdCount, serve, tempSocketPath, until, type Served } from './helpers.js';
import { NvmeHost, PAGE, MEMORY_BASE, type Completion } from './nvme-host.js';
import { guest } from './pci-helpers.js';

const IMAGE_SIZE = 64 << 20;
const BLOCKS = IMAGE_SIZE / 512;

const S = {
  SUCCESS: 0x000, INVALID_OPCODE: 0x001, INVALID_FIELD: 0x002, DATA_TRANSFER_ERROR: 0x004, INVALID_NAMESPACE: 0x00b,
  COMMAND_SEQUENCE_ERROR: 0x00c, PRP_OFFSET_INVALID: 0x013, LBA_OUT_OF_RANGE: 0x080, COMPLETION_QUEUE_INVALID: 0x100,
  INVALID_QUEUE_ID: 0x101, INVALID_QUEUE_SIZE: 0x102, AER_LIMIT_EXCEEDED: 0x105, INVALID_INTERRUPT_VECTOR: 0x108,
  INVALID_LOG_PAGE: 0x109, INVALID_QUEUE_DELETION: 0x10c, FEATURE_NOT_SAVEABLE: 0x10d,
};
const Op = { FLUSH: 0x00, WRITE: 0x01, READ: 0x02, WRITE_ZEROES: 0x08, DSM: 0x09 };

let dir: { path: string; cleanup(): void };
let served: Served<NvmeController> | undefined;
let host: NvmeHost | undefined;
beforeEach(() => {
  dir = tempSocketPath();
});
afterEach(async () => {
  host?.close();
  host = undefined;
  await served?.close();
  served?.device.close();
  served = undefined;
  dir.cleanup();
});

const imagePath = () => join(dir.path, '..', 'disk.img');

/** How the host rings: the controller's doorbell mode, and whether it uses shadow doorbells (Doorbell Buffer Config) as Linux does. */
type Setup = 'mmap' | 'trap' | 'mmap+shadow' | 'trap+shadow' | 'ioeventfd';

/** Serves the module's default export as `vfio-user serve` would, and brings up a host with one I/O queue pair. */
async function bringUp(setup: Setup, ioEntries = 64): Promise<NvmeHost> {
  const [doorbells, shadow] = setup.split('+');
  served = await serve(createDevice(['--image', imagePath(), '--size', String(IMAGE_SIZE), '--doorbells', doorbells]));
  host = await NvmeHost.attach(await served.client());
  expect((await host.enable()) & Csts.RDY).toBe(Csts.RDY);
  // ioeventfds carry no value: that mode needs shadow doorbells.
  if (shadow || doorbells === 'ioeventfd') expect((await host.shadowDoorbells()).status).toBe(S.SUCCESS);
  const [cq, sq] = await host.createIoQueuePair(1, ioEntries);
  expect([cq.status, sq.status]).toEqual([S.SUCCESS, S.SUCCESS]);
  return host;
}

function imageBytes(position: number, length: number): Buffer {
  const fd = openSync(imagePath(), 'r');
  const b = Buffer.alloc(length);
  readSync(fd, b, 0, length, position);
  closeSync(fd);
  return b;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) b.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
  return b;
}

/** A read or write of `length` bytes at `lba` through scattered pages, the data starting `offset` into the first. */
async function io(h: NvmeHost, op: number, lba: number, data: Buffer | number, offset = 0, listOffset = 0): Promise<{ c: Completion; data: Buffer }> {
  const length = typeof data === 'number' ? data : data.length;
  const pages = h.scatteredPages(Math.ceil((offset + length) / PAGE));
  if (typeof data !== 'number') h.scatter(pages, offset, data);
  const c = await h.submit(1, { opcode: op, nsid: 1, ...h.prps(pages, offset, listOffset), cdw10: lba, cdw12: length / 512 - 1 });
  return { c, data: h.gather(pages, offset, length) };
}

describe.each(['mmap', 'trap', 'mmap+shadow', 'trap+shadow', 'ioeventfd'] as const)('with %s doorbells', (mode) => {
  test('bring-up: registers, Identify controller and namespace, NS list and descriptors', async () => {
    const h = await bringUp(mode);
    expect(h.mappedDoorbells).toBe(mode.startsWith('mmap'));
    // The client takes 16 fds a message: queues 1-8's doorbells (the rest trap into the same eventfds).
    expect(h.ioeventfds).toBe(mode === 'ioeventfd' ? 16 : 0);
    expect(await h.reg32(Register.VS)).toBe(0x00010400);
    const capHigh = await h.reg32(Register.CAP + 4);
    expect(capHigh & 0x20).toBeTruthy(); // CSS: NVM command set
    expect((await h.reg32(Register.CAP)) & 0xffff).toBe(1023); // MQES
    const buf = h.alloc(PAGE);
    const identify = async (cns: number, nsid = 0) => ({ c: await h.admin({ opcode: 0x06, nsid, prp1: buf, cdw10: cns }), d: h.read(buf, PAGE) });
    const ctrl = await identify(1);
    expect(ctrl.c.status).toBe(S.SUCCESS);
    expect(ctrl.d.readUInt16LE(0)).toBe(0x1b36);
    expect(ctrl.d.toString('ascii', 24, 64).trim()).toBe('vfio-user TypeScript NVMe');
    expect(ctrl.d.readUInt32LE(80)).toBe(0x00010400);
    expect([ctrl.d[512], ctrl.d[513], ctrl.d.readUInt32LE(516)]).toEqual([0x66, 0x44, 1]);
    expect(ctrl.d.readUInt16LE(256)).toBe(1 << 8); // OACS: Doorbell Buffer Config
    const ns = await identify(0, 1);
    expect(ns.d.readBigUInt64LE(0)).toBe(BigInt(BLOCKS));
    expect((ns.d.readUInt32LE(128) >> 16) & 0xff).toBe(9);
    const list = await identify(2, 0);
    expect([list.d.readUInt32LE(0), list.d.readUInt32LE(4)]).toEqual([1, 0]);
    const descriptors = await identify(3, 1);
    expect([descriptors.d[0], descriptors.d[1], descriptors.d[20]]).toEqual([2, 16, 3]);
    expect((await identify(0, 2)).c.status).toBe(S.INVALID_NAMESPACE);
    expect((await identify(6)).c.status).toBe(S.SUCCESS); // NVM command set limits: none
    expect((await identify(0x10)).c.status).toBe(S.INVALID_FIELD);
  });

  test('4 KiB and 128 KiB writes and reads through PRP lists land in the image', async () => {
    const h = await bringUp(mode);
    const small = pattern(4096, 1);
    expect((await io(h, Op.WRITE, 8, small)).c.status).toBe(S.SUCCESS);
    expect(imageBytes(8 * 512, 4096)).toEqual(small);
    expect((await io(h, Op.READ, 8, 4096)).data).toEqual(small);
    // 128 KiB starting 512 bytes into a page: 33 pages, PRP2 a list.
    const big = pattern(128 << 10, 2);
    const w = await io(h, Op.WRITE, 1000, big, 512);
    expect(w.c.status).toBe(S.SUCCESS);
    expect(imageBytes(1000 * 512, big.length)).toEqual(big);
    // The list starts 16 bytes before the end of its page: two slots, so it chains after one entry.
    const r = await io(h, Op.READ, 1000, big.length, 0, PAGE - 16);
    expect(r.c.status).toBe(S.SUCCESS);
    expect(r.data).toEqual(big);
    // The last block of the namespace.
    expect((await io(h, Op.WRITE, BLOCKS - 1, pattern(512, 3))).c.status).toBe(S.SUCCESS);
    expect(imageBytes(IMAGE_SIZE - 512, 512)).toEqual(pattern(512, 3));
  });

  test('QD32: commands queued together all complete with their data', async () => {
    const h = await bringUp(mode);
    const writes = Array.from({ length: 32 }, (_, i) => {
      const page = h.alloc(PAGE);
      h.write(page, pattern(4096, 100 + i));
      return h.enqueue(1, { opcode: Op.WRITE, nsid: 1, prp1: page, cdw10: 8 * i, cdw12: 7 });
    });
    h.kick(1);
    expect((await Promise.all(writes)).map((c) => c.status)).toEqual(new Array(32).fill(S.SUCCESS));
    for (let i = 0; i < 32; i++) expect(imageBytes(8 * i * 512, 4096)).toEqual(pattern(4096, 100 + i));
  });
});

describe('shadow doorbells and EventIdx (Doorbell Buffer Config)', () => {
  test.each(['trap', 'mmap', 'ioeventfd'] as const)('%s: a burst of submissions writes the register once; EventIdx follows the controller', async (mode) => {
    served = await serve(createDevice(['--image', imagePath(), '--size', String(IMAGE_SIZE), '--doorbells', mode]));
    const h = (host = await NvmeHost.attach(await served.client()));
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    const shadowPage = h.alloc(PAGE);
    const eventIdxPage = h.alloc(PAGE);
    expect((await h.shadowDoorbells(shadowPage, eventIdxPage)).status).toBe(S.SUCCESS);
    expect((await h.createIoQueuePair(1, 64)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    const before = { ...h.rings };
    // Eight submissions in one turn of the loop: the first passes EventIdx 0, the rest do not.
    const writes = await Promise.all(Array.from({ length: 8 }, (_, i) => io(h, Op.WRITE, 8 * i, pattern(4096, 200 + i))));
    expect(writes.map((w) => w.c.status)).toEqual(new Array(8).fill(S.SUCCESS));
    for (let i = 0; i < 8; i++) expect(imageBytes(8 * i * 512, 4096)).toEqual(pattern(4096, 200 + i));
    // One SQ tail write and one CQ head write reached the register; seven tails went only to the shadow page
    // (and the CQ heads of later reaps, when the store's completions came in more than one batch).
    expect(h.rings.written - before.written).toBe(2);
    expect(h.rings.skipped - before.skipped).toBeGreaterThanOrEqual(7);
    expect(h.read(shadowPage + 8n, 4).readUInt32LE(0)).toBe(8);
    expect(h.read(eventIdxPage + 8n, 4).readUInt32LE(0)).toBe(8); // the controller saw up to tail 8
    expect((await io(h, Op.READ, 8, 4096)).data).toEqual(pattern(4096, 201));
  });

  test('a full CQ goes on once the host frees room; the controller publishes the head it waits on', async () => {
    const h = await bringUp('trap+shadow');
    // SQ 2 of 8 entries on CQ 2 of 4 (three usable slots).
    const q = h.newQueue(2, 8, 4);
    expect((await h.admin({ opcode: 0x05, prp1: q.cqBase, cdw10: (3 << 16) | 2, cdw11: (2 << 16) | 3 })).status).toBe(S.SUCCESS);
    expect((await h.admin({ opcode: 0x01, prp1: q.sqBase, cdw10: (7 << 16) | 2, cdw11: (2 << 16) | 1 })).status).toBe(S.SUCCESS);
    const page = h.alloc(PAGE);
    const read = () => h.submit(2, { opcode: Op.READ, nsid: 1, prp1: page });
    // The second CQ head (2) goes only to the shadow page: the controller still holds head 1.
    expect([(await read()).status, (await read()).status]).toEqual([S.SUCCESS, S.SUCCESS]);
    expect(served!.device.cqs[2]!.head).toBe(1);
    h.hold = true;
    const reads = Array.from({ length: 5 }, read);
    // The controller reads head 2 from the shadow page to post a third entry, then the CQ is full.
    await until(() => served!.device.sqs[2]!.head === 5);
    expect(served!.device.cqs[2]!.full).toBe(true);
    expect(h.read(served!.device.shadow!.eventIdx + 20n, 4).readUInt32LE(0)).toBe(2); // CQ 2: ring once the head passes 2
    h.hold = false;
    expect((await Promise.all(reads)).map((c) => c.status)).toEqual(new Array(5).fill(S.SUCCESS));
  });

  test('ioeventfd: queues created before Doorbell Buffer Config (as Linux does) run once it comes; an ioeventfd past the 16 wired traps into the same path', async () => {
    served = await serve(createDevice(['--size', '1M', '--doorbells', 'ioeventfd']));
    const h = (host = await NvmeHost.attach(await served.client()));
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    expect((await h.createIoQueuePair(1, 16)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    // A kick with no shadow page has no value: nothing runs, nothing is reported.
    const early = h.submit(1, { opcode: Op.FLUSH, nsid: 1 });
    await h.reg32(Register.CSTS); // a round trip: the kick has been seen
    expect(served.device.sqs[1]!.head).toBe(0);
    // The shadow page, as Linux fills it: the tail it has written so far; the command then runs.
    const shadowPage = h.alloc(PAGE);
    const eventIdxPage = h.alloc(PAGE);
    h.write(shadowPage + 8n, Buffer.from([1, 0, 0, 0]));
    expect((await h.shadowDoorbells(shadowPage, eventIdxPage)).status).toBe(S.SUCCESS);
    expect((await early).status).toBe(S.SUCCESS);
    expect(h.read(eventIdxPage + 8n, 4).readUInt32LE(0)).toBe(1); // seen up to tail 1
    // Queue 12's doorbells are not among the client's 16 fds: its writes go as messages, which the library signals.
    expect((await h.createIoQueuePair(12, 16)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    const page = h.alloc(PAGE);
    h.write(page, pattern(4096, 9));
    expect((await h.submit(12, { opcode: Op.WRITE, nsid: 1, prp1: page, cdw10: 0, cdw12: 7 })).status).toBe(S.SUCCESS);
    expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: page + BigInt(PAGE / 2), cdw10: 0, cdw12: 0 })).status).toBe(S.SUCCESS);
    expect(h.read(page + BigInt(PAGE / 2), 512)).toEqual(pattern(4096, 9).subarray(0, 512));
  });

  test('--shadow-doorbells off: OACS clear and Doorbell Buffer Config an Invalid Opcode; refused with ioeventfd doorbells', async () => {
    served = await serve(createDevice(['--size', '1M', '--shadow-doorbells', 'off']));
    const h = (host = await NvmeHost.attach(await served.client()));
    await h.enable();
    const buf = h.alloc(PAGE);
    expect((await h.admin({ opcode: 0x06, prp1: buf, cdw10: 1 })).status).toBe(S.SUCCESS);
    expect(h.read(buf, PAGE).readUInt16LE(256)).toBe(0);
    expect((await h.shadowDoorbells()).status).toBe(S.INVALID_OPCODE);
    expect(() => createDevice(['--size', '1M', '--doorbells', 'ioeventfd', '--shadow-doorbells', 'off'])).toThrow(/need shadow doorbells/);
    expect(() => createDevice(['--size', '1M', '--shadow-doorbells', 'maybe'])).toThrow(/expected on or off/);
  });

  test('bad pages: unaligned is Invalid Field, outside guest memory a Data Transfer Error; I/O goes on by register', async () => {
    const h = await bringUp('trap');
    const page = h.alloc(PAGE);
    expect((await h.shadowDoorbells(page + 8n, page)).status).toBe(S.INVALID_FIELD);
    expect((await h.shadowDoorbells(page, page + 0x800n)).status).toBe(S.INVALID_FIELD);
    expect((await h.shadowDoorbells(0x40000000n, page)).status).toBe(S.DATA_TRANSFER_ERROR);
    expect((await h.shadowDoorbells(page, MEMORY_BASE - BigInt(PAGE))).status).toBe(S.DATA_TRANSFER_ERROR);
    expect(served!.device.shadow).toBeUndefined();
    expect((await io(h, Op.WRITE, 16, pattern(4096, 5))).c.status).toBe(S.SUCCESS);
    expect(imageBytes(16 * 512, 4096)).toEqual(pattern(4096, 5));
  });

  test('queues that exist go on from the shadow page; a controller reset forgets it', async () => {
    const h = await bringUp('trap');
    expect((await io(h, Op.WRITE, 0, pattern(4096, 6))).c.status).toBe(S.SUCCESS);
    const shadowPage = h.alloc(PAGE);
    expect((await h.shadowDoorbells(shadowPage)).status).toBe(S.SUCCESS);
    expect(h.read(shadowPage + 8n, 8)).toEqual(Buffer.from([1, 0, 0, 0, 1, 0, 0, 0])); // SQ 1 tail, CQ 1 head
    expect((await io(h, Op.READ, 0, 4096)).data).toEqual(pattern(4096, 6));
    await h.disable();
    expect(served!.device.shadow).toBeUndefined();
    h.write(shadowPage + 8n, Buffer.from([9, 0, 0, 0])); // a stale shadow value must not be read
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    expect((await h.createIoQueuePair(1, 16)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    expect((await io(h, Op.READ, 0, 4096)).data).toEqual(pattern(4096, 6));
  });
});

describe('commands', () => {
  test('Flush, Write Zeroes and Dataset Management deallocate', async () => {
    const h = await bringUp('mmap');
    await io(h, Op.WRITE, 0, pattern(64 << 10, 4));
    expect((await h.submit(1, { opcode: Op.FLUSH, nsid: 1 })).status).toBe(S.SUCCESS);
    expect((await h.submit(1, { opcode: Op.WRITE_ZEROES, nsid: 1, cdw10: 8, cdw12: 7 })).status).toBe(S.SUCCESS);
    expect(imageBytes(8 * 512, 4096)).toEqual(Buffer.alloc(4096));
    expect(imageBytes(0, 4096)).toEqual(pattern(64 << 10, 4).subarray(0, 4096));
    const ranges = h.alloc(PAGE);
    const r = Buffer.alloc(32);
    r.writeUInt32LE(8, 4); r.writeBigUInt64LE(16n, 8); // 8 blocks at 16
    r.writeUInt32LE(8, 20); r.writeBigUInt64LE(100n, 24); // 8 blocks at 100
    h.write(ranges, r);
    expect((await h.submit(1, { opcode: Op.DSM, nsid: 1, prp1: ranges, cdw10: 1, cdw11: 4 })).status).toBe(S.SUCCESS);
    expect(imageBytes(16 * 512, 4096)).toEqual(Buffer.alloc(4096));
    expect(imageBytes(100 * 512, 4096)).toEqual(Buffer.alloc(4096));
    expect(imageBytes(24 * 512, 512)).toEqual(pattern(64 << 10, 4).subarray(24 * 512, 25 * 512));
    // A range past the end: nothing is zeroed.
    r.writeBigUInt64LE(BigInt(BLOCKS), 8);
    h.write(ranges, r);
    await io(h, Op.WRITE, 100, pattern(4096, 5));
    expect((await h.submit(1, { opcode: Op.DSM, nsid: 1, prp1: ranges, cdw10: 1, cdw11: 4 })).status).toBe(S.LBA_OUT_OF_RANGE);
    expect(imageBytes(100 * 512, 4096)).toEqual(pattern(4096, 5));
  });

  test('Dataset Management deallocate punches a hole in the image: its blocks go back to the filesystem', async () => {
    const h = await bringUp('trap');
    for (let i = 0; i < 4; i++) expect((await io(h, Op.WRITE, 256 * i, pattern(128 << 10, 10 + i))).c.status).toBe(S.SUCCESS);
    expect((await h.submit(1, { opcode: Op.FLUSH, nsid: 1 })).status).toBe(S.SUCCESS);
    const written = statSync(imagePath()).blocks;
    expect(written * 512).toBeGreaterThanOrEqual(512 << 10);
    const ranges = h.alloc(PAGE);
    const r = Buffer.alloc(16);
    r.writeUInt32LE(768, 4); r.writeBigUInt64LE(256n, 8); // the last 384 KiB of the 512
    h.write(ranges, r);
    expect((await h.submit(1, { opcode: Op.DSM, nsid: 1, prp1: ranges, cdw10: 0, cdw11: 4 })).status).toBe(S.SUCCESS);
    expect(statSync(imagePath()).size).toBe(IMAGE_SIZE);
    expect((written - statSync(imagePath()).blocks) * 512).toBeGreaterThanOrEqual(384 << 10);
    expect(imageBytes(256 * 512, 384 << 10)).toEqual(Buffer.alloc(384 << 10));
    expect(imageBytes(0, 128 << 10)).toEqual(pattern(128 << 10, 10));
  });

  test('features: number of queues, write cache, coalescing, async event config', async () => {
    served = await serve(createDevice(['--size', '1M']));
    const h = (host = await NvmeHost.attach(await served.client()));
    await h.enable();
    const get = (fid: number, cdw11 = 0) => h.admin({ opcode: 0x0a, cdw10: fid, cdw11 });
    const set = (fid: number, cdw11: number, save = false) => h.admin({ opcode: 0x09, cdw10: fid | (save ? 0x80000000 : 0), cdw11 });
    expect((await set(0x07, (3 << 16) | 3)).dw0).toBe((3 << 16) | 3);
    expect((await get(0x07)).dw0).toBe((3 << 16) | 3);
    expect((await set(0x07, 0xffff)).status).toBe(S.INVALID_FIELD);
    expect((await h.createIoQueuePair(5, 8))[0].status).toBe(S.INVALID_QUEUE_ID); // only 4 allocated
    expect((await h.createIoQueuePair(4, 8)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    expect((await set(0x07, 7)).status).toBe(S.COMMAND_SEQUENCE_ERROR);
    expect((await get(0x06)).dw0).toBe(1);
    expect((await set(0x06, 0)).status).toBe(S.SUCCESS);
    expect((await get(0x06)).dw0).toBe(0);
    expect((await set(0x08, 0x0a05)).status).toBe(S.SUCCESS);
    expect((await get(0x08)).dw0).toBe(0x0a05);
    expect((await set(0x0b, 0x1ff)).status).toBe(S.INVALID_FIELD); // bit 8: a notice this controller never sends
    expect((await set(0x0b, 0xff)).status).toBe(S.SUCCESS);
    expect((await get(0x0b)).dw0).toBe(0xff);
    expect((await get(0x0b | (1 << 8))).dw0).toBe(0); // default
    expect((await set(0x0b, 1, true)).status).toBe(S.FEATURE_NOT_SAVEABLE);
    expect((await get(0x7f)).status).toBe(S.INVALID_FIELD);
    expect((await set(0x02, 1)).status).toBe(S.INVALID_FIELD); // power state 1 does not exist
  });

  test('log pages: error, SMART, firmware slot; others are Invalid Log Page', async () => {
    const h = await bringUp('trap');
    await io(h, Op.WRITE, 0, pattern(8192, 6));
    await io(h, Op.READ, 0, 4096);
    const bad = await h.submit(1, { opcode: 0x7e, nsid: 1 });
    const page = h.alloc(PAGE);
    const log = async (lid: number, bytes: number) => ({ c: await h.admin({ opcode: 0x02, nsid: 0xffffffff, prp1: page, cdw10: lid | ((bytes / 4 - 1) << 16) }), d: h.read(page, bytes) });
    const smart = await log(0x02, 512);
    expect(smart.c.status).toBe(S.SUCCESS);
    expect([smart.d.readBigUInt64LE(64), smart.d.readBigUInt64LE(80)]).toEqual([1n, 1n]); // host read and write commands
    expect(smart.d.readBigUInt64LE(48)).toBe(1n); // 16 blocks written: one data unit, rounded up
    const errors = await log(0x01, 64);
    expect([errors.d.readBigUInt64LE(0), errors.d.readUInt16LE(8), errors.d.readUInt16LE(10), errors.d.readUInt16LE(12) >> 1]).toEqual([1n, 1, bad.cid, S.INVALID_OPCODE]);
    const firmware = await log(0x03, 512);
    expect([firmware.d[0], firmware.d.toString('ascii', 8, 11)]).toEqual([1, '1.0']);
    expect((await log(0x05, 512)).c.status).toBe(S.INVALID_LOG_PAGE);
  });
});

describe('bad input gets NVMe statuses, never a crash or a hang', () => {
  test('unknown opcodes, namespaces, LBAs, SGLs and fused commands', async () => {
    const h = await bringUp('mmap');
    const page = h.alloc(PAGE);
    expect((await h.admin({ opcode: 0x7f })).status).toBe(S.INVALID_OPCODE);
    expect((await h.admin({ opcode: 0x80 })).status).toBe(S.INVALID_OPCODE); // Format NVM: not offered
    expect((await h.submit(1, { opcode: 0x55, nsid: 1 })).status).toBe(S.INVALID_OPCODE);
    const read = (fields: object) => h.submit(1, { opcode: Op.READ, nsid: 1, prp1: page, ...fields });
    expect((await read({ nsid: 2 })).status).toBe(S.INVALID_NAMESPACE);
    expect((await read({ cdw10: BLOCKS })).status).toBe(S.LBA_OUT_OF_RANGE);
    expect((await read({ cdw10: BLOCKS - 1, cdw12: 1 })).status).toBe(S.LBA_OUT_OF_RANGE);
    expect((await read({ cdw11: 1 })).status).toBe(S.LBA_OUT_OF_RANGE); // LBA 2^32
    expect((await read({ flags: 0x40 })).status).toBe(S.INVALID_FIELD); // PSDT: SGL
    expect((await read({ flags: 0x01 })).status).toBe(S.INVALID_FIELD); // fused
    const c = await read({ cdw12: 2047 }); // 1 MiB: past MDTS
    expect([c.status, c.dnr]).toEqual([S.INVALID_FIELD, true]);
    expect((await read({})).status).toBe(S.SUCCESS);
  });

  test('PRPs outside guest memory or misaligned: Data Transfer Error, PRP Offset Invalid', async () => {
    const h = await bringUp('trap');
    const page = h.alloc(PAGE);
    const outside = MEMORY_BASE + BigInt(h.memory.size);
    const read = (prp1: bigint, prp2 = 0n, blocks = 8) => h.submit(1, { opcode: Op.READ, nsid: 1, prp1, prp2, cdw12: blocks - 1 });
    expect((await read(outside)).status).toBe(S.DATA_TRANSFER_ERROR);
    expect((await read(0n)).status).toBe(S.DATA_TRANSFER_ERROR);
    expect((await read(page + 2n)).status).toBe(S.PRP_OFFSET_INVALID);
    expect((await read(page + 512n, page + 8n)).status).toBe(S.PRP_OFFSET_INVALID); // second page with an offset
    expect((await read(page, outside, 16)).status).toBe(S.DATA_TRANSFER_ERROR); // second page outside
    expect((await read(page, outside, 64)).status).toBe(S.DATA_TRANSFER_ERROR); // the list itself outside
    const list = h.alloc(PAGE);
    h.write(list, Buffer.from(new BigUint64Array([outside, outside]).buffer));
    expect((await read(page, list, 24)).status).toBe(S.DATA_TRANSFER_ERROR); // entries outside
    // Identify into nowhere, and a queue whose ring is outside guest memory.
    expect((await h.admin({ opcode: 0x06, prp1: outside, cdw10: 1 })).status).toBe(S.DATA_TRANSFER_ERROR);
    expect((await io(h, Op.READ, 0, 4096)).c.status).toBe(S.SUCCESS);
  });

  test('queue creation and deletion errors', async () => {
    const h = await bringUp('mmap');
    const ring = h.alloc(PAGE * 16);
    const createCq = (cdw10: number, cdw11: number, prp1 = ring) => h.admin({ opcode: 0x05, prp1, cdw10, cdw11 });
    const createSq = (cdw10: number, cdw11: number) => h.admin({ opcode: 0x01, prp1: ring, cdw10, cdw11 });
    expect((await createCq((7 << 16) | 0, 1)).status).toBe(S.INVALID_QUEUE_ID);
    expect((await createCq((7 << 16) | 1, 1)).status).toBe(S.INVALID_QUEUE_ID); // exists
    expect((await createCq((7 << 16) | 40, 1)).status).toBe(S.INVALID_QUEUE_ID);
    expect((await createCq((4096 << 16) | 2, 1)).status).toBe(S.INVALID_QUEUE_SIZE);
    expect((await createCq(2, 1)).status).toBe(S.INVALID_QUEUE_SIZE); // one entry
    expect((await createCq((7 << 16) | 2, (32 << 16) | 3)).status).toBe(S.INVALID_INTERRUPT_VECTOR);
    expect((await createCq((7 << 16) | 2, 2)).status).toBe(S.INVALID_FIELD); // not contiguous
    expect((await createCq((7 << 16) | 2, 1, ring + 64n)).status).toBe(S.PRP_OFFSET_INVALID);
    expect((await createSq((7 << 16) | 2, (9 << 16) | 1)).status).toBe(S.COMPLETION_QUEUE_INVALID);
    expect((await createSq((7 << 16) | 2, (0 << 16) | 1)).status).toBe(S.COMPLETION_QUEUE_INVALID);
    expect((await h.admin({ opcode: 0x04, cdw10: 1 })).status).toBe(S.INVALID_QUEUE_DELETION); // SQ 1 uses it
    expect((await h.admin({ opcode: 0x00, cdw10: 0 })).status).toBe(S.INVALID_QUEUE_ID);
    expect((await h.admin({ opcode: 0x00, cdw10: 1 })).status).toBe(S.SUCCESS);
    expect((await h.admin({ opcode: 0x00, cdw10: 1 })).status).toBe(S.INVALID_QUEUE_ID);
    expect((await h.admin({ opcode: 0x04, cdw10: 1 })).status).toBe(S.SUCCESS);
    h.queues.delete(1);
    expect((await h.createIoQueuePair(1, 16)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    expect((await io(h, Op.WRITE, 0, pattern(4096, 7))).c.status).toBe(S.SUCCESS);
  });

  test('a full CQ holds further completions until the host consumes; an SQ tail past the ring is an async event', async () => {
    const h = await bringUp('mmap', 4);
    const q = h.queues.get(1)!;
    const cq = served!.device.cqs[1]!;
    const page = h.alloc(PAGE);
    h.hold = true;
    const first = [0, 1, 2].map(() => h.enqueue(1, { opcode: Op.READ, nsid: 1, prp1: page }));
    h.kick(1);
    await until(() => cq.tail === 3);
    expect(cq.full).toBe(true);
    // A fourth command (the SQ's tail wraps to 0) stays in the SQ while the CQ is full.
    const fourth = h.enqueue(1, { opcode: Op.READ, nsid: 1, prp1: page });
    expect(q.sqTail).toBe(0);
    const rings = served!.device.doorbellStats.rings;
    h.kick(1);
    // The controller has seen the doorbell (its batch ran) and still left the entry in the SQ.
    await until(() => served!.device.doorbellStats.rings > rings);
    expect(served!.device.sqs[1]!.head).toBe(3);
    h.hold = false;
    expect((await Promise.all([...first, fourth])).map((c) => c.status)).toEqual([0, 0, 0, 0]);
    // An AER, then a tail doorbell past the ring.
    const event = h.admin({ opcode: 0x0c });
    h.ring(2, 9);
    const e = await event;
    expect([e.status, e.dw0 & 7, (e.dw0 >> 8) & 0xff, (e.dw0 >> 16) & 0xff]).toEqual([S.SUCCESS, 0, 1, 1]);
    h.ring(2, q.sqTail);
    expect((await io(h, Op.READ, 0, 512)).c.status).toBe(S.SUCCESS);
  });

  test('more AERs than AERL allows: AER Limit Exceeded; Abort answers; Keep Alive is not offered', async () => {
    const h = await bringUp('trap');
    const pending = [0, 1, 2, 3].map(() => h.admin({ opcode: 0x0c }));
    expect((await h.admin({ opcode: 0x0c })).status).toBe(S.AER_LIMIT_EXCEEDED);
    expect(served!.device.events.requests).toHaveLength(4);
    const abort = await h.admin({ opcode: 0x08, cdw10: (1 << 16) | 0 });
    expect([abort.status, abort.dw0 & 1]).toEqual([S.SUCCESS, 1]);
    expect((await h.admin({ opcode: 0x18 })).status).toBe(S.INVALID_OPCODE);
    // A disable ends the outstanding requests without completions.
    await h.disable();
    expect(served!.device.events.requests).toHaveLength(0);
    void pending;
  });
});

describe('controller state', () => {
  test('enable, shutdown, disable, NVM subsystem reset; bad admin settings are a fatal status', async () => {
    const h = await bringUp('mmap');
    await h.setReg32(Register.CC, (await h.reg32(Register.CC)) | (1 << 14));
    expect((await h.reg32(Register.CSTS)) & Csts.SHST_MASK).toBe(Csts.SHST_COMPLETE);
    expect(await h.disable()).toBe(0);
    expect(served!.device.sqs.filter(Boolean)).toHaveLength(0);
    expect((await h.enable()) & (Csts.RDY | Csts.SHST_MASK)).toBe(Csts.RDY);
    await h.setReg32(Register.NSSR, NSSR_RESET);
    expect(await h.reg32(Register.CSTS)).toBe(Csts.NSSRO);
    await h.setReg32(Register.CSTS, Csts.NSSRO);
    expect(await h.reg32(Register.CSTS)).toBe(0);
    await h.setReg32(Register.AQA, 0);
    await h.setReg32(Register.CC, 1 | (1 << 7)); // 8 KiB pages: unsupported
    expect((await h.reg32(Register.CSTS)) & Csts.CFS).toBe(Csts.CFS);
  });

  test('FLR and DEVICE_RESET return the registers to power-on and drop every queue', async () => {
    const h = await bringUp('mmap');
    await h.client.reset();
    expect([await h.reg32(Register.CC), await h.reg32(Register.CSTS), await h.reg32(Register.AQA)]).toEqual([0, 0, 0]);
    expect(served!.device.cqs.filter(Boolean)).toHaveLength(0);
    await h.moveTo(h.client); // the reset disabled MSI-X and bus mastering: set them up again
    h.queues.clear();
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    const devctl = (await guest(h.client).capabilities()).get(CapabilityId.PCI_EXPRESS)! + 8;
    await h.client.regionWrite(Region.CONFIG, BigInt(devctl), Buffer.from([0, 0x80]));
    expect(await h.reg32(Register.CC)).toBe(0);
    expect(served!.device.sqs.filter(Boolean)).toHaveLength(0);
  });
});

describe('interrupts', () => {
  test('one MSI-X vector per CQ, held pending while masked', async () => {
    const h = await bringUp('mmap');
    expect((await h.createIoQueuePair(2, 16)).map((c) => c.status)).toEqual([0, 0]);
    h.vectors.forEach((irq) => irq.take());
    const page = h.alloc(PAGE);
    await h.submit(2, { opcode: Op.READ, nsid: 1, prp1: page });
    expect(h.vectors.slice(0, 3).map((irq) => irq.take())).toEqual([0, 0, 1]);
    // Mask vector 1 in the MSI-X table: a completion sets its PBA bit instead.
    const control = BigInt(MSIX_TABLE + 16 * 1 + 12);
    await h.client.regionWrite(Region.BAR0, control, Buffer.from([1, 0, 0, 0]));
    await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: page });
    expect(h.vectors[1].take()).toBe(0);
    expect((await h.reg32(MSIX_PBA)) & 2).toBe(2);
    await h.client.regionWrite(Region.BAR0, control, Buffer.from([0, 0, 0, 0]));
    await until(() => h.vectors[1].take() === 1);
    expect((await h.reg32(MSIX_PBA)) & 2).toBe(0);
  });

  test.each(['trap', 'mmap'] as const)('INTx when MSI-X is off, masked by INTMS (%s doorbells)', async (doorbells) => {
    served = await serve(createDevice(['--size', '1M', '--doorbells', doorbells]));
    const client = await served.client();
    const h = (host = await NvmeHost.attach(client));
    const msix = (await guest(client).capabilities()).get(CapabilityId.MSIX)!;
    await guest(client).setCfg16(msix + 2, 0);
    const intx = new EventfdIrq();
    try {
      await client.setIrqs({ index: IrqIndex.INTX, eventfds: [intx] });
      await h.enable();
      const command = async () => {
        expect((await h.admin({ opcode: 0x0a, cdw10: 0x07 })).status).toBe(S.SUCCESS);
        // The host consumed the entry: the level drops; unmask as a VMM does after the guest's EOI.
        await until(() => !served!.device.irq.intxRaised);
        await client.setIrqs({ index: IrqIndex.INTX, action: 'unmask', count: 1 });
        return intx.take();
      };
      expect(await command()).toBe(1);
      await h.setReg32(Register.INTMS, 1);
      expect(await command()).toBe(0);
      await h.setReg32(Register.INTMC, 1);
      expect(await command()).toBe(1);
      // An I/O CQ's level drops as the host consumes too (a mapped head is watched while the level is up).
      expect((await h.createIoQueuePair(1, 16)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
      await client.setIrqs({ index: IrqIndex.INTX, action: 'unmask', count: 1 });
      for (let i = 0; i < 3; i++) {
        expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: h.alloc(4096) })).status).toBe(S.SUCCESS);
        await until(() => !served!.device.irq.intxRaised);
        await client.setIrqs({ index: IrqIndex.INTX, action: 'unmask', count: 1 });
      }
    } finally {
      intx.close();
    }
  });
});

test('a served controller leaves no fds behind its clients', async () => {
  served = await serve(createDevice(['--size', '1M']));
  const before = openFdCount();
  const h = await NvmeHost.attach(await served.client());
  await h.enable();
  h.close();
  h.client.close();
  await until(() => served!.server.session === undefined);
  expect(openFdCount()).toBe(before);
});

test('vfio-user serve examples/nvme -- --image FILE --size N creates the image sparse and serves it', async () => {
  const root = join(__dirname, '..');
  const socket = join(dir.path, '..', 'serve.sock');
  // Node itself with tsx's loader, not the tsx launcher: killing the launcher would orphan the server.
  const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'ts/cli/main.ts'), 'serve', join(root, 'examples/nvme'), '--socket', socket, '--', '--image', imagePath(), '--size', '8M'], { stdio: ['ignore', 'ignore', 'pipe'] });
  try {
    await until(() => existsSync(socket), 15000);
    const stat = statSync(imagePath());
    expect(stat.size).toBe(8 << 20);
    expect(stat.blocks * 512).toBeLessThan(8 << 20);
    const client = await connect(socket);
    expect((await client.regionRead(Region.BAR0, BigInt(Register.VS), 4)).readUInt32LE(0)).toBe(0x00010400);
    expect((await client.regionRead(Region.CONFIG, 0x08n, 4)).readUInt32LE(0) >>> 8).toBe(0x010802);
    client.close();
  } finally {
    child.kill('SIGKILL');
  }
});
