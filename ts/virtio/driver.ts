/**
 * A virtio driver on the package's client, for testing devices without a
 * VM: it finds the virtio capabilities, negotiates features, lays out split
 * queues in the client's guest memory, submits chains and waits for used
 * entries, as Linux's virtio_pci and virtio_ring do. Its low-level methods
 * (`readCommon`, `writeDescriptor`, `offer`, ...) let a test play a driver
 * that breaks the rules.
 */
import { UsageError } from '../errors.js';
import type { VfioUserClient } from '../client/client.js';
import type { GuestMemory } from '../client/memory.js';
import type { EventfdIrq } from '../client/eventfd-irq.js';
import { IrqIndex, Region, RegionCapId } from '../protocol/index.js';
import { native, type NativeMapping } from '../native.js';
import { Cap as PciCap, CapabilityId, Cfg, Command as PciCommand } from '../pci/spec.js';
import { Cap, CapType, Common, Desc, Feature, featureBit, NO_VECTOR, Ring, Status } from './spec.js';

export interface VirtioDriverOptions {
  /** Guest memory: the rings and buffers live in it. The driver maps it at `iova` (DMA_MAP). */
  memory: GuestMemory;
  /** Where the memory sits in the device's address space (default 1 MiB, so address 0 is outside). */
  iova?: bigint;
  /** The client has mapped the memory at `iova` already (a fuzzer's runner does): no DMA_MAP. */
  mapped?: boolean;
  /**
   * How to notify (default: the best the device offers, in this order):
   * 'mmap' stores to the notification area mapped from the BAR (sparse
   * mmap), 'ioeventfd' signals the ioeventfds the device offers there,
   * 'trap' sends REGION_WRITE. Asking for one the device lacks throws.
   */
  notify?: NotifyPath;
}

export type NotifyPath = 'mmap' | 'ioeventfd' | 'trap';

export interface InitOptions {
  /** Features to accept from those offered (default: all offered). VERSION_1 is always asked for. */
  features?: bigint;
  /** Largest queue size to use (default 256, or the device's maximum when smaller). */
  queueSize?: number;
  /** Queues to set up (default: all the device has). */
  queues?: number;
}

/** One buffer of a chain the driver submits. */
export type ChainBuffer = { data: Uint8Array } | { writable: number };

export interface Completion {
  /** The used length the device reported. */
  written: number;
  /** The device-writable buffers' contents after completion, in chain order. */
  writable: Buffer[];
}

/** The location of one virtio structure (a `virtio_pci_cap`). */
interface Structure {
  bar: number;
  offset: number;
  length: number;
}

const PAGE = 4096;

export class VirtioDriver {
  /** Features accepted (after `initialize`). */
  features = 0n;
  readonly queues: DriverQueue[] = [];
  /** MSI-X vectors (after `initialize`): 0 is configuration changes, 1 + n queue n. */
  vectors: EventfdIrq[] = [];
  private allocated = 0;
  /** The mapped area holding the notification structure, and where the structure starts in it ('mmap'). */
  private notifyMapping: NotifyMapping | undefined;

  private constructor(
    public client: VfioUserClient,
    readonly memory: GuestMemory,
    readonly iova: bigint,
    readonly bytes: Uint8Array,
    private readonly common: Structure,
    private readonly notify: Structure & { multiplier: number },
    private readonly isr: Structure,
    private readonly device: Structure | undefined,
    /** How this driver notifies. */
    readonly notifyPath: NotifyPath,
  ) {}

