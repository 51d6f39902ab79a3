/**
 * The NVMe mode: a hostile NVMe host (NVMe 1.4 over PCI). It enables the
 * controller, creates an I/O queue pair in guest memory, sets up shadow
 * doorbells when offered (Doorbell Buffer Config, which ioeventfd doorbells
 * need), and rings doorbells the way the device offers them: stores to the
 * mapped doorbell page, ioeventfds (wired as KVM would), or posted writes.
 * Then it issues random admin and I/O commands with bad fields, NSIDs, LBAs
 * and lengths, bad PRPs and PRP lists that loop, point at themselves or
 * outside guest memory, bogus doorbell values, and commands cut short by a
 * reset, a disable, an unmapped window or a disconnect.
 *
 * Any status is an answer; what the controller owes is a completion within
 * the deadline for every command but an Asynchronous Event Request, on the
 * right queue, and never Internal Error (an exception in the controller).
 */
import { native, type NativeMapping } from '../../native.js';
import { IrqIndex, Region, RegionCapId } from '../../protocol/index.js';
import { Cfg, Command as PciCommand } from '../../pci/spec.js';
import { FuzzFinding, GUEST_MEMORY, hex, big, type DeviceProfile, type FuzzContext, type FuzzMode, type FuzzOp, type OpValue } from '../mode.js';
import type { Random } from '../random.js';

export type NvmeOp = FuzzOp & { readonly mode: 'nvme' };

/** Class code of an NVM Express controller: mass storage, NVM, NVMe. */
const NVME_CLASS = 0x010802;
const PAGE = 0x1000;
const Reg = { CAP: 0x00, CC: 0x14, CSTS: 0x1c, AQA: 0x24, ASQ: 0x28, ACQ: 0x30, DOORBELLS: 0x1000 } as const;
const CC_ENABLE = 1 | (6 << 16) | (4 << 20); // EN, NVM command set, 4 KiB pages, 64-byte SQEs, 16-byte CQEs
const CSTS_RDY = 1;
const SQE = 64;
const CQE = 16;

/** Where the host keeps things in guest memory (offsets into GUEST_MEMORY). */
const Layout = { ADMIN_SQ: 0x0000, ADMIN_CQ: 0x1000, IO_SQ: 0x2000, IO_CQ: 0x3000, SHADOW: 0x4000, EVENT_IDX: 0x5000, IDENTIFY: 0x6000, DATA: 0x10000 } as const;
const DATA_PAGES = (GUEST_MEMORY.size - Layout.DATA) / PAGE;
const ADMIN_ENTRIES = 32;
const IO_ENTRIES = 64;
const IO_QUEUE = 1;
/** Create I/O CQ, cdw11: physically contiguous, interrupts enabled (vector in 31:16). */
const CQ_CONTIGUOUS_WITH_INTERRUPTS = 0b11;

const Admin = {
  DELETE_SQ: 0x00, CREATE_SQ: 0x01, GET_LOG_PAGE: 0x02, DELETE_CQ: 0x04, CREATE_CQ: 0x05, IDENTIFY: 0x06, ABORT: 0x08,
  SET_FEATURES: 0x09, GET_FEATURES: 0x0a, ASYNC_EVENT: 0x0c, NS_MANAGEMENT: 0x0d, FW_COMMIT: 0x10, FW_DOWNLOAD: 0x11,
  SELF_TEST: 0x14, NS_ATTACH: 0x15, KEEP_ALIVE: 0x18, DOORBELL_BUFFER_CONFIG: 0x7c, FORMAT: 0x80, SECURITY_SEND: 0x81,
  SECURITY_RECEIVE: 0x82, SANITIZE: 0x84,
} as const;
const Io = { FLUSH: 0x00, WRITE: 0x01, READ: 0x02, WRITE_UNCORRECTABLE: 0x04, COMPARE: 0x05, WRITE_ZEROES: 0x08, DATASET_MANAGEMENT: 0x09 } as const;
/** Admin commands after which the host's own queues or doorbells may be gone: it starts over. */
const DISRUPTIVE_ADMIN = new Set<number>([Admin.DELETE_SQ, Admin.CREATE_SQ, Admin.DELETE_CQ, Admin.CREATE_CQ, Admin.DOORBELL_BUFFER_CONFIG, Admin.FORMAT, Admin.SANITIZE, Admin.NS_MANAGEMENT, Admin.NS_ATTACH]);
/** Generic status Internal Error: the controller hit something it did not expect. */
const INTERNAL_ERROR = 0x006;

