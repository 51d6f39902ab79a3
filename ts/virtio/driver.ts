/**
 * A virtio driver on the package's client, for testing devices without a
 * VM: it finds the virtio capabilities, negotiates features, lays out split
 * or packed queues in the client's guest memory, submits chains and waits
 * for used entries, as Linux's virtio_pci and virtio_ring do. Its low-level
 * methods (`readCommon`, `writeDescriptor`, `offer`, `offerChain`, ...) let
 * a test play a driver that breaks the rules.
 */
import { UsageError } from '../errors.js';
import { BufferArea } from './buffer-area.js';
import type { VfioUserClient } from '../client/client.js';
import type { GuestMemory } from '../client/memory.js';
import type { EventfdIrq } from '../client/eventfd-irq.js';
import { IrqIndex, Region, RegionCapId } from '../protocol/index.js';
import { native, type NativeMapping } from '../native.js';
import { Cap as PciCap, CapabilityId, Cfg, Command as PciCommand } from '../pci/spec.js';
import { Cap, CapType, Common, Desc, EventSuppress, Feature, featureBit, NO_VECTOR, PackedDesc, Ring, Status } from './spec.js';

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
  /**
   * Features to accept from those offered (default: all offered). VERSION_1
   * is always asked for; RING_PACKED is `ring`'s to decide.
   */
  features?: bigint;
  /** The ring layout: 'packed' negotiates RING_PACKED (as Linux does whenever it is offered); default 'split'. */
  ring?: 'split' | 'packed';
  /** Largest queue size to use (default 256, or the device's maximum when smaller). */
  queueSize?: number;
  /** Queues to set up (default: all the device has). */
  queues?: number;
  /**
   * Bytes of guest memory for each queue's buffers (default 64 KiB plus 256
   * per entry), reused as chains are used: what is outstanding at once must
   * fit (32 chains of 4 KiB need about 130 KiB).
   */
  bufferBytes?: number;
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
    const packed = options.ring === 'packed';
    if (packed && !(offered & featureBit(Feature.RING_PACKED))) throw new UsageError('the device does not offer RING_PACKED');
    const wanted = ((options.features ?? offered) & ~featureBit(Feature.RING_PACKED)) | featureBit(Feature.VERSION_1) | (packed ? featureBit(Feature.RING_PACKED) : 0n);
    this.features = offered & wanted;
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
      const queue = this.setUpQueue(q, size, Number(await this.readCommon(Common.QUEUE_NOTIFY_OFF, 2)), packed, options.bufferBytes ?? 64 * 1024 + size * 256);
      await this.writeCommon(Common.QUEUE_SIZE, 2, size);
      await this.writeCommonHalves(Common.QUEUE_DESC, queue.desc);
      await this.writeCommonHalves(Common.QUEUE_DRIVER, queue.driverArea);
      await this.writeCommonHalves(Common.QUEUE_DEVICE, queue.deviceArea);
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

  /** Queue `n`, which must be a split one (for a test that writes the rings itself). */
  split(n: number): SplitDriverQueue {
    const q = this.queues[n];
    if (!(q instanceof SplitDriverQueue)) throw new UsageError(`queue ${n} is not a split queue`);
    return q;
  }

  /** Queue `n`, which must be a packed one. */
  packed(n: number): PackedDriverQueue {
    const q = this.queues[n];
    if (!(q instanceof PackedDriverQueue)) throw new UsageError(`queue ${n} is not a packed queue`);
    return q;
  }

  private setUpQueue(index: number, size: number, notifyOff: number, packed: boolean, bufferBytes: number): DriverQueue {
    if (!Number.isSafeInteger(bufferBytes) || bufferBytes < 16) throw new UsageError(`bufferBytes ${bufferBytes} is not an integer of at least 16`);
    const dataSize = Math.ceil(bufferBytes / 16) * 16;
    const area = {
      desc: this.allocate(size * Desc.SIZE),
      driver: this.allocate(packed ? EventSuppress.SIZE : Ring.ENTRIES + 2 * size + 2),
      device: this.allocate(packed ? EventSuppress.SIZE : Ring.ENTRIES + Ring.USED_ELEM_SIZE * size + 2),
      data: this.allocate(dataSize),
      dataSize,
    };
    const queue = packed ? new PackedDriverQueue(this, index, size, notifyOff, area) : new SplitDriverQueue(this, index, size, notifyOff, area);
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
  driver: bigint;
  device: bigint;
  /** Where the queue's buffers are carved from. */
  data: bigint;
  dataSize: number;
}

