/**
 * examples/nvme checks every field of every command against the spec and
 * its own limits, over a real socket: each class of bad field gets the
 * status the spec names (QEMU's NVMe where the spec leaves a choice), for
 * that command only; an unexpected exception is Internal Error; Abort ends
 * an outstanding Asynchronous Event Request; a queue's work is batched; and
 * migration state from a client is checked like any other input.
 */
import { describe, expect, test } from 'vitest';
import { MigrationState, Region, type BlockCallback, type DmaSpace, type SgList } from '../ts/index.js';
import createDevice from '../examples/nvme/index.js';
import { Csts, NSSR_RESET, NvmeController, Register, type DoorbellMode } from '../examples/nvme/controller.js';
import { NvmeStateError, parseState } from '../examples/nvme/state.js';
import { MemoryStore } from '../examples/nvme/store.js';
import { testCleanups } from './cleanups.js';
import { until } from './helpers.js';
import { pciFunction } from '../ts/pci/device.js';
import { MEMORY_BASE, PAGE } from './nvme-host.js';
import { attachNvme, bringUpNvme, Op, roundTrip, S, SETUPS, u64 } from './nvme-setup.js';

const cleanups = testCleanups();
const BLOCKS = (4 << 20) / 512;

describe('registers', () => {
  test('CC.EN with a page size, command set, arbitration or queue entry size the controller lacks is a fatal status (CSTS.CFS)', async () => {
    const { host: h } = await attachNvme(cleanups, createDevice(['--size', '1M']));
    const q = h.newQueue(0, 8, 8);
    await h.setReg32(Register.AQA, (7 << 16) | 7);
    await h.setReg64(Register.ASQ, q.sqBase);
    await h.setReg64(Register.ACQ, q.cqBase);
    const good = (4 << 20) | (6 << 16) | 1;
    for (const cc of [good | (1 << 7), good | (1 << 4), good | (1 << 11), (good & ~(0xf << 16)) | (7 << 16), (good & ~(0xf << 20)) | (5 << 20), 1]) {
      await h.setReg32(Register.CC, cc);
      expect((await h.reg32(Register.CSTS)) & (Csts.CFS | Csts.RDY), `CC 0x${cc.toString(16)}`).toBe(Csts.CFS);
      await h.setReg32(Register.CC, 0);
    }
    await h.setReg32(Register.CC, good);
    expect((await h.reg32(Register.CSTS)) & (Csts.CFS | Csts.RDY)).toBe(Csts.RDY);
  });
});