/**
 * How a command's data pointer is built at run time (the length is known
 * only then): a well-formed PRP pair or list, or one of the shapes a
 * hostile host sends.
 */
type PrpShape = 'valid' | 'unaligned' | 'zero' | 'outside' | 'list-self' | 'list-loop' | 'list-outside' | 'list-garbage' | 'random';
const PRP_SHAPES: readonly (readonly [PrpShape, number])[] = [
  ['valid', 10], ['unaligned', 1], ['zero', 1], ['outside', 1.5], ['list-self', 1], ['list-loop', 1], ['list-outside', 1], ['list-garbage', 1], ['random', 1],
];

interface Prp {
  readonly shape: PrpShape;
  /** Data page index (into the data area), an offset in it, and a seed for garbage. */
  readonly page: number;
  readonly offset: number;
  readonly noise: string;
}

function generatePrp(random: Random): Prp {
  return { shape: random.weighted(PRP_SHAPES), page: random.below(DATA_PAGES), offset: random.chance(0.2) ? random.below(PAGE / 4) * 4 : 0, noise: hex(random.u64()) };
}

/** A 32-bit command dword: mostly small, sometimes the edges. */
const dword = (random: Random, small: number) => (random.chance(0.7) ? random.below(small) : Number(random.edgeValue(4)));

function generateAdmin(random: Random): NvmeOp {
  const opcode = random.chance(0.92) ? random.pick(Object.values(Admin)) : random.below(256);
  const op: Record<string, OpValue> = { mode: 'nvme', kind: 'admin', opcode, nsid: random.pick([0, 1, 1, 2, 0xffffffff, random.u32()]), prp: generatePrp(random) as unknown as OpValue };
  switch (opcode) {
    case Admin.IDENTIFY:
      op.cdw10 = random.chance(0.8) ? random.pick([0, 1, 2, 3, 0x10, 0x11]) : dword(random, 256);
      break;
    case Admin.GET_LOG_PAGE: // LID, NUMDL (31:16); NUMDU and the offset in cdw11-13
      op.cdw10 = (random.pick([1, 2, 3, 4, 5, 0x70, 0x80, 0xc0, random.below(256)]) | (dword(random, 1024) << 16)) >>> 0;
      op.cdw11 = random.chance(0.7) ? random.below(4) : Number(random.edgeValue(4));
      op.cdw12 = random.chance(0.8) ? 0 : Number(random.edgeValue(4));
      op.cdw13 = random.chance(0.8) ? 0 : Number(random.edgeValue(4));
      break;
    case Admin.SET_FEATURES:
    case Admin.GET_FEATURES:
      op.cdw10 = (random.chance(0.85) ? random.between(1, 0x12) : random.below(256)) | (random.chance(0.2) ? random.below(8) << 8 : 0) | (random.chance(0.1) ? 1 << 31 : 0);
      op.cdw11 = dword(random, 0x10000);
      break;
    case Admin.CREATE_SQ:
    case Admin.CREATE_CQ:
    case Admin.DELETE_SQ:
    case Admin.DELETE_CQ: // QID and size; flags, CQID or vector
      op.cdw10 = (random.below(20) | (dword(random, 128) << 16)) >>> 0;
      op.cdw11 = (random.below(8) | (random.below(40) << 16)) >>> 0;
      break;
    case Admin.ABORT:
      op.cdw10 = (random.below(3) | (random.below(64) << 16)) >>> 0;
      break;
    default:
      op.cdw10 = dword(random, 256);
      op.cdw11 = dword(random, 256);
  }
  if (random.chance(0.05)) op.flags = random.below(256); // FUSE and PSDT (SGLs)
  return op as NvmeOp;
}