interface Waiting {
  writable: { iova: bigint; length: number }[];
  /** The buffer area's ranges the chain holds: offset, length, offset, length... */
  carved: number[];
  resolve(completion: Completion): void;
}

/** A buffer placed in guest memory for a chain. */
interface Placed {
  iova: bigint;
  length: number;
  write: boolean;
}

/** A queue as the driver side lays it out: split (`SplitDriverQueue`) or packed (`PackedDriverQueue`). */
export abstract class DriverQueue {
  /** Where the descriptors, the driver area and the device area are (what queue_desc, queue_driver and queue_device say). */
  readonly desc: bigint;
  readonly driverArea: bigint;
  readonly deviceArea: bigint;
  /** Submissions waiting for their used entry, by the id the device gives back. */
  protected readonly waiting = new Map<number, Waiting>();
  private readonly buffers: BufferArea;
  /** The ranges carved for the chain being made. */
  private carved: number[] = [];
  private readonly listener = () => this.collect();

  constructor(
    protected readonly driver: VirtioDriver,
    readonly index: number,
    readonly size: number,
    readonly notifyOff: number,
    private readonly area: QueueMemory,
  ) {
    ({ desc: this.desc, driver: this.driverArea, device: this.deviceArea } = area);
    this.buffers = new BufferArea(area.dataSize);
    driver.vectors[index + 1]?.on('interrupt', this.listener);
  }

  protected get eventIdx(): boolean {
    return (this.driver.features & featureBit(Feature.RING_EVENT_IDX)) !== 0n;
  }

  /** Chains submitted and not used yet. */
  get outstanding(): number {
    return this.waiting.size;
  }

  /** How many used entries the device has written, mod 2^16 (split: the used index; packed: counted by collecting them). */
  abstract get usedIndex(): number;

  /** Makes `placed` available as one chain (in an indirect table when `indirect`); returns the id the device will give back. */
  protected abstract make(placed: Placed[], indirect: boolean): number;

  /** The le32 a notification carries with NOTIFICATION_DATA (§4.1.5.2): the queue and where its ring stands. */
  protected abstract notificationData(): number;

  /** Whether the device asked to be notified for what was made available since the last check. */
  protected abstract notifyWanted(): boolean;

  /** Asks for no interrupts, or for one per used entry. */
  abstract setInterrupts(enabled: boolean): void;

  /** Resolves submissions the device has used (called on every interrupt; call it to poll). */
  abstract collect(): void;

  /**
   * Submits one chain (device-readable buffers first), notifies unless the
   * device suppressed notifications, and resolves when the device has used it.
   * `indirect` puts the chain in an indirect table.
   */
  submit(buffers: readonly ChainBuffer[], options: { indirect?: boolean; notify?: boolean } = {}): Promise<Completion> {
    this.carved = [];
    let placed: Placed[];
    let id: number;
    try {
      placed = buffers.map((b): Placed => {
        const length = 'data' in b ? b.data.length : b.writable;
        const iova = this.carve(length);
        if ('data' in b) this.driver.at(iova, length).set(b.data);
        return { iova, length, write: !('data' in b) };
      });
      id = this.make(placed, options.indirect === true);
    } catch (error) {
      this.giveBack(this.carved);
      throw error;
    }
    const carved = this.carved;
    let fail: (error: unknown) => void = () => {};
    const done = new Promise<Completion>((resolve, reject) => {
      this.waiting.set(id, { writable: placed.filter((p) => p.write), carved, resolve });
      fail = reject;
    });
    // A notification that cannot be sent (the connection closed) fails the submission.
    if (options.notify !== false) this.kickIfWanted().catch(fail);
    return done;
  }