describe('resets with commands in the store', () => {
  /** Memory whose reads wait until the test lets them go. */
  class HeldStore extends MemoryStore {
    readonly held: (() => void)[] = [];
    override read(dma: DmaSpace, sg: SgList, position: number, done: BlockCallback): void {
      this.held.push(() => super.read(dma, sg, position, done));
    }
  }
  const register = async (device: NvmeController, offset: number) => Buffer.from(await pciFunction(device).read(Region.BAR0, offset, 4)).readUInt32LE(0);

  test.each(['CC.EN = 0', 'NVM subsystem reset', 'DEVICE_RESET'] as const)('%s: CSTS.RDY stays set and the reset waits until a read in the store has landed; its completion is dropped', async (how) => {
    const store = new HeldStore(1 << 20);
    const device = new NvmeController({ store });
    const { host: h } = await attachNvme(cleanups, device);
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    expect((await h.createIoQueuePair(1, 8)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    const page = h.alloc(PAGE);
    h.write(page, Buffer.alloc(PAGE, 0xee));
    void h.submit(1, { opcode: Op.READ, nsid: 1, prp1: page, cdw12: 7 });
    await until(() => store.held.length === 1);
    const request = how === 'CC.EN = 0' ? h.setReg32(Register.CC, 0) : how === 'DEVICE_RESET' ? h.client.reset() : h.setReg32(Register.NSSR, NSSR_RESET);
    // What guest memory holds when the reset answers.
    const answered = request.then(() => h.read(page, PAGE));
    await until(() => device.sqs.length === 0);
    if (how !== 'DEVICE_RESET') expect((await register(device, Register.CSTS)) & Csts.RDY).toBe(Csts.RDY);
    store.held[0]();
    // The read's data reached guest memory before the reset answered; no completion reached the CQ the host gave up.
    expect(await answered).toEqual(Buffer.alloc(PAGE));
    expect((await h.reg32(Register.CSTS)) & Csts.RDY).toBe(0);
    expect(h.read(h.queues.get(1)!.cqBase, 16)).toEqual(Buffer.alloc(16));
  });

  // Found by vfio-user fuzz --mode nvme: the completion, and a ring in the same moment, reached for the
  // gone client's memory and failed the device (its log said so; the next client's reset hid it).
  test.each(SETUPS)('with %s doorbells: a read that lands after its client left is answered to the next client, and the device never fails', async (setup) => {
    const [doorbells, shadow] = setup.split('+');
    const store = new HeldStore(1 << 20);
    const device = new NvmeController({ store, doorbells: doorbells as DoorbellMode });
    const { host: h, served, deviceErrors } = await attachNvme(cleanups, device);
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    if (shadow || doorbells === 'ioeventfd') expect((await h.shadowDoorbells()).status).toBe(S.SUCCESS);
    expect((await h.createIoQueuePair(1, 8)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    const read = h.submit(1, { opcode: Op.READ, nsid: 1, prp1: h.alloc(PAGE), cdw12: 7 });
    await until(() => store.held.length === 1);
    h.client.close();
    await until(() => served.server.session === undefined);
    // Lands with no client: its data had nowhere to go (the old client's memory is closed), its completion waits.
    store.held[0]();
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(deviceErrors).toEqual([]);
    await h.moveTo(await served.client());
    if (shadow || doorbells === 'ioeventfd') expect((await h.shadowDoorbells()).status).toBe(S.SUCCESS);
    // The next batch posts it (a write: this store holds every read).
    expect((await h.submit(1, { opcode: Op.WRITE, nsid: 1, prp1: h.alloc(PAGE), cdw12: 7 })).status).toBe(S.SUCCESS);
    expect((await read).status).toBe(S.DATA_TRANSFER_ERROR);
    expect(await h.reg32(Register.CSTS)).toBe(Csts.RDY);
    expect(deviceErrors).toEqual([]);
  });
});

describe('the error boundary', () => {
  test('a controller that failed acting on a batch of mapped doorbells acts on them again after the reset that clears the failure', async () => {
    class FailsOnce extends NvmeController {
      fail = false;
      override ringDoorbell(index: number, value: number): void {
        if (this.fail) {
          this.fail = false;
          throw new Error('planted failure in a doorbell batch');
        }
        super.ringDoorbell(index, value);
      }
    }
    const device = new FailsOnce({ store: new MemoryStore(1 << 20), doorbells: 'mmap' });
    const { host: h, deviceErrors } = await attachNvme(cleanups, device, { deviceErrors: 'expected' });
    expect(h.mappedDoorbells).toBe(true);
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    device.fail = true;
    // Its doorbell batch fails: the command is never answered (the host gives up on it).
    void h.admin({ opcode: 0x06, cdw10: 1, prp1: h.alloc(PAGE) }).catch(() => undefined);
    await until(() => deviceErrors.length === 1);
    expect(deviceErrors[0].message).toBe('planted failure in a doorbell batch');
    await h.client.reset();
    await h.moveTo(h.client); // the reset disabled MSI-X and bus mastering: set them up again
    h.queues.clear();
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    expect((await h.createIoQueuePair(1, 8)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    await roundTrip(h, 0x66);
    expect(deviceErrors).toHaveLength(1);
  });
});

describe('command fields', () => {
  test('opcodes, FUSE and PSDT: Invalid Opcode, then Invalid Field; Keep Alive is not offered (KAS 0)', async () => {
    const { host: h, deviceErrors } = await bringUpNvme(cleanups, 'trap');
    const page = h.alloc(PAGE);
    for (const opcode of [0x03, 0x07, 0x0d, 0x10, 0x18, 0x7f, 0x80, 0xc0, 0xff]) expect((await h.admin({ opcode })).status).toBe(S.INVALID_OPCODE);
    for (const opcode of [0x04, 0x05, 0x0c, 0x0d, 0x11, 0x7f, 0x80, 0xff]) expect((await h.submit(1, { opcode, nsid: 1 })).status).toBe(S.INVALID_OPCODE);
    for (const flags of [0x01, 0x02, 0x40, 0x80]) {
      expect((await h.admin({ opcode: 0x06, prp1: page, cdw10: 1, flags })).status).toBe(S.INVALID_FIELD);
      expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: page, flags })).status).toBe(S.INVALID_FIELD);
      expect((await h.submit(1, { opcode: Op.FLUSH, nsid: 1, flags })).status).toBe(S.INVALID_FIELD);
    }
    expect((await h.admin({ opcode: 0x06, prp1: page, cdw10: 1 })).status).toBe(S.SUCCESS);
    const identify = h.read(page, PAGE);
    expect(identify.readUInt16LE(320)).toBe(0); // KAS
    expect(identify[525]).toBe(0x07); // VWC: present, Flush takes the broadcast NSID
    expect(identify[261]).toBe(0x04); // LPA: extended Get Log Page data (NUMDU, LPOL/LPOU)
    expect(deviceErrors).toEqual([]);
  });

  test('NSIDs: 0, out of range and broadcast where not allowed are Invalid Namespace', async () => {
    const { host: h } = await bringUpNvme(cleanups, 'trap');
    const page = h.alloc(PAGE);
    for (const nsid of [0, 2, 0xfffffffe, 0xffffffff]) {
      expect((await h.submit(1, { opcode: Op.READ, nsid, prp1: page })).status).toBe(S.INVALID_NAMESPACE);
      expect((await h.submit(1, { opcode: Op.WRITE_ZEROES, nsid })).status).toBe(S.INVALID_NAMESPACE);
      expect((await h.submit(1, { opcode: Op.DSM, nsid, prp1: page })).status).toBe(S.INVALID_NAMESPACE);
      expect((await h.admin({ opcode: 0x06, nsid, prp1: page, cdw10: 0 })).status).toBe(S.INVALID_NAMESPACE);
      expect((await h.admin({ opcode: 0x06, nsid, prp1: page, cdw10: 3 })).status).toBe(S.INVALID_NAMESPACE);
    }
    for (const nsid of [0, 2]) expect((await h.submit(1, { opcode: Op.FLUSH, nsid })).status).toBe(S.INVALID_NAMESPACE);
    expect((await h.submit(1, { opcode: Op.FLUSH, nsid: 0xffffffff })).status).toBe(S.SUCCESS);
    expect((await h.admin({ opcode: 0x06, nsid: 0xfffffffe, prp1: page, cdw10: 2 })).status).toBe(S.INVALID_NAMESPACE);
    expect((await h.admin({ opcode: 0x06, nsid: 1, prp1: page, cdw10: 2 })).status).toBe(S.SUCCESS);
    expect(h.read(page, 4).readUInt32LE(0)).toBe(0); // no active namespace past 1
  });

  test('LBA ranges: SLBA + NLB past the namespace or past 2^64 is LBA Out of Range, and nothing changes', async () => {
    const { host: h } = await bringUpNvme(cleanups, 'trap');
    await roundTrip(h, 0x5a);
    const page = h.alloc(PAGE);
    const lba = (value: bigint) => ({ cdw10: Number(value & 0xffffffffn), cdw11: Number(value >> 32n) });
    for (const [slba, blocks] of [[BigInt(BLOCKS), 1], [BigInt(BLOCKS - 1), 2], [(1n << 64n) - 1n, 2], [1n << 63n, 1], [(1n << 64n) - 1n, 0x10000]] as const) {
      expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: page, ...lba(slba), cdw12: Math.min(blocks, 8) - 1 })).status).toBe(S.LBA_OUT_OF_RANGE);
      expect((await h.submit(1, { opcode: Op.WRITE_ZEROES, nsid: 1, ...lba(slba), cdw12: blocks - 1 })).status).toBe(S.LBA_OUT_OF_RANGE);
      const range = Buffer.alloc(16);
      range.writeUInt32LE(blocks, 4);
      range.writeBigUInt64LE(slba, 8);
      h.write(page, range);
      expect((await h.submit(1, { opcode: Op.DSM, nsid: 1, prp1: page, cdw11: 4 })).status).toBe(S.LBA_OUT_OF_RANGE);
    }
    // A DSM range of 2^32 - 1 blocks at 0, and 256 ranges with one bad: none is freed.
    const ranges = Buffer.alloc(256 * 16);
    for (let i = 0; i < 256; i++) { ranges.writeUInt32LE(1, 16 * i + 4); ranges.writeBigUInt64LE(BigInt(i), 16 * i + 8); }
    ranges.writeUInt32LE(0xffffffff, 255 * 16 + 4);
    const list = h.alloc(PAGE);
    h.write(list, ranges);
    expect((await h.submit(1, { opcode: Op.DSM, nsid: 1, prp1: list, cdw10: 255, cdw11: 4 })).status).toBe(S.LBA_OUT_OF_RANGE);
    const back = h.alloc(PAGE);
    expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: back, cdw12: 7 })).status).toBe(S.SUCCESS);
    expect(h.read(back, PAGE)).toEqual(Buffer.alloc(PAGE, 0x5a));
    // The last block, and Write Zeroes with Deallocate.
    expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: page, cdw10: BLOCKS - 1 })).status).toBe(S.SUCCESS);
    expect((await h.submit(1, { opcode: Op.WRITE_ZEROES, nsid: 1, cdw12: 7 | (1 << 25) })).status).toBe(S.SUCCESS);
    expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: back, cdw12: 7 })).status).toBe(S.SUCCESS);
    expect(h.read(back, PAGE)).toEqual(Buffer.alloc(PAGE));
  });

  test('PRP shape: PRP1 dword aligned, later entries and chained lists page aligned, the list pointer qword aligned', async () => {
    const { host: h } = await bringUpNvme(cleanups, 'trap');
    const pages = h.scatteredPages(4);
    const read = (prp1: bigint, prp2: bigint, count: number) => h.submit(1, { opcode: Op.READ, nsid: 1, prp1, prp2, cdw12: (count * PAGE) / 512 - 1 });
    expect((await read(pages[0] + 1n, 0n, 1)).status).toBe(S.PRP_OFFSET_INVALID);
    expect((await read(pages[0] + 4n, pages[1] + 512n, 1)).status).toBe(S.PRP_OFFSET_INVALID); // 4 KiB from an offset: PRP2 is a page
    expect((await read(pages[0] + 4n, pages[1], 1)).status).toBe(S.SUCCESS);
    const list = h.alloc(PAGE);
    h.write(list, Buffer.concat([u64(pages[1]), u64(pages[2] + 8n)]));
    expect((await read(pages[0], list, 3)).status).toBe(S.PRP_OFFSET_INVALID); // an entry with an offset
    expect((await read(pages[0], list + 4n, 3)).status).toBe(S.PRP_OFFSET_INVALID); // the list pointer
    h.write(list, Buffer.concat([u64(pages[1]), u64(pages[2]), u64(pages[3])]));
    expect((await read(pages[0], list, 4)).status).toBe(S.SUCCESS);
    // A one-byte-longer transfer than MDTS is Invalid Field whatever the PRPs.
    expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: pages[0], cdw12: 1024 })).status).toBe(S.INVALID_FIELD);
  });
});