  /** Finds the virtio structures, turns on memory decoding and bus mastering, and maps the memory. */
  static async connect(client: VfioUserClient, options: VirtioDriverOptions): Promise<VirtioDriver> {
    const iova = options.iova ?? 0x100000n;
    const config = await client.regionRead(Region.CONFIG, 0n, 256);
    const found = new Map<number, Structure & { extra: number }>();
    // The capability walk is bounded by the list entries config space can hold.
    for (let at = config[Cfg.CAPABILITIES] & PciCap.POINTER_MASK, seen = 0; at !== 0 && seen < 48; at = config[at + PciCap.NEXT] & PciCap.POINTER_MASK, seen++) {
      if (config[at + PciCap.ID] !== CapabilityId.VENDOR) continue;
      const type = config[at + Cap.CFG_TYPE];
      if (found.has(type)) continue;
      found.set(type, {
        bar: config[at + Cap.BAR], offset: config.readUInt32LE(at + Cap.OFFSET), length: config.readUInt32LE(at + Cap.LENGTH),
        extra: at + Cap.EXTRA + 4 <= config.length ? config.readUInt32LE(at + Cap.EXTRA) : 0,
      });
    }
    const need = (type: number, name: string) => {
      const s = found.get(type);
      if (!s) throw new UsageError(`the device has no virtio ${name} capability`);
      return s;
    };
    const common = need(CapType.COMMON, 'common configuration');
    const notify = need(CapType.NOTIFY, 'notification');
    const isr = need(CapType.ISR, 'ISR');
    await client.pci.setCommand(PciCommand.MEMORY | PciCommand.BUS_MASTER, true);
    if (!options.mapped) await client.dmaMap({ iova, memory: options.memory });
    const notifyStructure = { ...notify, multiplier: notify.extra };
    const { path, mapping } = await wireNotify(client, notifyStructure, options.notify);
    const driver = new VirtioDriver(client, options.memory, iova, options.memory.view(), common, notifyStructure, isr, found.get(CapType.DEVICE), path);
    driver.notifyMapping = mapping;
    return driver;
  }

  // ---- registers ----

  async readCommon(offset: number, width: 1 | 2 | 4 | 8): Promise<bigint> {
    const bytes = await this.client.regionRead(Region.BAR0 + this.common.bar, BigInt(this.common.offset + offset), width);
    return width === 8 ? bytes.readBigUInt64LE(0) : BigInt(bytes.readUIntLE(0, width));
  }

  async writeCommon(offset: number, width: 1 | 2 | 4 | 8, value: number | bigint): Promise<void> {
    const bytes = Buffer.alloc(width);
    if (width === 8) bytes.writeBigUInt64LE(BigInt(value));
    else bytes.writeUIntLE(Number(value), 0, width);
    await this.client.regionWrite(Region.BAR0 + this.common.bar, BigInt(this.common.offset + offset), bytes);
  }

  async status(): Promise<number> {
    return Number(await this.readCommon(Common.DEVICE_STATUS, 1));
  }

  setStatus(status: number): Promise<void> {
    return this.writeCommon(Common.DEVICE_STATUS, 1, status);
  }

  /** Reads ISR status, which acknowledges it (and drops INTx). */
  async readIsr(): Promise<number> {
    return (await this.client.regionRead(Region.BAR0 + this.isr.bar, BigInt(this.isr.offset), 1))[0];
  }

  /** The 64 offered feature bits. */
  async deviceFeatures(): Promise<bigint> {
    let features = 0n;
    for (const select of [0, 1]) {
      await this.writeCommon(Common.DEVICE_FEATURE_SELECT, 4, select);
      features |= (await this.readCommon(Common.DEVICE_FEATURE, 4)) << BigInt(32 * select);
    }
    return features;
  }

  async writeDriverFeatures(features: bigint): Promise<void> {
    for (const select of [0, 1]) {
      await this.writeCommon(Common.DRIVER_FEATURE_SELECT, 4, select);
      await this.writeCommon(Common.DRIVER_FEATURE, 4, (features >> BigInt(32 * select)) & 0xffffffffn);
    }
  }

  /** `length` bytes of the device-specific configuration from `offset`. */
  async readConfig(offset: number, length: number): Promise<Buffer> {
    if (!this.device) throw new UsageError('the device has no device-specific configuration');
    return this.client.regionRead(Region.BAR0 + this.device.bar, BigInt(this.device.offset + offset), length);
  }

  async writeConfig(offset: number, data: Uint8Array): Promise<void> {
    if (!this.device) throw new UsageError('the device has no device-specific configuration');
    await this.client.regionWrite(Region.BAR0 + this.device.bar, BigInt(this.device.offset + offset), data);
  }

  /**
   * Notifies queue `queue` at its slot (`notifyOff`) as a guest's kick does,
   * by this driver's path: the 16-bit queue index, or the le32 `data` given
   * (NOTIFICATION_DATA: vqn, next_off, next_wrap).
   */
  async notifyQueue(queue: number, notifyOff = queue, data?: number): Promise<void> {
    const value = Buffer.alloc(data === undefined ? 2 : 4);
    if (data === undefined) value.writeUInt16LE(queue);
    else value.writeUInt32LE(data >>> 0);
    const offset = notifyOff * this.notify.multiplier;
    if (offset + value.length > this.notify.length) throw new UsageError(`notify_off ${notifyOff} is past the ${this.notify.length}-byte notification area`);
    // A store to the mapped page, as a guest's with no exit.
    if (this.notifyMapping) return this.notifyMapping.mapping.write(this.notifyMapping.at + offset, value);
    await this.client.regionWrite(Region.BAR0 + this.notify.bar, BigInt(this.notify.offset + offset), value);
  }