function generateIo(random: Random, kind: 'io' | 'batch-io' = 'io'): NvmeOp {
  const opcode = random.chance(0.95) ? random.weighted([[Io.READ, 4], [Io.WRITE, 4], [Io.FLUSH, 1], [Io.WRITE_ZEROES, 1], [Io.DATASET_MANAGEMENT, 1], [Io.COMPARE, 0.5], [Io.WRITE_UNCORRECTABLE, 0.5]] as const) : random.below(256);
  const op: Record<string, OpValue> = {
    mode: 'nvme',
    kind,
    opcode,
    nsid: random.chance(0.85) ? 1 : random.pick([0, 2, 0xffffffff, random.u32()]),
    // An LBA as a fraction of the namespace (scaled at run time), or any 64-bit value.
    lba: random.chance(0.85) ? random.below(1 << 20) / (1 << 20) : hex(random.edgeValue(8)),
    nlb: random.chance(0.85) ? random.below(32) : Number(random.edgeValue(2)),
    prp: generatePrp(random) as unknown as OpValue,
  };
  if (random.chance(0.1)) op.cdw13 = Number(random.edgeValue(4));
  if (random.chance(0.05)) op.flags = random.below(256);
  return op as NvmeOp;
}

function generateNvmeOp(random: Random): NvmeOp {
  switch (random.weighted([['io', 10], ['admin', 5], ['batch', 1.5], ['ring', 0.5], ['disrupt', 0.7]] as const)) {
    case 'io':
      return generateIo(random);
    case 'admin':
      return generateAdmin(random);
    case 'batch':
      return { mode: 'nvme', kind: 'batch', commands: Array.from({ length: random.between(2, 16) }, () => generateIo(random, 'batch-io')) };
    case 'ring':
      return { mode: 'nvme', kind: 'ring', doorbell: random.below(8), value: Number(random.edgeValue(4)) };
    case 'disrupt':
      return {
        mode: 'nvme',
        kind: 'disrupt',
        commands: Array.from({ length: random.between(1, 4) }, () => generateIo(random, 'batch-io')),
        by: random.pick(['reset', 'disable', 'unmap', 'disconnect', 'shutdown']),
      };
  }
}

interface Queue {
  id: number;
  sq: number;
  cq: number;
  entries: number;
  tail: number;
  head: number;
  phase: number;
  nextCid: number;
  /** Completions reaped before anyone waited for them, by CID. */
  reaped: Map<number, Completion>;
}

interface Sqe {
  opcode: number;
  flags?: number;
  nsid?: number;
  prp1?: bigint;
  prp2?: bigint;
  cdw10?: number;
  cdw11?: number;
  cdw12?: number;
  cdw13?: number;
}

interface Completion {
  cid: number;
  sqid: number;
  sqHead: number;
  status: number;
}

class NvmeHost implements FuzzMode<NvmeOp> {
  readonly name = 'nvme';
  readonly weight = 4;
  private ctx!: FuzzContext;
  private admin!: Queue;
  private io: Queue | undefined;
  private doorbellStride = 4;
  private doorbellPage: NativeMapping | undefined;
  private shadow = false;
  private blocks = 0n;
  private blockSize = 512;
  private needsRestart = true;

  refuses(device: DeviceProfile): string | undefined {
    const classCode = device.config.readUIntLE(Cfg.CLASS_PROG_IF, 3);
    if (classCode !== NVME_CLASS) return `class code 0x${classCode.toString(16).padStart(6, '0')} is not an NVMe controller's (0x010802)`;
    if ((device.regions[Region.BAR0]?.size ?? 0n) < BigInt(Reg.DOORBELLS + PAGE)) return 'BAR0 is too small for NVMe registers and doorbells';
    return undefined;
  }

  generate(random: Random): NvmeOp {
    return generateNvmeOp(random);
  }

  // ---- bringing the controller up ----