describe('queues', () => {
  test('create and delete: QID, QSIZE against CAP.MQES, PC, vectors against MSI-X, CQ in use', async () => {
    const { host: h, served } = await bringUpNvme(cleanups, 'trap');
    const ring = h.alloc(PAGE * 64);
    const createCq = (qid: number, entries: number, cdw11: number, prp1 = ring) => h.admin({ opcode: 0x05, prp1, cdw10: (((entries - 1) & 0xffff) << 16) | qid, cdw11 });
    const createSq = (qid: number, entries: number, cdw11: number, prp1 = ring) => h.admin({ opcode: 0x01, prp1, cdw10: (((entries - 1) & 0xffff) << 16) | qid, cdw11 });
    for (const qid of [0, 1, 32, 0xffff]) expect((await createCq(qid, 8, 1)).status).toBe(S.INVALID_QUEUE_ID);
    for (const entries of [1, 1025, 0x10000]) expect((await createCq(2, entries, 1)).status).toBe(S.INVALID_QUEUE_SIZE);
    expect((await createCq(2, 1024, (31 << 16) | 3)).status).toBe(S.SUCCESS); // the largest queue, the last vector
    for (const vector of [32, 0xffff]) expect((await createCq(3, 8, (vector << 16) | 3)).status).toBe(S.INVALID_INTERRUPT_VECTOR);
    expect((await createCq(3, 8, 2)).status).toBe(S.INVALID_FIELD); // PC clear
    expect((await createCq(3, 8, 1, ring + 8n)).status).toBe(S.PRP_OFFSET_INVALID);
    for (const qid of [0, 1, 32]) expect((await createSq(qid, 8, (2 << 16) | 1)).status).toBe(S.INVALID_QUEUE_ID);
    for (const entries of [1, 1025]) expect((await createSq(2, entries, (2 << 16) | 1)).status).toBe(S.INVALID_QUEUE_SIZE);
    for (const cqid of [0, 3, 0xffff]) expect((await createSq(2, 8, (cqid << 16) | 1)).status).toBe(S.COMPLETION_QUEUE_INVALID);
    expect((await createSq(2, 8, (2 << 16) | 0)).status).toBe(S.INVALID_FIELD);
    expect((await createSq(2, 8, (2 << 16) | 1, ring + 64n)).status).toBe(S.PRP_OFFSET_INVALID);
    expect((await createSq(2, 8, (2 << 16) | 1)).status).toBe(S.SUCCESS);
    expect(served.device.sqs[2]!.size).toBe(8);
    for (const qid of [0, 3, 32, 0xffff]) {
      expect((await h.admin({ opcode: 0x00, cdw10: qid })).status).toBe(S.INVALID_QUEUE_ID);
      expect((await h.admin({ opcode: 0x04, cdw10: qid })).status).toBe(S.INVALID_QUEUE_ID);
    }
    expect((await h.admin({ opcode: 0x04, cdw10: 2 })).status).toBe(S.INVALID_QUEUE_DELETION); // SQ 2 is on it
    expect((await h.admin({ opcode: 0x00, cdw10: 2 })).status).toBe(S.SUCCESS);
    expect((await h.admin({ opcode: 0x04, cdw10: 2 })).status).toBe(S.SUCCESS);
    // Fewer queues allocated: IDs past them are invalid.
    expect((await h.admin({ opcode: 0x09, cdw10: 0x07, cdw11: 0 })).status).toBe(S.COMMAND_SEQUENCE_ERROR); // I/O queues exist
    await roundTrip(h, 0x44);
  });

  test('a queue runs at most a batch of commands per turn of the event loop, and every command is answered', async () => {
    const { host: h, served } = await bringUpNvme(cleanups, 'trap', { ioEntries: 1024 });
    const flushes = Array.from({ length: 1023 }, () => h.enqueue(1, { opcode: Op.FLUSH, nsid: 1 }));
    h.kick(1);
    // The register read travels behind the doorbell write: the server answers it between batches, not after all 1023.
    await h.reg32(Register.CSTS);
    expect(served.device.sqs[1]!.head).toBeLessThan(1023);
    expect((await Promise.all(flushes)).every((c) => c.status === S.SUCCESS)).toBe(true);
  });
});