  // ---- initialization (§3.1.1) ----

  /**
   * Reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK (checked),
   * MSI-X vectors, queues, DRIVER_OK.
   */
  async initialize(options: InitOptions = {}): Promise<void> {
    await this.reset();
    await this.setStatus(Status.ACKNOWLEDGE);
    await this.setStatus(Status.ACKNOWLEDGE | Status.DRIVER);
    const offered = await this.deviceFeatures();
    if (!(offered & featureBit(Feature.VERSION_1))) throw new UsageError('the device does not offer VERSION_1');
    this.features = offered & ((options.features ?? offered) | featureBit(Feature.VERSION_1));
    await this.writeDriverFeatures(this.features);
    await this.setStatus(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK);
    if (!((await this.status()) & Status.FEATURES_OK)) throw new UsageError(`the device refused features 0x${this.features.toString(16)}`);
    // A driver initialized again (after NEEDS_RESET) wires fresh vectors: the old ones go.
    for (const v of this.vectors) v.close();
    this.vectors = await this.client.wireIrqs(IrqIndex.MSIX);
    await this.client.pci.enableMsix();
    await this.writeCommon(Common.CONFIG_MSIX_VECTOR, 2, 0);
    const count = Number(await this.readCommon(Common.NUM_QUEUES, 2));
    for (let q = 0; q < Math.min(count, options.queues ?? count); q++) {
      await this.writeCommon(Common.QUEUE_SELECT, 2, q);
      const max = Number(await this.readCommon(Common.QUEUE_SIZE, 2));
      const size = Math.min(max, options.queueSize ?? 256);
      const queue = this.setUpQueue(q, size, Number(await this.readCommon(Common.QUEUE_NOTIFY_OFF, 2)));
      await this.writeCommon(Common.QUEUE_SIZE, 2, size);
      await this.writeCommonHalves(Common.QUEUE_DESC, queue.desc);
      await this.writeCommonHalves(Common.QUEUE_DRIVER, queue.avail);
      await this.writeCommonHalves(Common.QUEUE_DEVICE, queue.used);
      await this.writeCommon(Common.QUEUE_MSIX_VECTOR, 2, q + 1 < this.vectors.length ? q + 1 : NO_VECTOR);
      await this.writeCommon(Common.QUEUE_ENABLE, 2, 1);
    }
    await this.setStatus(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK);
  }

  /**
   * Writes a 64-bit field as its low then high 32-bit halves, as Linux's
   * virtio_pci does (§4.1.3.1 allows it): SPDK's vfio-user endpoint takes no
   * access wider than 4 bytes.
   */
  private async writeCommonHalves(offset: number, value: bigint): Promise<void> {
    await this.writeCommon(offset, 4, value & 0xffffffffn);
    await this.writeCommon(offset + 4, 4, value >> 32n);
  }

  /** Writes 0 to the status and waits for it to read 0 (§4.1.4.3.2). */
  async reset(): Promise<void> {
    await this.setStatus(0);
    for (let tries = 0; (await this.status()) !== 0; tries++) {
      if (tries > 100) throw new UsageError('the device did not reset');
    }
    for (const q of this.queues) q.forget();
    this.queues.length = 0;
  }

  /** Takes `length` bytes of guest memory, page aligned; returns its address. */
  allocate(length: number): bigint {
    const at = this.allocated;
    const size = Math.ceil(length / PAGE) * PAGE;
    if (at + size > this.memory.size) throw new UsageError(`guest memory is full (${this.memory.size} bytes)`);
    this.allocated += size;
    return this.iova + BigInt(at);
  }

  /** A view of guest memory at `iova`. */
  at(iova: bigint, length: number): Uint8Array {
    const offset = Number(iova - this.iova);
    if (offset < 0 || offset + length > this.memory.size) throw new UsageError(`0x${iova.toString(16)} + ${length} is outside guest memory`);
    return this.bytes.subarray(offset, offset + length);
  }