  async restart(ctx: FuzzContext): Promise<void> {
    this.ctx = ctx;
    this.unmapDoorbells();
    const client = ctx.client;
    const command = await client.pci.read(Cfg.COMMAND, 2);
    await client.pci.write(Cfg.COMMAND, 2, command | PciCommand.MEMORY | PciCommand.BUS_MASTER);
    await this.wireDoorbells();
    // Completions are reaped by phase tag, but interrupts go to eventfds as a guest's would.
    if (ctx.device.msix) {
      await client.pci.enableMsix();
      await client.setIrqs({ index: IrqIndex.MSIX, eventfds: ctx.eventfds.slice(0, Math.min(ctx.device.msix.vectors, ctx.eventfds.length)) });
    }
    const cap = (await client.regionRead(Region.BAR0, BigInt(Reg.CAP), 8)).readBigUInt64LE(0);
    this.doorbellStride = 4 << Number((cap >> 32n) & 0xfn);
    const maxEntries = Number(cap & 0xffffn) + 1;
    await this.setReg32(Reg.CC, 0);
    await ctx.waitFor('NVMe: CSTS.RDY clears after CC.EN = 0', async () => ((await this.reg32(Reg.CSTS)) & CSTS_RDY) === 0);
    ctx.memory.write(0, Buffer.alloc(Layout.DATA));
    this.admin = { id: 0, sq: Layout.ADMIN_SQ, cq: Layout.ADMIN_CQ, entries: ADMIN_ENTRIES, tail: 0, head: 0, phase: 1, nextCid: 0, reaped: new Map() };
    this.io = undefined;
    this.shadow = false;
    await this.setReg32(Reg.AQA, ((ADMIN_ENTRIES - 1) << 16) | (ADMIN_ENTRIES - 1));
    await this.setReg64(Reg.ASQ, this.iova(Layout.ADMIN_SQ));
    await this.setReg64(Reg.ACQ, this.iova(Layout.ADMIN_CQ));
    await this.setReg32(Reg.CC, CC_ENABLE);
    await ctx.waitFor('NVMe: CSTS.RDY sets after CC.EN = 1', async () => ((await this.reg32(Reg.CSTS)) & CSTS_RDY) !== 0);
    await this.expectSuccess(this.admin, { opcode: Admin.IDENTIFY, cdw10: 1, prp1: this.iova(Layout.IDENTIFY) }, 'Identify Controller');
    const oacs = ctx.memory.read(Layout.IDENTIFY + 256, 2).readUInt16LE(0);
    await this.expectSuccess(this.admin, { opcode: Admin.IDENTIFY, nsid: 1, cdw10: 0, prp1: this.iova(Layout.IDENTIFY) }, 'Identify Namespace 1');
    const ns = ctx.memory.read(Layout.IDENTIFY, 4096);
    this.blocks = ns.readBigUInt64LE(0);
    const format = ns.readUInt32LE(128 + 4 * (ns[26] & 0xf));
    this.blockSize = 2 ** ((format >> 16) & 0xff) || 512;
    const entries = Math.min(IO_ENTRIES, maxEntries);
    await this.expectSuccess(this.admin, { opcode: Admin.CREATE_CQ, prp1: this.iova(Layout.IO_CQ), cdw10: ((entries - 1) << 16) | IO_QUEUE, cdw11: CQ_CONTIGUOUS_WITH_INTERRUPTS | (IO_QUEUE << 16) }, 'Create I/O Completion Queue');
    await this.expectSuccess(this.admin, { opcode: Admin.CREATE_SQ, prp1: this.iova(Layout.IO_SQ), cdw10: ((entries - 1) << 16) | IO_QUEUE, cdw11: (IO_QUEUE << 16) | 1 }, 'Create I/O Submission Queue');
    this.io = { id: IO_QUEUE, sq: Layout.IO_SQ, cq: Layout.IO_CQ, entries, tail: 0, head: 0, phase: 1, nextCid: 0, reaped: new Map() };
    if (oacs & (1 << 8)) {
      await this.expectSuccess(this.admin, { opcode: Admin.DOORBELL_BUFFER_CONFIG, prp1: this.iova(Layout.SHADOW), prp2: this.iova(Layout.EVENT_IDX) }, 'Doorbell Buffer Config');
      this.shadow = true;
    }
    this.needsRestart = false;
  }

  /** The doorbell page mapped when the device lets it be, and its ioeventfds wired, as a VMM with KVM does. */
  private async wireDoorbells(): Promise<void> {
    const client = this.ctx.client;
    const info = await client.getRegionInfo(Region.BAR0);
    if (info.fd !== undefined) {
      try {
        const area = info.caps.flatMap((cap) => (cap.id === RegionCapId.SPARSE_MMAP ? cap.areas : [])).find((a) => a.offset <= BigInt(Reg.DOORBELLS) && a.offset + a.size >= BigInt(Reg.DOORBELLS + PAGE));
        if (area) this.doorbellPage = new native.NativeMapping(info.fd, info.offset + BigInt(Reg.DOORBELLS), BigInt(PAGE), true, true);
      } finally {
        native.closeFd(info.fd);
      }
    }
    await client.wireIoEventfds(Region.BAR0);
  }

  private unmapDoorbells(): void {
    this.doorbellPage?.unmap();
    this.doorbellPage = undefined;
  }

  close(): void {
    this.unmapDoorbells();
    this.needsRestart = true;
  }