  /** Notifies the device now (with NOTIFICATION_DATA: where the driver's ring stands). */
  kick(): Promise<void> {
    const data = this.driver.features & featureBit(Feature.NOTIFICATION_DATA) ? this.notificationData() : undefined;
    return this.driver.notifyQueue(this.index, this.notifyOff, data);
  }

  /** Notifies unless the device said it needs no notification. */
  async kickIfWanted(): Promise<boolean> {
    const wanted = this.notifyWanted();
    if (wanted) await this.kick();
    return wanted;
  }

  /** Stops listening (the queue's memory stays allocated). */
  forget(): void {
    this.driver.vectors[this.index + 1]?.off('interrupt', this.listener);
  }

  /** Completes the submission the device gave back as `id`; false when none waits for it. */
  protected resolve(id: number, written: number): boolean {
    const waiting = this.waiting.get(id);
    if (!waiting) return false;
    this.waiting.delete(id);
    waiting.resolve({ written, writable: waiting.writable.map((w) => Buffer.from(this.driver.at(w.iova, w.length))) });
    this.giveBack(waiting.carved);
    return true;
  }

  /** `length` bytes of the queue's buffer area for the chain being made (given back when the device uses it). */
  protected carve(length: number): bigint {
    const at = this.buffers.take(length);
    if (at === undefined) {
      throw new UsageError(`queue ${this.index}: ${length} bytes do not fit the queue's buffer area (${this.buffers.used} of ${this.buffers.size} bytes outstanding; InitOptions.bufferBytes sets its size)`);
    }
    this.carved.push(at, length);
    return this.area.data + BigInt(at);
  }

  private giveBack(carved: number[]): void {
    for (let i = 0; i < carved.length; i += 2) this.buffers.give(carved[i]!, carved[i + 1]!);
  }

  /** A DataView and a u16 view of guest memory at `iova`, zeroed (a queue set up again over old memory must not offer old entries). */
  protected fresh(iova: bigint, length: number): { view: DataView; u16: Uint16Array } {
    const bytes = this.driver.at(iova, length).fill(0);
    return { view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), u16: new Uint16Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.byteLength / 2)) };
  }
}

/** A split queue (§2.7): descriptor table, available ring, used ring. */
export class SplitDriverQueue extends DriverQueue {
  /** The available ring (the driver area) and the used ring (the device area). */
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

  constructor(driver: VirtioDriver, index: number, size: number, notifyOff: number, area: QueueMemory) {
    super(driver, index, size, notifyOff, area);
    this.avail = this.driverArea;
    this.used = this.deviceArea;
    this.table = this.fresh(this.desc, size * Desc.SIZE).view;
    ({ view: this.availRing, u16: this.availU16 } = this.fresh(this.avail, Ring.ENTRIES + 2 * size + 2));
    ({ view: this.usedRing, u16: this.usedU16 } = this.fresh(this.used, Ring.ENTRIES + Ring.USED_ELEM_SIZE * size + 2));
    // Free descriptors are chained through `next`, as Linux keeps them.
    for (let i = 0; i < size; i++) this.table.setUint16(i * Desc.SIZE + Desc.NEXT, i + 1, true);
    this.free = size;
  }