  private setUpQueue(index: number, size: number, notifyOff: number): DriverQueue {
    const desc = this.allocate(size * Desc.SIZE);
    const avail = this.allocate(Ring.ENTRIES + 2 * size + 2);
    const used = this.allocate(Ring.ENTRIES + Ring.USED_ELEM_SIZE * size + 2);
    const data = this.allocate(64 * 1024 + size * 256);
    const queue = new DriverQueue(this, index, size, notifyOff, { desc, avail, used, data, dataSize: 64 * 1024 + size * 256 });
    this.queues[index] = queue;
    return queue;
  }

  /**
   * Carries on with the device on `client` (after a migration): maps the
   * memory there and wires the same MSI-X eventfds, as a destination VMM does.
   */
  async moveTo(client: VfioUserClient): Promise<void> {
    await client.dmaMap({ iova: this.iova, memory: this.memory });
    if (this.vectors.length > 0) await client.setIrqs({ index: IrqIndex.MSIX, eventfds: this.vectors });
    const { mapping } = await wireNotify(client, this.notify, this.notifyPath);
    this.notifyMapping?.mapping.unmap();
    this.notifyMapping = mapping;
    this.client = client;
  }

  close(): void {
    this.notifyMapping?.mapping.unmap();
    this.notifyMapping = undefined;
    for (const q of this.queues) q.forget();
    for (const v of this.vectors) v.close();
    this.vectors = [];
  }
}

interface QueueMemory {
  desc: bigint;
  avail: bigint;
  used: bigint;
  /** Where the queue's buffers are carved from. */
  data: bigint;
  dataSize: number;
}

interface Waiting {
  writable: { iova: bigint; length: number }[];
  resolve(completion: Completion): void;
}

/** A split queue as the driver side lays it out. */
export class DriverQueue {
  readonly desc: bigint;
  readonly avail: bigint;
  readonly used: bigint;
  private readonly table: DataView;
  private readonly availRing: DataView;
  private readonly availU16: Uint16Array;
  private readonly usedRing: DataView;
  private readonly usedU16: Uint16Array;
  private availIdx = 0;
  private lastUsed = 0;
  private freeHead = 0;
  private free: number;
  private dataUsed = 0;
  private readonly waiting = new Map<number, Waiting>();
  private readonly listener = () => this.collect();

  constructor(
    private readonly driver: VirtioDriver,
    readonly index: number,
    readonly size: number,
    readonly notifyOff: number,
    private readonly area: QueueMemory,
  ) {
    ({ desc: this.desc, avail: this.avail, used: this.used } = area);
    // Fresh rings are zeros (a queue set up again over old memory must not offer old entries).
    driver.at(this.desc, size * Desc.SIZE).fill(0);
    driver.at(this.avail, Ring.ENTRIES + 2 * size + 2).fill(0);
    driver.at(this.used, Ring.ENTRIES + Ring.USED_ELEM_SIZE * size + 2).fill(0);
    const view = (iova: bigint, length: number) => {
      const bytes = driver.at(iova, length);
      return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    };
    this.table = view(this.desc, size * Desc.SIZE);
    this.availRing = view(this.avail, Ring.ENTRIES + 2 * size + 2);
    const availBytes = driver.at(this.avail, Ring.ENTRIES + 2 * size + 2);
    this.availU16 = new Uint16Array(availBytes.buffer, availBytes.byteOffset, availBytes.byteLength / 2);
    const usedBytes = driver.at(this.used, Ring.ENTRIES + Ring.USED_ELEM_SIZE * size + 2);
    this.usedRing = new DataView(usedBytes.buffer, usedBytes.byteOffset, usedBytes.byteLength);
    this.usedU16 = new Uint16Array(usedBytes.buffer, usedBytes.byteOffset, usedBytes.byteLength / 2);
    // Free descriptors are chained through `next`, as Linux keeps them.
    for (let i = 0; i < size; i++) this.table.setUint16(i * Desc.SIZE + Desc.NEXT, i + 1, true);
    this.free = size;
    driver.vectors[index + 1]?.on('interrupt', this.listener);
  }

  private get eventIdx(): boolean {
    return (this.driver.features & featureBit(Feature.RING_EVENT_IDX)) !== 0n;
  }

  /** Chains submitted and not used yet. */
  get outstanding(): number {
    return this.waiting.size;
  }

