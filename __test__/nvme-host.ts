/**
 * A small NVMe host driver over the package's client, for the NVMe tests and
 * the bench: guest memory shared by memfd, MSI-X wired to eventfds, doorbells
 * rung through the mapped page when the device offers one, else through the
 * ioeventfds it offers (as KVM would signal them), else by posted
 * REGION_WRITEs; completions reaped by phase tag as a polling driver does.
 * After shadowDoorbells() it rings I/O queues as Linux does with Doorbell
 * Buffer Config: the value goes to the shadow page, and the register is
 * written only when the value passes the controller's EventIdx.
 * Entries are written and completions read through one view of guest
 * memory, so the bench's figures carry little of the host's own cost.
 * Free of vitest, so that bench/nvme.ts drives the controller with it too.
 */
import { CapabilityId, EventfdIrq, GuestMemory, IrqIndex, Region, type VfioUserClient } from '../ts/index.js';
import { native, type NativeMapping } from '../ts/native.js';
import { RegionCapId } from '../ts/protocol/index.js';
import { Register } from '../examples/nvme/controller.js';

export const PAGE = 4096;
/** Where guest memory sits in IOVA space. */
export const MEMORY_BASE = 0x100000n;
const DOORBELLS = 0x1000;

export interface Completion {
  dw0: number;
  sqHead: number;
  sqid: number;
  cid: number;
  /** Status Code Type << 8 | Status Code. */
  status: number;
  dnr: boolean;
}

export interface Sqe {
  opcode: number;
  nsid?: number;
  prp1?: bigint;
  prp2?: bigint;
  cdw10?: number;
  cdw11?: number;
  cdw12?: number;
  cdw13?: number;
  cdw14?: number;
  cdw15?: number;
  /** Raw byte 1 (FUSE, PSDT). */
  flags?: number;
}

interface HostQueue {
  id: number;
  sqBase: bigint;
  sqSize: number;
  sqTail: number;
  cqBase: bigint;
  cqSize: number;
  cqHead: number;
  phase: number;
  nextCid: number;
  waiting: Map<number, (c: Completion) => void>;
}

/** Linux's nvme_dbbuf_need_event: whether moving a doorbell from `old` to `value` passed `eventIdx` (16-bit arithmetic). */
function needsEvent(eventIdx: number, value: number, old: number): boolean {
  return ((value - eventIdx - 1) & 0xffff) < ((value - old) & 0xffff);
}

export class NvmeHost {
  readonly queues = new Map<number, HostQueue>();
  /** Completions with no waiter (a CID reused by a hand-built test, or an event). */
  readonly stray: Completion[] = [];
  private next = 0;
  private mapping: NativeMapping | undefined;
  private pumping = false;
  private closed = false;
  /** While set, completions stay in their CQs unconsumed (a slow host). */
  hold = false;
  /** How many doorbells the device's ioeventfds take (the client signals them instead of sending writes). */
  ioeventfds = 0;
  /** Doorbell writes that reached the register, and those the EventIdx let the host skip. */
  readonly rings = { written: 0, skipped: 0 };
  /** The shadow doorbell and EventIdx pages, as doorbell-indexed words. */
  private shadow: { values: Uint32Array; eventIdx: Uint32Array } | undefined;
  vectors: EventfdIrq[] = [];
  /** All of guest memory, zero-copy. */
  private readonly bytes: Buffer;

  private constructor(public client: VfioUserClient, readonly memory: GuestMemory) {
    const view = memory.view();
    this.bytes = Buffer.from(view.buffer, view.byteOffset, view.length);
  }

  /** Maps `memory` (a fresh one of `bytes` if none) into the device and wires doorbells and MSI-X. */
  static async attach(client: VfioUserClient, memory = new GuestMemory(32 << 20)): Promise<NvmeHost> {
    const host = new NvmeHost(client, memory);
    await host.wire(client);
    return host;
  }

  /** Carries on with another client (a migrated device): same memory and queues. */
  async moveTo(client: VfioUserClient): Promise<void> {
    this.unwire();
    this.client = client;
    await this.wire(client);
  }