  // ---- operations ----

  async run(op: NvmeOp, ctx: FuzzContext): Promise<void> {
    this.ctx = ctx;
    if (this.needsRestart) await this.restart(ctx);
    const io = this.io!;
    // Interrupts are counted by the eventfds, never read: drained so their counters stay small.
    for (const eventfd of ctx.eventfds) eventfd.take();
    switch (op.kind) {
      case 'admin': {
        const sqe = this.adminSqe(op);
        // An AER stays outstanding until an event: it is sent, not awaited.
        if (sqe.opcode === Admin.ASYNC_EVENT) this.submit(this.admin, sqe);
        else await this.complete(this.admin, sqe, `admin opcode 0x${sqe.opcode.toString(16)}`);
        if (DISRUPTIVE_ADMIN.has(sqe.opcode)) this.needsRestart = true;
        return;
      }
      case 'io': {
        const sqe = this.ioSqe(op);
        await this.complete(io, sqe, `I/O opcode 0x${sqe.opcode.toString(16)}`);
        return;
      }
      case 'batch': {
        const cids = (op.commands as NvmeOp[]).map((command) => this.enqueue(io, this.ioSqe(command)));
        await this.ring(io);
        for (const cid of cids) await this.waitCompletion(io, cid, `batched I/O cid ${cid}`);
        return;
      }
      case 'ring':
        // A doorbell value the host never earned: the controller must cope (an error event, a fatal status), not hang.
        this.needsRestart = true;
        await this.writeDoorbell(op.doorbell as number, op.value as number);
        return;
      case 'disrupt':
        this.needsRestart = true;
        for (const command of op.commands as NvmeOp[]) this.enqueue(io, this.ioSqe(command));
        await this.ring(io);
        await this.disrupt(op.by as string);
        return;
      default:
        throw new Error(`nvme mode: unknown op kind ${op.kind}`);
    }
  }

  /** Commands in flight meet a reset, a disable, a shutdown, a vanished window or a lost connection. */
  private async disrupt(by: string): Promise<void> {
    const client = this.ctx.client;
    if (by === 'reset') await client.reset();
    else if (by === 'disable') await this.setReg32(Reg.CC, 0);
    else if (by === 'shutdown') await this.setReg32(Reg.CC, CC_ENABLE | (1 << 14));
    else if (by === 'unmap') {
      await client.dmaUnmap(this.ctx.memoryIova, BigInt(this.ctx.memory.size));
      await client.dmaMap({ iova: this.ctx.memoryIova, memory: this.ctx.memory });
    } else await this.ctx.reconnect();
  }

  private adminSqe(op: NvmeOp): Sqe {
    const opcode = op.opcode as number;
    // Queue commands carry a queue address; anything else a data buffer.
    const prp = this.buildPrp(op.prp as unknown as Prp, opcode === Admin.GET_LOG_PAGE ? logPageBytes(op.cdw10 as number, (op.cdw11 as number) ?? 0) : PAGE);
    return { opcode, flags: op.flags as number | undefined, nsid: op.nsid as number, ...prp, cdw10: op.cdw10 as number, cdw11: op.cdw11 as number | undefined, cdw12: op.cdw12 as number | undefined, cdw13: op.cdw13 as number | undefined };
  }

  private ioSqe(op: NvmeOp): Sqe {
    const nlb = op.nlb as number;
    const lba = typeof op.lba === 'number' ? (BigInt(Math.floor(op.lba * 2 ** 20)) * this.blocks) >> 20n : big(op.lba);
    const bytes = op.opcode === Io.DATASET_MANAGEMENT ? ((nlb & 0xff) + 1) * 16 : (nlb + 1) * this.blockSize;
    return {
      opcode: op.opcode as number,
      flags: op.flags as number | undefined,
      nsid: op.nsid as number,
      ...this.buildPrp(op.prp as unknown as Prp, bytes),
      cdw10: Number(lba & 0xffffffffn),
      cdw11: Number((lba >> 32n) & 0xffffffffn),
      cdw12: op.opcode === Io.DATASET_MANAGEMENT ? 0 : nlb,
      cdw13: op.cdw13 as number | undefined,
      ...(op.opcode === Io.DATASET_MANAGEMENT ? { cdw10: nlb & 0xff, cdw11: 1 << 2 } : {}),
    };
  }