  /**
   * Submits one chain (device-readable buffers first), notifies unless the
   * device suppressed notifications, and resolves when the device has used it.
   * `indirect` puts the chain in an indirect table.
   */
  submit(buffers: readonly ChainBuffer[], options: { indirect?: boolean; notify?: boolean } = {}): Promise<Completion> {
    const placed = buffers.map((b) => {
      const length = 'data' in b ? b.data.length : b.writable;
      const iova = this.carve(length);
      if ('data' in b) this.driver.at(iova, length).set(b.data);
      return { iova, length, write: !('data' in b) };
    });
    let head: number;
    if (options.indirect) {
      const table = this.carve(placed.length * Desc.SIZE);
      const bytes = this.driver.at(table, placed.length * Desc.SIZE);
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      placed.forEach((p, i) => writeDesc(view, i, { addr: p.iova, len: p.length, flags: (p.write ? Desc.F_WRITE : 0) | (i + 1 < placed.length ? Desc.F_NEXT : 0), next: i + 1 }));
      head = this.take(1)[0];
      this.writeDescriptor(head, { addr: table, len: placed.length * Desc.SIZE, flags: Desc.F_INDIRECT, next: 0 });
    } else {
      const ids = this.take(placed.length);
      placed.forEach((p, i) => this.writeDescriptor(ids[i], { addr: p.iova, len: p.length, flags: (p.write ? Desc.F_WRITE : 0) | (i + 1 < ids.length ? Desc.F_NEXT : 0), next: ids[i + 1] ?? 0 }));
      head = ids[0];
    }
    let fail: (error: unknown) => void = () => {};
    const done = new Promise<Completion>((resolve, reject) => {
      this.waiting.set(head, { writable: placed.filter((p) => p.write), resolve });
      fail = reject;
    });
    this.offer(head);
    // A notification that cannot be sent (the connection closed) fails the submission.
    if (options.notify !== false) this.kickIfWanted().catch(fail);
    return done;
  }

  /** Writes descriptor `i` of the table (hostile tests write their own). */
  writeDescriptor(i: number, d: { addr: bigint; len: number; flags: number; next: number }): void {
    writeDesc(this.table, i, d);
  }