  protected make(placed: Placed[], indirect: boolean): number {
    let head: number;
    if (indirect) {
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
    this.offer(head);
    return head;
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

  /** { vqn, next_idx: the available index }. */
  protected notificationData(): number {
    return ((this.availIdx << 16) | this.index) >>> 0;
  }

  /** Used flags' NO_NOTIFY, or avail_event with EVENT_IDX. */
  protected notifyWanted(): boolean {
    return this.eventIdx
      ? ((this.availIdx - Atomics.load(this.usedU16, (Ring.ENTRIES + Ring.USED_ELEM_SIZE * this.size) / 2) - 1) & 0xffff) < 1
      : (Atomics.load(this.usedU16, Ring.FLAGS / 2) & Ring.USED_NO_NOTIFY) === 0;
  }

  /** Avail flags' NO_INTERRUPT, or a used_event far behind with EVENT_IDX. */
  setInterrupts(enabled: boolean): void {
    if (this.eventIdx) Atomics.store(this.availU16, (Ring.ENTRIES + 2 * this.size) / 2, enabled ? this.lastUsed : (this.lastUsed - 1) & 0xffff);
    else Atomics.store(this.availU16, Ring.FLAGS / 2, enabled ? 0 : Ring.AVAIL_NO_INTERRUPT);
  }

  /** The device's used index as published. */
  get usedIndex(): number {
    return Atomics.load(this.usedU16, Ring.IDX / 2);
  }

  collect(): void {
    let n = 0;
    for (let idx = this.usedIndex; this.lastUsed !== idx && n < this.size; n++) {
      const at = Ring.ENTRIES + Ring.USED_ELEM_SIZE * (this.lastUsed % this.size);
      const head = this.usedRing.getUint32(at, true);
      const written = this.usedRing.getUint32(at + 4, true);
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
      if (!this.waiting.has(head)) throw new Error(`queue ${this.index}: the device used descriptor ${head}, which was not submitted`);
      this.release(head);
      this.resolve(head, written);
      // Entries the device published meanwhile are taken in this call too.
      if (this.lastUsed === idx) idx = this.usedIndex;
    }
    if (!this.eventIdx) return;
    // Ask to be interrupted for the next entry. One the device published before this store saw
    // the old used_event and sent no interrupt: look again after it (Linux's virtqueue_enable_cb).
    Atomics.store(this.availU16, (Ring.ENTRIES + 2 * this.size) / 2, this.lastUsed);
    if (Atomics.load(this.usedU16, Ring.IDX / 2) !== this.lastUsed) setImmediate(() => this.collect());
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

/** One descriptor of a packed ring or indirect table as a test writes it: `flags` without the wrap bits. */
export interface PackedDescriptor {
  addr: bigint;
  len: number;
  flags: number;
}

/**
 * A packed queue (§2.8): one descriptor ring and an event suppression
 * structure each way. Chains go in at the driver's position with the wrap
 * bits of their lap, the first descriptor's flags last; used entries come
 * back in completion order, each skipping the entries its chain took.
 */
export class PackedDriverQueue extends DriverQueue {
  private readonly ring: DataView;
  private readonly ringU16: Uint16Array;
  private readonly driverEvent: Uint16Array;
  private readonly deviceEvent: Uint16Array;
  private nextAvail = 0;
  private availWrap = true;
  private lastUsed = 0;
  private usedWrap = true;
  /** The available position (counting laps, 0 to 2 * size - 1) when the driver last decided to notify. */
  private checkedAt = 0;
  private freeSlots: number;
  /** Buffer IDs for `submit`, and the ring entries each chain in flight took, by ID. */
  private readonly freeIds: number[];
  private readonly slotsOf = new Map<number, number>();
  private usedCount = 0;

  constructor(driver: VirtioDriver, index: number, size: number, notifyOff: number, area: QueueMemory) {
    super(driver, index, size, notifyOff, area);
    ({ view: this.ring, u16: this.ringU16 } = this.fresh(this.desc, size * Desc.SIZE));
    this.driverEvent = this.fresh(this.driverArea, EventSuppress.SIZE).u16;
    this.deviceEvent = this.fresh(this.deviceArea, EventSuppress.SIZE).u16;
    this.freeSlots = size;
    this.freeIds = Array.from({ length: size }, (_, i) => size - 1 - i);
  }

  /** The wrap bits of an available descriptor in the driver's current lap (`wrap` flips them: the other lap). */
  availBits(wrap = this.availWrap): number {
    return wrap ? PackedDesc.F_AVAIL : PackedDesc.F_USED;
  }

  /** Ring entries free for chains (entries come back as used entries are collected). */
  get freeEntries(): number {
    return this.freeSlots;
  }

  /** The driver's next position: the ring index, and the wrap counter in bit 15 (as off_wrap writes it). */
  get availPosition(): number {
    return this.nextAvail | (this.availWrap ? EventSuppress.WRAP : 0);
  }

  protected make(placed: Placed[], indirect: boolean): number {
    const id = this.freeIds.pop();
    if (id === undefined) throw new UsageError(`queue ${this.index}: every buffer id is in flight`);
    const flags = (p: Placed) => (p.write ? Desc.F_WRITE : 0);
    if (indirect) {
      const table = this.carve(placed.length * Desc.SIZE);
      const bytes = this.driver.at(table, placed.length * Desc.SIZE);
      writePackedTable(new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), placed.map((p) => ({ addr: p.iova, len: p.length, flags: flags(p) })));
      this.offerChain([{ addr: table, len: placed.length * Desc.SIZE, flags: Desc.F_INDIRECT }], id);
    } else {
      this.offerChain(placed.map((p, i) => ({ addr: p.iova, len: p.length, flags: flags(p) | (i + 1 < placed.length ? Desc.F_NEXT : 0) })), id);
    }
    return id;
  }

  /**
   * Writes `descs` as one chain at the driver's position, each with its
   * lap's wrap bits and `id`, and makes it available (the first flags last).
   * The other flags are taken as given: a hostile test may chain past the end.
   */
  offerChain(descs: readonly PackedDescriptor[], id: number): void {
    if (descs.length === 0 || descs.length > this.freeSlots) throw new UsageError(`queue ${this.index}: ${descs.length} descriptors wanted, ${this.freeSlots} free`);
    const first = this.nextAvail;
    let headFlags = 0;
    descs.forEach((d, i) => {
      const flags = (d.flags & ~(PackedDesc.F_AVAIL | PackedDesc.F_USED)) | this.availBits();
      const at = this.nextAvail * Desc.SIZE;
      this.ring.setBigUint64(at + Desc.ADDR, d.addr, true);
      this.ring.setUint32(at + Desc.LEN, d.len, true);
      this.ring.setUint16(at + PackedDesc.ID, id, true);
      if (i === 0) headFlags = flags;
      else this.ring.setUint16(at + PackedDesc.FLAGS, flags, true);
      if (++this.nextAvail === this.size) {
        this.nextAvail = 0;
        this.availWrap = !this.availWrap;
      }
    });
    this.freeSlots -= descs.length;
    this.slotsOf.set(id, descs.length);
    // The rest of the chain is written first: the head's flags publish it (sequentially consistent).
    Atomics.store(this.ringU16, (first * Desc.SIZE + PackedDesc.FLAGS) / 2, headFlags);
  }

  /** Writes ring entry `i` as given, flags and all (wrap bits included). */
  writeDescriptor(i: number, d: PackedDescriptor & { id: number }): void {
    const at = i * Desc.SIZE;
    this.ring.setBigUint64(at + Desc.ADDR, d.addr, true);
    this.ring.setUint32(at + Desc.LEN, d.len, true);
    this.ring.setUint16(at + PackedDesc.ID, d.id, true);
    Atomics.store(this.ringU16, (at + PackedDesc.FLAGS) / 2, d.flags);
  }

  /** Moves the driver's position and wrap counter anywhere (a hostile driver's lie). */
  setAvailPosition(index: number, wrap: boolean): void {
    this.nextAvail = index % this.size;
    this.availWrap = wrap;
  }

  /** { vqn, next_off, next_wrap }: the driver's position and wrap counter. */
  protected notificationData(): number {
    return ((this.availPosition << 16) | this.index) >>> 0;
  }

  /** The device's event suppression: DISABLE, ENABLE, or DESC for the descriptor at its off_wrap (EVENT_IDX). */
  protected notifyWanted(): boolean {
    const now = this.lap(this.nextAvail, this.availWrap);
    const old = this.checkedAt;
    this.checkedAt = now;
    const flags = Atomics.load(this.deviceEvent, EventSuppress.FLAGS / 2) & 3;
    if (flags === EventSuppress.DISABLE) return false;
    if (flags !== EventSuppress.DESC || !this.eventIdx) return true;
    const offWrap = Atomics.load(this.deviceEvent, EventSuppress.OFF_WRAP / 2);
    const event = this.lap(offWrap & ~EventSuppress.WRAP, (offWrap & EventSuppress.WRAP) !== 0);
    const span = 2 * this.size;
    return (event - old + span) % span < (now - old + span) % span;
  }

  /** DISABLE, or ENABLE (DESC at the next used entry with EVENT_IDX). */
  setInterrupts(enabled: boolean): void {
    if (!enabled) Atomics.store(this.driverEvent, EventSuppress.FLAGS / 2, EventSuppress.DISABLE);
    else if (this.eventIdx) this.askForNext();
    else Atomics.store(this.driverEvent, EventSuppress.FLAGS / 2, EventSuppress.ENABLE);
  }

  /** Used entries collected so far (reading it collects). */
  get usedIndex(): number {
    this.collect();
    return this.usedCount & 0xffff;
  }

  collect(): void {
    for (let n = 0; n < this.size; n++) {
      const at = this.lastUsed * Desc.SIZE;
      const flags = Atomics.load(this.ringU16, (at + PackedDesc.FLAGS) / 2);
      if (!this.isUsed(flags)) break;
      const id = this.ring.getUint16(at + PackedDesc.ID, true);
      const written = flags & Desc.F_WRITE ? this.ring.getUint32(at + Desc.LEN, true) : 0;
      const slots = this.slotsOf.get(id);
      if (slots === undefined) throw new Error(`queue ${this.index}: the device used buffer id ${id}, which is not in flight`);
      this.slotsOf.delete(id);
      this.freeSlots += slots;
      this.lastUsed += slots;
      if (this.lastUsed >= this.size) {
        this.lastUsed -= this.size;
        this.usedWrap = !this.usedWrap;
      }
      this.usedCount++;
      if (this.resolve(id, written)) this.freeIds.push(id);
    }
    // With EVENT_IDX, ask to be interrupted for the next entry (unless interrupts are off).
    if (!this.eventIdx || Atomics.load(this.driverEvent, EventSuppress.FLAGS / 2) === EventSuppress.DISABLE) return;
    this.askForNext();
    // One the device used before that store saw the old event and sent no interrupt: look again.
    if (this.isUsed(Atomics.load(this.ringU16, (this.lastUsed * Desc.SIZE + PackedDesc.FLAGS) / 2))) setImmediate(() => this.collect());
  }

  /** Whether descriptor flags mark the entry at `lastUsed` used in this lap. */
  private isUsed(flags: number): boolean {
    return ((flags & PackedDesc.F_USED) !== 0) === this.usedWrap && ((flags & PackedDesc.F_AVAIL) !== 0) === this.usedWrap;
  }

  private askForNext(): void {
    Atomics.store(this.driverEvent, EventSuppress.OFF_WRAP / 2, this.lastUsed | (this.usedWrap ? EventSuppress.WRAP : 0));
    Atomics.store(this.driverEvent, EventSuppress.FLAGS / 2, EventSuppress.DESC);
  }

  /** A position counting laps (0 to 2 * size - 1): the index, plus size in the laps whose wrap counter is 0. */
  private lap(index: number, wrap: boolean): number {
    return (index + (wrap ? 0 : this.size)) % (2 * this.size);
  }
}

/** Writes an indirect table in packed form (§2.8.8): WRITE is the only flag that counts, the id is reserved. */
export function writePackedTable(view: DataView, descs: readonly PackedDescriptor[]): void {
  descs.forEach((d, i) => {
    view.setBigUint64(i * Desc.SIZE + Desc.ADDR, d.addr, true);
    view.setUint32(i * Desc.SIZE + Desc.LEN, d.len, true);
    view.setUint16(i * Desc.SIZE + PackedDesc.ID, 0, true);
    view.setUint16(i * Desc.SIZE + PackedDesc.FLAGS, d.flags, true);
  });
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