  private async wire(client: VfioUserClient): Promise<void> {
    await client.dmaMap({ iova: MEMORY_BASE, memory: this.memory });
    const info = await client.getRegionInfo(Region.BAR0);
    const sparse = info.caps.find((c) => c.id === RegionCapId.SPARSE_MMAP);
    if (info.fd !== undefined) {
      if (sparse && sparse.id === RegionCapId.SPARSE_MMAP) {
        this.mapping = new native.NativeMapping(info.fd, info.offset + sparse.areas[0].offset, sparse.areas[0].size, true, true);
      }
      native.closeFd(info.fd);
    }
    this.ioeventfds = (await client.wireIoEventfds(Region.BAR0)).length;
    // Memory decoding and bus mastering on, then MSI-X, as a guest's PCI core does.
    const config = await client.regionRead(Region.CONFIG, 0n, 256);
    let msix = config[0x34];
    while (msix !== 0 && config[msix] !== CapabilityId.MSIX) msix = config[msix + 1];
    await client.regionWrite(Region.CONFIG, 0x04n, Buffer.from([0x06, 0]));
    await client.regionWrite(Region.CONFIG, BigInt(msix + 2), Buffer.from([0, 0x80]));
    if (this.vectors.length === 0) this.vectors = Array.from({ length: (config.readUInt16LE(msix + 2) & 0x7ff) + 1 }, () => new EventfdIrq());
    await client.setIrqs({ index: IrqIndex.MSIX, eventfds: this.vectors });
  }

  private unwire(): void {
    this.mapping?.unmap();
    this.mapping = undefined;
  }

  close(): void {
    this.closed = true;
    this.unwire();
    this.vectors.forEach((irq) => irq.close());
    this.vectors = [];
    this.memory.close();
  }

  // ---- memory ----

  /** `bytes` of guest memory, page aligned; never freed (tests are short). */
  alloc(bytes: number): bigint {
    const at = this.next;
    this.next += Math.ceil(bytes / PAGE) * PAGE;
    if (this.next > this.memory.size) throw new Error('the test host is out of guest memory');
    return MEMORY_BASE + BigInt(at);
  }

  /** A copy of guest memory. */
  read(iova: bigint, length: number): Buffer {
    const at = Number(iova - MEMORY_BASE);
    return Buffer.from(this.bytes.subarray(at, at + length));
  }

  write(iova: bigint, data: Uint8Array): void {
    this.bytes.set(data, Number(iova - MEMORY_BASE));
  }

  // ---- registers ----

  async reg32(offset: number): Promise<number> {
    return (await this.client.regionRead(Region.BAR0, BigInt(offset), 4)).readUInt32LE(0);
  }

  async setReg32(offset: number, value: number): Promise<void> {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(value >>> 0);
    await this.client.regionWrite(Region.BAR0, BigInt(offset), b);
  }