describe('features', () => {
  test('the mandatory features: get and set, defaults, capabilities, bad values and NSIDs', async () => {
    const { host: h } = await bringUpNvme(cleanups, 'trap');
    const get = (fid: number, { select = 0, cdw11 = 0, nsid = 0 } = {}) => h.admin({ opcode: 0x0a, nsid, cdw10: fid | (select << 8), cdw11 });
    const set = (fid: number, cdw11: number, nsid = 0) => h.admin({ opcode: 0x09, nsid, cdw10: fid, cdw11 });
    // Arbitration, Power Management, Write Atomicity, Async Event Config, Interrupt Coalescing: reserved bits are Invalid Field.
    for (const [fid, good, bad] of [[0x01, 0x01020307, 0x08], [0x02, 0xe0, 0x01], [0x0a, 1, 2], [0x0b, 0xff, 0x100], [0x08, 0xffff, 0x10000], [0x06, 1, 2]]) {
      expect((await set(fid, bad)).status).toBe(S.INVALID_FIELD);
      expect((await set(fid, good)).status).toBe(S.SUCCESS);
      expect((await get(fid)).dw0).toBe(good);
      expect((await get(fid, { select: 3 })).dw0).toBe(0x4); // changeable, not saveable
    }
    expect((await get(0x06, { select: 1 })).dw0).toBe(1); // default: write cache on
    expect((await get(0x06, { select: 2 })).dw0).toBe(1); // saved is the default
    for (const select of [4, 7]) expect((await get(0x01, { select })).status).toBe(S.INVALID_FIELD);
    // Temperature Threshold: the composite sensor (or all), over and under; other sensors and THSEL are Invalid Field.
    expect((await set(0x04, 350)).status).toBe(S.SUCCESS);
    expect((await set(0x04, (1 << 20) | 260)).status).toBe(S.SUCCESS);
    expect((await set(0x04, (0xf << 16) | 355)).status).toBe(S.SUCCESS);
    expect([(await get(0x04)).dw0, (await get(0x04, { cdw11: 1 << 20 })).dw0, (await get(0x04, { select: 1 })).dw0]).toEqual([355, 260, 343]);
    for (const bad of [1 << 16, 8 << 16, 2 << 20, 3 << 20, 1 << 22]) expect((await set(0x04, bad | 300)).status).toBe(S.INVALID_FIELD);
    // Error Recovery: per namespace; DULBE is not offered.
    expect((await get(0x05, { nsid: 1 })).dw0).toBe(0);
    expect((await set(0x05, 100, 1)).status).toBe(S.SUCCESS);
    expect((await set(0x05, 200, 0xffffffff)).status).toBe(S.SUCCESS);
    expect((await get(0x05, { nsid: 1 })).dw0).toBe(200);
    expect((await get(0x05, { nsid: 1, select: 3 })).dw0).toBe(0x6);
    expect((await set(0x05, 1 << 16, 1)).status).toBe(S.INVALID_FIELD);
    for (const nsid of [0, 2, 0xffffffff]) expect((await get(0x05, { nsid })).status).toBe(S.INVALID_NAMESPACE);
    // Interrupt Vector Configuration: a vector MSI-X has; the admin vector is never coalesced.
    expect((await get(0x09, { cdw11: 0 })).dw0).toBe(0x10000);
    expect((await get(0x09, { cdw11: 5 })).dw0).toBe(5);
    expect((await set(0x09, 0x10005)).status).toBe(S.SUCCESS);
    expect((await get(0x09, { cdw11: 5 })).dw0).toBe(0x10005);
    expect((await get(0x09, { cdw11: 5, select: 1 })).dw0).toBe(5);
    for (const bad of [32, 0xffff, 0x20005]) expect((await set(0x09, bad)).status).toBe(S.INVALID_FIELD);
    expect((await get(0x09, { cdw11: 32 })).status).toBe(S.INVALID_FIELD);
    // Controller features take NSID 0 or broadcast; namespace 1 is not theirs; others are invalid.
    expect((await get(0x07, { nsid: 0xffffffff })).status).toBe(S.SUCCESS);
    expect((await get(0x07, { nsid: 1 })).status).toBe(S.FEATURE_NOT_NAMESPACE_SPECIFIC);
    expect((await set(0x08, 0, 2)).status).toBe(S.INVALID_NAMESPACE);
    // Unknown features (Keep Alive Timer included) and saving.
    for (const fid of [0x00, 0x03, 0x0c, 0x0f, 0x80, 0xff]) {
      expect((await get(fid)).status).toBe(S.INVALID_FIELD);
      expect((await set(fid, 0)).status).toBe(S.INVALID_FIELD);
    }
    expect((await h.admin({ opcode: 0x09, cdw10: 0x80000008, cdw11: 0 })).status).toBe(S.FEATURE_NOT_SAVEABLE);
  });
});