  /** PRP1 and PRP2 for a transfer of `bytes`, shaped as `prp` says; lists are written into guest memory. */
  private buildPrp(prp: Prp, bytes: number): { prp1: bigint; prp2: bigint } {
    const page = (n: number) => Layout.DATA + ((prp.page + n) % DATA_PAGES) * PAGE;
    const first = this.iova(page(0) + prp.offset);
    const noise = big(prp.noise);
    const outside = this.ctx.memoryIova + BigInt(this.ctx.memory.size) + (noise & 0xfff000n);
    const list = page(1);
    const entries = Math.min(Math.ceil((bytes + prp.offset) / PAGE) - 1, PAGE / 8);
    const writeList = (values: (i: number) => bigint) => {
      const b = Buffer.alloc(PAGE);
      for (let i = 0; i < PAGE / 8; i++) b.writeBigUInt64LE(BigInt.asUintN(64, values(i)), 8 * i);
      this.ctx.memory.write(list, b);
    };
    switch (prp.shape) {
      case 'valid':
        if (entries <= 1) return { prp1: first, prp2: entries === 1 ? this.iova(page(1)) : 0n };
        writeList((i) => this.iova(page(2 + i)));
        return { prp1: first, prp2: this.iova(list) };
      case 'unaligned':
        return { prp1: first + 1n + (noise & 2n), prp2: this.iova(list) + 4n };
      case 'zero':
        return { prp1: 0n, prp2: 0n };
      case 'outside':
        return { prp1: noise & 1n ? 0x1000n : outside, prp2: outside + 0x1000n };
      case 'list-self': // the last entry of a list page points at that page: a list that never ends
        writeList((i) => (i === PAGE / 8 - 1 ? this.iova(list) : this.iova(page(2 + i))));
        return { prp1: first, prp2: this.iova(list + PAGE - 8) };
      case 'list-loop': { // two list pages chained to each other
        const other = page(2);
        writeList((i) => (i === PAGE / 8 - 1 ? this.iova(other) : this.iova(page(3 + i))));
        const b = Buffer.alloc(PAGE);
        b.writeBigUInt64LE(this.iova(list), PAGE - 8);
        this.ctx.memory.write(other, b);
        return { prp1: first, prp2: this.iova(list) };
      }
      case 'list-outside':
        writeList((i) => (i % 3 === 2 ? outside + BigInt(i * PAGE) : this.iova(page(2 + i))));
        return { prp1: first, prp2: this.iova(list) };
      case 'list-garbage':
        writeList((i) => noise * BigInt(2 * i + 1));
        return { prp1: first, prp2: this.iova(list) };
      case 'random':
        return { prp1: noise, prp2: (noise << 12n) | BigInt(prp.page) };
    }
  }

  // ---- queues ----

  private iova(offset: number): bigint {
    return this.ctx.memoryIova + BigInt(offset);
  }

  /** Writes the entry at the tail with a fresh CID; returns the CID (the doorbell is rung separately). */
  private enqueue(queue: Queue, sqe: Sqe): number {
    const cid = queue.nextCid;
    queue.nextCid = (queue.nextCid + 1) & 0xffff;
    // A CID comes round again after 65536 commands: an unclaimed completion of its last use is stale.
    queue.reaped.delete(cid);
    const b = Buffer.alloc(SQE);
    b.writeUInt32LE((sqe.opcode & 0xff) | ((sqe.flags ?? 0) << 8) | (cid << 16), 0);
    b.writeUInt32LE((sqe.nsid ?? 0) >>> 0, 4);
    b.writeBigUInt64LE(BigInt.asUintN(64, sqe.prp1 ?? 0n), 24);
    b.writeBigUInt64LE(BigInt.asUintN(64, sqe.prp2 ?? 0n), 32);
    [sqe.cdw10, sqe.cdw11, sqe.cdw12, sqe.cdw13].forEach((value, i) => b.writeUInt32LE((value ?? 0) >>> 0, 40 + 4 * i));
    this.ctx.memory.write(queue.sq + queue.tail * SQE, b);
    queue.tail = (queue.tail + 1) % queue.entries;
    return cid;
  }

  private submit(queue: Queue, sqe: Sqe): number {
    const cid = this.enqueue(queue, sqe);
    void this.ring(queue);
    return cid;
  }