  async setReg64(offset: number, value: bigint): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(value);
    await this.client.regionWrite(Region.BAR0, BigInt(offset), b);
  }

  /**
   * Rings doorbell `index` as a guest would: a store to the mapped page, or a
   * posted write. With shadow doorbells an I/O queue's value is stored in the
   * shadow page first, and the register written only if the controller's
   * EventIdx asks for it.
   */
  ring(index: number, value: number): void {
    const shadow = this.shadow;
    if (shadow && index >= 2) {
      const old = shadow.values[index];
      Atomics.store(shadow.values, index, value);
      if (!needsEvent(Atomics.load(shadow.eventIdx, index), value, old)) {
        this.rings.skipped++;
        return;
      }
    }
    this.rings.written++;
    if (this.mapping) {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(value);
      this.mapping.write(4 * index, b);
    } else {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(value);
      void this.client.regionWrite(Region.BAR0, BigInt(DOORBELLS + 4 * index), b, { posted: true });
    }
  }

  get mappedDoorbells(): boolean {
    return this.mapping !== undefined;
  }

  // ---- bring-up ----

  /** Admin queues, CC.EN, then waits for CSTS.RDY (or CFS). */
  async enable(entries = 32): Promise<number> {
    const q = this.newQueue(0, entries, entries);
    await this.setReg32(Register.AQA, ((entries - 1) << 16) | (entries - 1));
    await this.setReg64(Register.ASQ, q.sqBase);
    await this.setReg64(Register.ACQ, q.cqBase);
    await this.setReg32(Register.CC, (4 << 20) | (6 << 16) | 1);
    return this.reg32(Register.CSTS);
  }

  async disable(): Promise<number> {
    await this.setReg32(Register.CC, 0);
    this.queues.clear();
    // A reset forgets Doorbell Buffer Config; Linux sends it again with zeroed pages.
    this.shadow = undefined;
    return this.reg32(Register.CSTS);
  }

  newQueue(id: number, sqSize: number, cqSize: number): HostQueue {
    const q: HostQueue = {
      id, sqBase: this.alloc(64 * sqSize), sqSize, sqTail: 0, cqBase: this.alloc(16 * cqSize), cqSize, cqHead: 0, phase: 1, nextCid: 0, waiting: new Map(),
    };
    this.queues.set(id, q);
    return q;
  }

  /**
   * Doorbell Buffer Config with two fresh zeroed pages (or the addresses
   * given, for tests of bad ones); on success the host rings I/O queues
   * through them from now on.
   */
  async shadowDoorbells(shadowIova = this.alloc(PAGE), eventIdxIova = this.alloc(PAGE)): Promise<Completion> {
    const c = await this.admin({ opcode: 0x7c, prp1: shadowIova, prp2: eventIdxIova });
    if (c.status === 0) {
      const words = (iova: bigint) => {
        const bytes = this.memory.view(Number(iova - MEMORY_BASE), PAGE);
        return new Uint32Array(bytes.buffer, bytes.byteOffset, PAGE / 4);
      };
      this.shadow = { values: words(shadowIova), eventIdx: words(eventIdxIova) };
    }
    return c;
  }

  /** Create I/O CQ and SQ `id` (vector `id`); returns the two statuses. */
  async createIoQueuePair(id: number, entries: number): Promise<[Completion, Completion]> {
    const q = this.newQueue(id, entries, entries);
    const cq = await this.admin({ opcode: 0x05, prp1: q.cqBase, cdw10: ((entries - 1) << 16) | id, cdw11: (id << 16) | 3 });
    const sq = await this.admin({ opcode: 0x01, prp1: q.sqBase, cdw10: ((entries - 1) << 16) | id, cdw11: (id << 16) | 1 });
    return [cq, sq];
  }

  admin(sqe: Sqe): Promise<Completion> {
    return this.submit(0, sqe);
  }

  // ---- submission and completion ----

  /** Queues `sqe` without ringing; returns its completion. */
  enqueue(qid: number, sqe: Sqe): Promise<Completion> {
    const q = this.queues.get(qid)!;
    const cid = q.nextCid;
    q.nextCid = (q.nextCid + 1) & 0xffff;
    // Straight into the ring.
    const e = this.bytes;
    const at = Number(q.sqBase - MEMORY_BASE) + 64 * q.sqTail;
    e.fill(0, at, at + 64);
    e[at] = sqe.opcode;
    e[at + 1] = sqe.flags ?? 0;
    e.writeUInt16LE(cid, at + 2);
    e.writeUInt32LE(sqe.nsid ?? 0, at + 4);
    if (sqe.prp1) e.writeBigUInt64LE(sqe.prp1, at + 24);
    if (sqe.prp2) e.writeBigUInt64LE(sqe.prp2, at + 32);
    e.writeUInt32LE((sqe.cdw10 ?? 0) >>> 0, at + 40);
    e.writeUInt32LE((sqe.cdw11 ?? 0) >>> 0, at + 44);
    e.writeUInt32LE((sqe.cdw12 ?? 0) >>> 0, at + 48);
    e.writeUInt32LE((sqe.cdw13 ?? 0) >>> 0, at + 52);
    e.writeUInt32LE((sqe.cdw14 ?? 0) >>> 0, at + 56);
    e.writeUInt32LE((sqe.cdw15 ?? 0) >>> 0, at + 60);
    q.sqTail = (q.sqTail + 1) % q.sqSize;
    return new Promise((resolve) => {
      q.waiting.set(cid, resolve);
      this.pump();
    });
  }

  /** Writes the SQ tail doorbell. */
  kick(qid: number): void {
    this.ring(2 * qid, this.queues.get(qid)!.sqTail);
  }

  submit(qid: number, sqe: Sqe): Promise<Completion> {
    const done = this.enqueue(qid, sqe);
    this.kick(qid);
    return done;
  }

  /** Takes every new entry of every CQ, acknowledging them through the head doorbell. */
  reap(): number {
    let found = 0;
    for (const q of this.queues.values()) {
      let moved = false;
      const ring = Number(q.cqBase - MEMORY_BASE);
      for (;;) {
        const e = this.bytes;
        const at = ring + 16 * q.cqHead;
        const status = e.readUInt16LE(at + 14);
        if ((status & 1) !== q.phase) break;
        const c: Completion = {
          dw0: e.readUInt32LE(at), sqHead: e.readUInt16LE(at + 8), sqid: e.readUInt16LE(at + 10), cid: e.readUInt16LE(at + 12),
          status: (status >> 1) & 0x7ff, dnr: (status & 0x8000) !== 0,
        };
        q.cqHead = (q.cqHead + 1) % q.cqSize;
        if (q.cqHead === 0) q.phase ^= 1;
        moved = true;
        found++;
        const resolve = q.waiting.get(c.cid);
        q.waiting.delete(c.cid);
        if (resolve) resolve(c);
        else this.stray.push(c);
      }
      if (moved) this.ring(2 * q.id + 1, q.cqHead);
    }
    return found;
  }

  get outstanding(): number {
    let n = 0;
    for (const q of this.queues.values()) n += q.waiting.size;
    return n;
  }

  /** Reaps on every turn of the event loop while commands are outstanding; fails them all after `timeoutMs` without progress. */
  private pump(timeoutMs = 5000): void {
    if (this.pumping) return;
    this.pumping = true;
    let last = Date.now();
    const turn = () => {
      if (this.closed) return;
      if (this.hold) last = Date.now();
      else if (this.reap() > 0) last = Date.now();
      if (this.outstanding === 0) {
        this.pumping = false;
        return;
      }
      if (Date.now() - last > timeoutMs) {
        this.pumping = false;
        for (const q of this.queues.values()) {
          for (const [cid, resolve] of q.waiting) resolve({ dw0: 0, sqHead: 0, sqid: q.id, cid, status: -1, dnr: true });
          q.waiting.clear();
        }
        return;
      }
      setImmediate(turn);
    };
    setImmediate(turn);
  }

  // ---- data pointers ----

  /**
   * PRP1/PRP2 for a transfer into `pages` (each a page), starting `offset`
   * bytes into the first; past two pages PRP2 is a list, placed at
   * `listOffset` into its page so that chaining can be exercised.
   */
  prps(pages: bigint[], offset = 0, listOffset = 0): { prp1: bigint; prp2: bigint } {
    const prp1 = pages[0] + BigInt(offset);
    if (pages.length === 1) return { prp1, prp2: 0n };
    if (pages.length === 2) return { prp1, prp2: pages[1] };
    const rest = pages.slice(1);
    const head = this.alloc(PAGE) + BigInt(listOffset);
    let list = head;
    let slots = (PAGE - listOffset) / 8;
    for (let i = 0; i < rest.length;) {
      const left = rest.length - i;
      if (left <= slots) {
        rest.slice(i).forEach((p, k) => this.writeU64(list + BigInt(8 * k), p));
        break;
      }
      rest.slice(i, i + slots - 1).forEach((p, k) => this.writeU64(list + BigInt(8 * k), p));
      i += slots - 1;
      const next = this.alloc(PAGE);
      this.writeU64(list + BigInt(8 * (slots - 1)), next);
      list = next;
      slots = PAGE / 8;
    }
    return { prp1, prp2: head };
  }

  /** `count` separate pages, allocated out of order so no two are adjacent in the order given. */
  scatteredPages(count: number): bigint[] {
    const base = this.alloc(PAGE * 2 * count);
    return Array.from({ length: count }, (_, i) => base + BigInt(PAGE * 2 * (count - 1 - i)));
  }

  private writeU64(iova: bigint, value: bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(value);
    this.write(iova, b);
  }

  /** Gathers a transfer's bytes from its pages. */
  gather(pages: bigint[], offset: number, length: number): Buffer {
    const parts: Buffer[] = [];
    for (let i = 0, left = length; left > 0; i++) {
      const start = i === 0 ? offset : 0;
      const n = Math.min(left, PAGE - start);
      parts.push(this.read(pages[i] + BigInt(start), n));
      left -= n;
    }
    return Buffer.concat(parts);
  }

  /** Scatters `data` into a transfer's pages. */
  scatter(pages: bigint[], offset: number, data: Buffer): void {
    for (let i = 0, done = 0; done < data.length; i++) {
      const start = i === 0 ? offset : 0;
      const n = Math.min(data.length - done, PAGE - start);
      this.write(pages[i] + BigInt(start), data.subarray(done, done + n));
      done += n;
    }
  }
}