describe('events and errors', () => {
  test('Abort ends an outstanding Asynchronous Event Request; other CIDs are not aborted; a missing SQ is Invalid Field', async () => {
    const { host: h, served } = await bringUpNvme(cleanups, 'trap');
    const events = [h.admin({ opcode: 0x0c }), h.admin({ opcode: 0x0c })];
    await h.reg32(Register.CSTS);
    const [first, second] = served.device.events.requests;
    const abort = await h.admin({ opcode: 0x08, cdw10: (first << 16) | 0 });
    expect([abort.status, abort.dw0 & 1]).toEqual([S.SUCCESS, 0]);
    const aborted = await events[0];
    expect([aborted.status, aborted.cid]).toEqual([S.ABORTED_BY_REQUEST, first]);
    expect(served.device.events.requests).toEqual([second]);
    const notOutstanding = await h.admin({ opcode: 0x08, cdw10: (first << 16) | 1 });
    expect([notOutstanding.status, notOutstanding.dw0 & 1]).toEqual([S.SUCCESS, 1]);
    expect((await h.admin({ opcode: 0x08, cdw10: (second << 16) | 7 })).status).toBe(S.INVALID_FIELD);
    // The other request still completes with an event: an SQ tail past the ring.
    h.ring(2, 99);
    expect([(await events[1]).status, ((await events[1]).dw0 >> 8) & 0xff]).toEqual([S.SUCCESS, 1]);
  });

  test('an unexpected exception while running a command is Internal Error for that command only', async () => {
    class FailingStore extends MemoryStore {
      override read(dma: DmaSpace, sg: SgList, position: number, done: BlockCallback): void {
        if (position === 0) throw new Error('planted failure');
        super.read(dma, sg, position, done);
      }
    }
    const { host: h, deviceErrors } = await attachNvme(cleanups, new NvmeController({ store: new FailingStore(1 << 20) }));
    expect((await h.enable()) & Csts.RDY).toBe(Csts.RDY);
    expect((await h.createIoQueuePair(1, 8)).map((c) => c.status)).toEqual([S.SUCCESS, S.SUCCESS]);
    const page = h.alloc(PAGE);
    const failed = await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: page });
    expect([failed.status, failed.dnr]).toEqual([S.INTERNAL_ERROR, true]);
    expect((await h.submit(1, { opcode: Op.READ, nsid: 1, prp1: page, cdw10: 1 })).status).toBe(S.SUCCESS);
    // The Error Information log records it.
    const log = h.alloc(PAGE);
    expect((await h.admin({ opcode: 0x02, prp1: log, cdw10: 0x01 | (15 << 16) })).status).toBe(S.SUCCESS);
    expect([h.read(log, 64).readUInt16LE(10), h.read(log, 64).readUInt16LE(12) >> 1]).toEqual([failed.cid, S.INTERNAL_ERROR]);
    expect(deviceErrors).toEqual([]);
  });
});