  /** Puts `head` in the available ring and publishes the new index. */
  offer(head: number): void {
    this.availRing.setUint16(Ring.ENTRIES + 2 * (this.availIdx % this.size), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    Atomics.store(this.availU16, Ring.IDX / 2, this.availIdx);
  }

  /** Sets the available index to anything (a hostile driver's lie). */
  setAvailIndex(idx: number): void {
    this.availIdx = idx & 0xffff;
    Atomics.store(this.availU16, Ring.IDX / 2, this.availIdx);
  }

  /** Notifies the device now (with NOTIFICATION_DATA: where the available ring stands). */
  kick(): Promise<void> {
    const data = this.driver.features & featureBit(Feature.NOTIFICATION_DATA) ? (this.availIdx << 16) | this.index : undefined;
    return this.driver.notifyQueue(this.index, this.notifyOff, data);
  }

  /** Notifies unless the device said it needs no notification (used flags or avail_event). */
  async kickIfWanted(): Promise<boolean> {
    const wanted = this.eventIdx
      ? ((this.availIdx - Atomics.load(this.usedU16, (Ring.ENTRIES + Ring.USED_ELEM_SIZE * this.size) / 2) - 1) & 0xffff) < 1
      : (Atomics.load(this.usedU16, Ring.FLAGS / 2) & Ring.USED_NO_NOTIFY) === 0;
    if (wanted) await this.kick();
    return wanted;
  }

  /** Asks for no interrupts (avail flags, or a used_event far behind) or for one per used entry. */
  setInterrupts(enabled: boolean): void {
    if (this.eventIdx) Atomics.store(this.availU16, (Ring.ENTRIES + 2 * this.size) / 2, enabled ? this.lastUsed : (this.lastUsed - 1) & 0xffff);
    else Atomics.store(this.availU16, Ring.FLAGS / 2, enabled ? 0 : Ring.AVAIL_NO_INTERRUPT);
  }

  /** The device's used index as published. */
  get usedIndex(): number {
    return Atomics.load(this.usedU16, Ring.IDX / 2);
  }

  /** Resolves submissions the device has used (called on every interrupt; call it to poll). */
  collect(): void {
    const idx = this.usedIndex;
    for (let n = 0; this.lastUsed !== idx && n < this.size; n++) {
      const at = Ring.ENTRIES + Ring.USED_ELEM_SIZE * (this.lastUsed % this.size);
      const head = this.usedRing.getUint32(at, true);
      const written = this.usedRing.getUint32(at + 4, true);
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
      const waiting = this.waiting.get(head);
      if (!waiting) throw new Error(`queue ${this.index}: the device used descriptor ${head}, which was not submitted`);
      this.waiting.delete(head);
      this.release(head);
      waiting.resolve({ written, writable: waiting.writable.map((w) => Buffer.from(this.driver.at(w.iova, w.length))) });
    }
    // With EVENT_IDX, ask to be interrupted for the next entry.
    if (this.eventIdx) Atomics.store(this.availU16, (Ring.ENTRIES + 2 * this.size) / 2, this.lastUsed);
    if (this.waiting.size === 0) this.dataUsed = 0;
  }

  /** Stops listening (the queue's memory stays allocated). */
  forget(): void {
    this.driver.vectors[this.index + 1]?.off('interrupt', this.listener);
  }

  private carve(length: number): bigint {
    const at = Math.ceil(this.dataUsed / 16) * 16;
    if (at + length > this.area.dataSize) throw new UsageError(`queue ${this.index}: ${length} bytes do not fit the queue's buffer area`);
    this.dataUsed = at + length;
    return this.area.data + BigInt(at);
  }

  private take(count: number): number[] {
    if (count > this.free) throw new UsageError(`queue ${this.index}: ${count} descriptors wanted, ${this.free} free`);
    const ids: number[] = [];
    for (let i = 0; i < count; i++) {
      ids.push(this.freeHead);
      this.freeHead = this.table.getUint16(this.freeHead * Desc.SIZE + Desc.NEXT, true);
    }
    this.free -= count;
    return ids;
  }

  /** Returns a used chain's descriptors to the free list. */
  private release(head: number): void {
    let count = 1;
    let last = head;
    for (let n = 0; n < this.size; n++) {
      const flags = this.table.getUint16(last * Desc.SIZE + Desc.FLAGS, true);
      if (!(flags & Desc.F_NEXT)) break;
      last = this.table.getUint16(last * Desc.SIZE + Desc.NEXT, true);
      count++;
    }
    this.table.setUint16(last * Desc.SIZE + Desc.NEXT, this.freeHead, true);
    this.freeHead = head;
    this.free += count;
  }
}

function writeDesc(view: DataView, i: number, d: { addr: bigint; len: number; flags: number; next: number }): void {
  const at = i * Desc.SIZE;
  view.setBigUint64(at + Desc.ADDR, d.addr, true);
  view.setUint32(at + Desc.LEN, d.len, true);
  view.setUint16(at + Desc.FLAGS, d.flags, true);
  view.setUint16(at + Desc.NEXT, d.next, true);
}

/**
 * Sets up `wanted` (or the best path the device offers) on `client`: maps
 * the notification area, or wires the BAR's ioeventfds.
 */
interface NotifyMapping {
  mapping: NativeMapping;
  at: number;
}

async function wireNotify(client: VfioUserClient, notify: Structure, wanted: NotifyPath | undefined): Promise<{ path: NotifyPath; mapping?: NotifyMapping }> {
  const region = Region.BAR0 + notify.bar;
  if (wanted === undefined || wanted === 'mmap') {
    const info = await client.getRegionInfo(region);
    let mapping: NotifyMapping | undefined;
    if (info.fd !== undefined) {
      try {
        const sparse = info.caps.find((c) => c.id === RegionCapId.SPARSE_MMAP);
        const area = sparse?.id === RegionCapId.SPARSE_MMAP
          ? sparse.areas.find((a) => a.offset <= BigInt(notify.offset) && BigInt(notify.offset + notify.length) <= a.offset + a.size)
          : { offset: 0n, size: info.size };
        if (area) mapping = { mapping: new native.NativeMapping(info.fd, info.offset + area.offset, area.size, true, true), at: notify.offset - Number(area.offset) };
      } finally {
        native.closeFd(info.fd);
      }
    }
    if (mapping) return { path: 'mmap', mapping };
    if (wanted === 'mmap') throw new UsageError('the device does not let the notification area be mapped');
  }
  if (wanted === undefined || wanted === 'ioeventfd') {
    const wired = await client.wireIoEventfds(region);
    if (wired.some((e) => e.offset >= BigInt(notify.offset) && e.offset < BigInt(notify.offset + notify.length))) return { path: 'ioeventfd' };
    if (wanted === 'ioeventfd') throw new UsageError('the device offers no ioeventfds for its notification area');
  }
  return { path: 'trap' };
}