  private async complete(queue: Queue, sqe: Sqe, what: string): Promise<Completion> {
    const cid = this.enqueue(queue, sqe);
    await this.ring(queue);
    return this.waitCompletion(queue, cid, what);
  }

  private async expectSuccess(queue: Queue, sqe: Sqe, what: string): Promise<Completion> {
    const completion = await this.complete(queue, sqe, what);
    if (completion.status !== 0) throw new FuzzFinding('wrong-answer', `NVMe ${what} failed on a freshly enabled controller: status 0x${completion.status.toString(16)}`);
    return completion;
  }

  private ring(queue: Queue): Promise<void> {
    return this.writeDoorbell(2 * queue.id, queue.tail);
  }

  /** Doorbell `index` (SQ y tail 2y, CQ y head 2y + 1): to the shadow page first for I/O queues, then to the register. */
  private async writeDoorbell(index: number, value: number): Promise<void> {
    if (this.shadow && index >= 2) this.ctx.memory.write(Layout.SHADOW + 4 * index, u32(value));
    const offset = Reg.DOORBELLS + index * this.doorbellStride;
    if (this.doorbellPage && offset + 4 <= Reg.DOORBELLS + PAGE) this.doorbellPage.write(offset - Reg.DOORBELLS, u32(value));
    else await this.ctx.client.regionWrite(Region.BAR0, BigInt(offset), u32(value), { posted: true });
  }

  /**
   * Reaps completions until `cid`'s. Commands complete in any order: the
   * others reaped on the way wait in `queue.reaped` for their own turn (an
   * AER's stays there, unclaimed, until the queue is made again).
   */
  private async waitCompletion(queue: Queue, cid: number, what: string): Promise<Completion> {
    await this.ctx.waitFor(`NVMe ${what} (cid ${cid}, queue ${queue.id}): its completion`, () => {
      while (!queue.reaped.has(cid)) {
        const entry = this.peek(queue);
        if (!entry) break;
        if (entry.sqid !== queue.id) throw new FuzzFinding('wrong-answer', `NVMe completion for SQ ${entry.sqid} posted to queue ${queue.id}'s CQ`);
        if (entry.status === INTERNAL_ERROR) throw new FuzzFinding('device-error', `NVMe ${what}: Internal Error (the controller failed on the command)`);
        queue.reaped.set(entry.cid, entry);
      }
      return queue.reaped.has(cid);
    });
    await this.writeDoorbell(2 * queue.id + 1, queue.head);
    const found = queue.reaped.get(cid)!;
    queue.reaped.delete(cid);
    this.ctx.tally(found.status === 0 ? 'nvme: success' : `nvme: status 0x${found.status.toString(16).padStart(3, '0')}`);
    return found;
  }

  /** The next completion if the controller has posted it (phase tag), consumed. */
  private peek(queue: Queue): Completion | undefined {
    const entry = this.ctx.memory.read(queue.cq + queue.head * CQE, CQE);
    const status = entry.readUInt16LE(14);
    if ((status & 1) !== queue.phase) return undefined;
    queue.head = (queue.head + 1) % queue.entries;
    if (queue.head === 0) queue.phase ^= 1;
    return { sqHead: entry.readUInt16LE(8), sqid: entry.readUInt16LE(10), cid: entry.readUInt16LE(12), status: (status >> 1) & 0x7ff };
  }

  // ---- registers ----

  private async reg32(offset: number): Promise<number> {
    return (await this.ctx.client.regionRead(Region.BAR0, BigInt(offset), 4)).readUInt32LE(0);
  }

  private async setReg32(offset: number, value: number): Promise<void> {
    await this.ctx.client.regionWrite(Region.BAR0, BigInt(offset), u32(value));
  }

  private async setReg64(offset: number, value: bigint): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(value);
    await this.ctx.client.regionWrite(Region.BAR0, BigInt(offset), b);
  }
}

function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(value >>> 0);
  return b;
}

/** Get Log Page's transfer: (NUMDU << 16 | NUMDL) + 1 dwords, capped for building PRPs. */
function logPageBytes(cdw10: number, cdw11: number): number {
  const numd = ((cdw11 & 0xffff) * 0x10000 + (cdw10 >>> 16)) + 1;
  return Math.min(numd * 4, 1 << 21);
}

/** A hostile NVMe host; one per run (it keeps the queues it created). */
export function nvmeMode(): FuzzMode {
  return new NvmeHost() as FuzzMode;
}