describe('migration state is input', () => {
  /**
   * Rewrites the one unit of a stop-copy stream (records of a 16-byte header
   * and bytes; the last record's header carries the end flag) with `change`
   * applied to its USER section (the PciDevice unit: a 12-byte header, then
   * sections of a 4-byte tag, a u64 length and the bytes).
   */
  function withUser(stream: Buffer, change: (user: Buffer) => Buffer): Buffer {
    const records: Buffer[] = [];
    let last = 0;
    for (let at = 0; at < stream.length; at += 16 + stream.readUInt32LE(at + 12)) {
      records.push(stream.subarray(at + 16, at + 16 + stream.readUInt32LE(at + 12)));
      last = at;
    }
    const unit = Buffer.concat(records);
    let at = 12;
    while (unit.toString('latin1', at, at + 4) !== 'USER') at += 12 + Number(unit.readBigUInt64LE(at + 4));
    const length = Number(unit.readBigUInt64LE(at + 4));
    const user = change(unit.subarray(at + 12, at + 12 + length));
    const head = Buffer.from(unit.subarray(0, at + 12));
    head.writeBigUInt64LE(BigInt(user.length), at + 4);
    const changed = Buffer.concat([head, user, unit.subarray(at + 12 + length)]);
    const header = Buffer.from(stream.subarray(last, last + 16));
    header.writeUInt32LE(changed.length, 12);
    return Buffer.concat([header, changed]);
  }

  const limits = { ccWritable: 0x00fffff1, cstsBits: 0x1f, ready: Csts.RDY, shadowDoorbells: true, errorsKept: 64 };

  test('bad queues, registers, features and events are refused (EINVAL) with the device unchanged and not failed; the good state then loads', async () => {
    const { host: h } = await bringUpNvme(cleanups, 'trap');
    const client = h.client;
    await client.migration.setState(MigrationState.STOP);
    await client.migration.setState(MigrationState.STOP_COPY);
    const stream = await client.migration.readAll();
    await client.migration.setState(MigrationState.STOP);
    let good: any;
    withUser(stream, (user) => {
      good = JSON.parse(user.toString());
      return user;
    });

    const destination = await attachNvme(cleanups, createDevice(['--size', '4M', '--doorbells', 'trap'])); // the source's mode: a device of another layout refuses its state
    const target = destination.host.client;
    const tamper: Array<[string, (s: any) => void]> = [
      ['an SQ larger than CAP.MQES', (s) => { s.sqs[1].size = 1025; }],
      ['a CQ head past its ring', (s) => { s.cqs[1].head = s.cqs[1].size; }],
      ['an SQ on a missing CQ', (s) => { s.sqs[1].cq = 7; }],
      ['a queue ID past those allocated', (s) => { s.cqs[1].id = 2; s.sqs[1].id = 2; s.sqs[1].cq = 2; s.features.ioQueues = 1; }],
      ['a vector past MSI-X', (s) => { s.cqs[1].vector = 32; }],
      ['a ring off a page', (s) => { s.cqs[1].base = String(BigInt(s.cqs[1].base) + 8n); }],
      ['an address past 64 bits', (s) => { s.registers.asq = String(1n << 64n); }],
      ['a reserved CC bit', (s) => { s.registers.cc |= 0x2; }],
      ['queues without CSTS.RDY', (s) => { s.registers.csts = 0; }],
      ['two CQs with one ID', (s) => { s.cqs.push(s.cqs[1]); }],
      ['a feature value with reserved bits', (s) => { s.features.values[0][1] = 0xf8; }],
      ['five outstanding event requests', (s) => { s.events.requests = [1, 2, 3, 4, 5]; }],
      ['a fractional counter', (s) => { s.smart.readCommands = 0.5; }],
      ['another version', (s) => { s.version = 2; }],
    ];
    // A refused unit leaves the destination in RESUMING, its data dropped: the next is written straight after.
    await target.migration.setState(MigrationState.RESUMING);
    for (const [why, change] of tamper) {
      const state = structuredClone(good);
      change(state);
      const bad = Buffer.from(JSON.stringify(state));
      expect(() => parseState(bad, limits), why).toThrow(NvmeStateError);
      await target.migration.write(withUser(stream, () => bad));
      // A refusal (a ProtocolError), not a failure of the device: EINVAL, no deviceError, nothing changed.
      await expect(target.migration.setState(MigrationState.RUNNING), why).rejects.toThrow(/EINVAL/);
      expect(destination.served.device.sqs.filter(Boolean), why).toHaveLength(0);
      expect(await target.migration.state(), why).toBe(MigrationState.RESUMING);
    }
    expect(() => parseState(Buffer.from('{"version": 3'), limits)).toThrow(NvmeStateError);
    await target.migration.write(withUser(stream, (user) => user));
    await target.migration.setState(MigrationState.RUNNING);
    expect(destination.deviceErrors).toEqual([]);
    expect(destination.served.device.sqs[1]!.size).toBe(16);
    expect(await destination.host.reg32(Register.CSTS)).toBe(Csts.RDY);
  });
});

/** xorshift32: the same commands for the same seed. */
function random(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x % n;
  };
}

describe.each(SETUPS)('a hostile host, with %s doorbells', (setup) => {
  const SEED = 0x5eed + setup.length;
  test(`random commands with bad fields and PRPs all complete with a spec status (seed ${SEED})`, async () => {
    const { host: h, deviceErrors } = await bringUpNvme(cleanups, setup, { ioEntries: 64 });
    const next = random(SEED);
    const pages = Array.from({ length: 8 }, () => h.alloc(PAGE));
    const lists = Array.from({ length: 4 }, () => h.alloc(PAGE));
    const outside = [0n, 0x1000n, MEMORY_BASE - BigInt(PAGE), MEMORY_BASE + BigInt(h.memory.size), (1n << 64n) - BigInt(PAGE)];
    const pick = <T>(from: readonly T[]): T => from[next(from.length)];
    const word = () => [0, 1, 0xffff, 0xffffffff, next(0x10000), next(0x100000000)][next(6)];
    const address = (): bigint => {
      switch (next(4)) {
        case 0: return pick(pages) + BigInt(pick([0, 4, 512, PAGE - 4]));
        case 1: return pick(lists) + BigInt(8 * next(PAGE / 8));
        case 2: return pick(outside);
        default: return pick(pages) + BigInt(next(PAGE));
      }
    };
    // Lists of good pages, pages with offsets, addresses outside memory, and pointers back into the lists.
    for (const list of lists) {
      for (let i = 0; i < PAGE / 8; i++) h.write(list + BigInt(8 * i), u64(next(3) === 0 ? address() : pick(pages)));
    }
    const allowed: Set<number> = new Set(Object.values(S));
    // Admin opcodes that would end the test's own queue or leave a command outstanding are sent with safe fields only.
    const adminOpcodes = [0x01, 0x02, 0x05, 0x06, 0x08, 0x09, 0x0a, 0x18, 0x7f, 0x80, next(0x100)];
    let answered = 0;
    for (let burst = 0; burst < 40; burst++) {
      const admin = Array.from({ length: 2 }, () => {
        const opcode = pick(adminOpcodes);
        if (opcode === 0x0c || opcode === 0x7c || opcode === 0x00 || opcode === 0x04) return h.admin({ opcode: 0x06, prp1: pick(pages), cdw10: 1 });
        const cdw10 = opcode === 0x09 && next(2) === 0 ? 0x07 : word(); // Number of Queues, often
        return h.admin({ opcode, nsid: pick([0, 1, 0xffffffff, word()]), prp1: address(), prp2: address(), cdw10, cdw11: word(), cdw12: word(), cdw13: word(), flags: next(4) === 0 ? next(0x100) : 0 });
      });
      const io = Array.from({ length: 8 }, () => h.enqueue(1, {
        opcode: pick([0x00, 0x01, 0x02, 0x08, 0x09, next(0x100)]), nsid: pick([1, 1, 1, 0, 2, 0xffffffff]),
        prp1: address(), prp2: address(), cdw10: pick([0, next(BLOCKS), word()]), cdw11: next(4) === 0 ? word() : 0, cdw12: pick([0, 7, 255, 1023, 1024, word()]),
        flags: next(8) === 0 ? next(0x100) : 0,
      }));
      h.kick(1);
      for (const c of await Promise.all([...admin, ...io])) {
        expect(allowed.has(c.status), `status 0x${c.status.toString(16)} (seed ${SEED})`).toBe(true);
        answered++;
      }
    }
    expect(answered).toBe(40 * 10);
    await roundTrip(h, 0x77);
    expect(deviceErrors).toEqual([]);
  });
});
