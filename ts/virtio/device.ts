/**
 * `VirtioDevice`: a virtio 1.2 device over PCI (modern transport only,
 * §4.1), built on the PCI model. The kit emulates the transport (the
 * vendor-specific capabilities, the common configuration, ISR, notifications,
 * MSI-X vectors and INTx), the status machine, feature negotiation, the
 * split and packed virtqueues and migration of their state; device code declares its
 * type, features, queues and configuration and serves chains in `onQueue`.
 *
 * BAR4 (64-bit, handlers) holds the structures; BAR1 (plain memory) the
 * MSI-X table and PBA, as QEMU lays out its virtio-pci devices:
 *
 *   BAR4 +0x0000 common configuration     +0x2000 device-specific configuration
 *        +0x1000 ISR status               +0x3000 notifications, 4 bytes per queue
 *
 * Notifications come trapped, through ioeventfds or stored to a mapped page
 * (`notify`, notify.ts), all through one DoorbellSource.
 */
import { UsageError } from '../errors.js';
import { PciDevice, pciFunction } from '../pci/device.js';
import type { Capability, PciMigration } from '../pci/description.js';
import { checkQueueState, Virtqueue, type QueueHost, type QueueState } from './queue.js';
import { VirtqueueError } from './chain.js';
import { NOTIFY_MODES, NOTIFY_MULTIPLIER, Notifications, notifyBarParts, type VirtioNotifyMode } from './notify.js';
import { QueueTrace } from './trace.js';
import {
  Cap, CapType, Common, Feature, featureBit, Isr, MAX_QUEUE_SIZE, NO_VECTOR, Status,
  VIRTIO_PCI_DEVICE_BASE, VIRTIO_PCI_VENDOR,
} from './spec.js';

export interface VirtioQueueDescription {
  /** The largest size the driver may choose: a power of two up to 32768. */
  size: number;
  /**
   * Device code keeps this queue's chains until something happens (receive
   * buffers waiting for input): stopping for migration does not wait for
   * them, and the destination gets them back from `pop()` first.
   */
  holds?: boolean;
}

export interface VirtioDeviceDescription {
  /** The virtio device ID (§5): 1 network, 2 block, 3 console, 4 entropy, ... */
  deviceId: number;
  /** Device-type feature bits offered (bits 0-23 and any reserved ones the device implements). */
  features?: bigint;
  queues: VirtioQueueDescription[];
  /** The device-specific configuration layout (§5), as the guest first sees it. */
  config?: Uint8Array;
  /** A guest write to the device-specific configuration (after nothing is stored: device code decides). */
  configWrite?(offset: number, data: Buffer): void;
  /** The driver notified `queue` (or the kit came back for more): take its chains with `queue.pop()`. */
  onQueue(queue: Virtqueue): void;
  /** The driver set DRIVER_OK: the device is live. */
  onReady?(): void;
  /** After a virtio reset (status 0, or a PCI reset): drop device state. */
  onReset?(): void;
  /** PCI class code (default: 0xff0000, "other"). */
  classCode?: number;
  /**
   * How notifications reach the device (notify.ts): 'trap' (default: what
   * QEMU does best, as measured under TCG), 'mmap' (a page the VMM maps, so
   * the guest notifies with a plain store and the device watches it),
   * 'ioeventfd' (an ioeventfd per queue, for a VMM that wires them),
   * 'avail' (trapped writes, and each queue's available index watched in
   * guest memory, for a driver that never notifies, as SPDK's; split rings
   * only: RING_PACKED is not offered).
   */
  notify?: VirtioNotifyMode;
  /** Device code's own state for migration, beside what the kit saves. */
  migration?: Pick<PciMigration, 'saveState' | 'loadState'>;
}

/** Features the kit implements for every device. */
export const KIT_FEATURES = featureBit(Feature.VERSION_1) | featureBit(Feature.RING_EVENT_IDX) | featureBit(Feature.RING_INDIRECT_DESC) | featureBit(Feature.RING_PACKED)
  | featureBit(Feature.RING_RESET) | featureBit(Feature.NOTIFICATION_DATA);

export const VIRTIO_BAR = 4;
export const MSIX_BAR = 1;
export const Layout = { COMMON: 0x0000, ISR: 0x1000, DEVICE: 0x2000, NOTIFY: 0x3000, BAR_SIZE: 0x4000, MSIX_PBA: 0x800 } as const;
/** Config-space homes of the capabilities (the PCI cfg one has its data at +16). */
const CapAt = { COMMON: 0x40, NOTIFY: 0x50, ISR: 0x64, DEVICE: 0x74, PCI: 0x84, MSIX: 0x98 } as const;
const MAX_QUEUES = Layout.MSIX_PBA / 16 - 1;
const STATE_VERSION = 2;

export class VirtioDevice extends PciDevice {
  readonly queues: readonly Virtqueue[];
  /** Feature bits offered: the device's and the kit's. */
  readonly offered: bigint;
  /** The device-specific configuration; change it with `updateConfig`. */
  readonly deviceConfig: Buffer;
  /** Why the device set NEEDS_RESET (undefined when it has not). */
  needsReset: Error | undefined;
  private status = 0;
  private driverFeatures = 0n;
  private deviceFeatureSelect = 0;
  private driverFeatureSelect = 0;
  private configVector = NO_VECTOR;
  private queueSelect = 0;
  private isr = 0;
  private generation = 0;
  private readonly virtio: VirtioDeviceDescription;
  private readonly notifications: Notifications;
  /** Per-queue timings under DEBUG=vfio-user:virtio (trace.ts). */
  private readonly trace: QueueTrace | undefined;

  constructor(description: VirtioDeviceDescription) {
    const queues = checkDescription(description);
    const config = Buffer.from(description.config ?? new Uint8Array(0));
    const capability = (type: number, offset: number, length: number, at: number, extra?: number): Capability => {
      const data = Buffer.alloc((extra === undefined ? Cap.SIZE : Cap.EXTENDED_SIZE) - 3);
      data[Cap.CFG_TYPE - 3] = type;
      data[Cap.BAR - 3] = VIRTIO_BAR;
      data.writeUInt32LE(offset, Cap.OFFSET - 3);
      data.writeUInt32LE(length, Cap.LENGTH - 3);
      if (extra !== undefined) data.writeUInt32LE(extra, Cap.EXTRA - 3);
      return { kind: 'vendor', at, data };
    };
    // VIRTIO_PCI_CAP_PCI_CFG: bar, offset and length are the driver's; its data window reaches the BAR.
    const pciWindow = Buffer.alloc(Cap.EXTENDED_SIZE - 3);
    pciWindow[Cap.CFG_TYPE - 3] = CapType.PCI;
    const pciWritable = Buffer.alloc(pciWindow.length);
    pciWritable[Cap.BAR - 3] = 0xff;
    pciWritable.fill(0xff, Cap.OFFSET - 3);
    const notifyLength = queues * NOTIFY_MULTIPLIER;
    const notify = description.notify ?? 'trap';
    super({
      vendorId: VIRTIO_PCI_VENDOR,
      deviceId: VIRTIO_PCI_DEVICE_BASE + description.deviceId,
      subsystemVendorId: VIRTIO_PCI_VENDOR,
      subsystemId: VIRTIO_PCI_DEVICE_BASE + description.deviceId,
      revision: 1,
      classCode: description.classCode ?? 0xff0000,
      intx: 'A',
      bars: {
        [MSIX_BAR]: { kind: 'memory', size: 4096 },
        [VIRTIO_BAR]: {
          kind: 'memory', size: Layout.BAR_SIZE, width: 64,
          read: (offset, size) => this.readBar(offset, size),
          write: (offset, data) => this.writeBar(offset, data),
          ...notifyBarParts(notify, Layout.NOTIFY, queues),
        },
      },
      capabilities: [
        capability(CapType.COMMON, Layout.COMMON, Common.SIZE, CapAt.COMMON),
        capability(CapType.NOTIFY, Layout.NOTIFY, notifyLength, CapAt.NOTIFY, NOTIFY_MULTIPLIER),
        capability(CapType.ISR, Layout.ISR, 1, CapAt.ISR),
        ...(config.length > 0 ? [capability(CapType.DEVICE, Layout.DEVICE, config.length, CapAt.DEVICE)] : []),
        {
          kind: 'vendor', at: CapAt.PCI, data: pciWindow, writable: pciWritable,
          read: (offset, size) => this.readPciWindow(offset, size),
          write: (offset, data) => this.writePciWindow(offset, data),
        },
        { kind: 'msix', at: CapAt.MSIX, vectors: queues + 1, table: { bar: MSIX_BAR, offset: 0 }, pba: { bar: MSIX_BAR, offset: Layout.MSIX_PBA } },
      ],
      onReset: () => this.resetVirtio(),
      migration: {
        saveState: () => this.saveState(),
        loadState: (data) => this.loadState(data),
        // Requests in flight finish first: the saved rings then hold every completion. A broken
        // device's requests complete into nothing, so there is nothing to wait for.
        stop: async () => {
          if (!this.needsReset) await Promise.all(this.queues.filter((q) => !q.holds).map((q) => q.idle()));
        },
        // Interrupts are released after this hook: take what the driver made available meanwhile
        // then, once guest memory is mapped (otherwise the driver's next notification does it).
        start: () => void setImmediate(() => {
          if (this.attached && this.dma.count > 0) this.kickAll();
        }),
      },
    });
    this.virtio = description;
    this.deviceConfig = config;
    // 'avail' watches a split ring's available index; a packed ring has none, so a driver that never
    // notifies could not be served on one: that mode offers split rings only.
    const kit = description.notify === 'avail' ? KIT_FEATURES & ~featureBit(Feature.RING_PACKED) : KIT_FEATURES;
    this.offered = (description.features ?? 0n) | kit;
    const host: QueueHost = {
      get memory() {
        return device.dma;
      },
      get features() {
        return device.driverFeatures;
      },
      get running() {
        return device.running;
      },
      process: (queue) => description.onQueue.call(this, queue),
      interrupt: (queue) => {
        // The driver answers completions with new requests.
        this.notifications.expect();
        this.trace?.interrupted(queue.index);
        this.interrupt(queue.vector, Isr.QUEUE);
      },
      fail: (error) => this.fail(error),
    };
    const device = this;
    this.queues = description.queues.map((q, i) => new Virtqueue(i, q.size, host, q.holds === true));
    this.trace = QueueTrace.fromEnvironment(queues);
    this.notifications = new Notifications(notify, this.bar(VIRTIO_BAR), Layout.NOTIFY, queues, this.context, (q, value, seenAt) => this.notified(q, value, seenAt));
  }

  /** How notifications reach the device. */
  get notifyMode(): VirtioNotifyMode {
    return this.notifications.mode;
  }

  /** Stops watching notifications too. */
  override close(): void {
    this.notifications.close();
    super.close();
  }

  /** The device status byte (§2.1). */
  get deviceStatus(): number {
    return this.status;
  }

  /** The features the driver accepted (valid once FEATURES_OK is set). */
  get features(): bigint {
    return this.driverFeatures;
  }

  negotiated(bit: number): boolean {
    return (this.driverFeatures & featureBit(bit)) !== 0n;
  }

  /** The device may process its queues: DRIVER_OK, no NEEDS_RESET, not stopped for migration. */
  get running(): boolean {
    return (this.status & (Status.DRIVER_OK | Status.NEEDS_RESET | Status.FAILED)) === Status.DRIVER_OK && !this.stopped;
  }

  /**
   * Changes the device-specific configuration: `change` edits the bytes, then
   * the generation moves on and the driver gets a configuration interrupt.
   */
  updateConfig(change: (config: Buffer) => void): void {
    change(this.deviceConfig);
    this.generation = (this.generation + 1) & 0xff;
    if (this.status & Status.DRIVER_OK) this.interrupt(this.configVector, Isr.CONFIG);
  }

  /**
   * Sets NEEDS_RESET (§2.1.2) and tells the driver with a configuration
   * interrupt: the queues stop until the driver resets the device.
   */
  fail(error: unknown): void {
    if (this.status & Status.NEEDS_RESET) return;
    this.needsReset = error instanceof Error ? error : new Error(String(error));
    this.status |= Status.NEEDS_RESET;
    if (this.status & Status.DRIVER_OK) this.interrupt(this.configVector, Isr.CONFIG);
  }

  // ---- interrupts ----

  /** MSI-X to `vector` when the guest enabled it, else INTx with the ISR bit. */
  private interrupt(vector: number, isr: number): void {
    if (this.irq.mode === 'msix') {
      if (vector !== NO_VECTOR) this.irq.raise(vector);
      return;
    }
    this.isr |= isr;
    this.irq.raise(0);
  }

  // ---- BAR4 ----

  private readBar(offset: number, size: number): Uint8Array {
    const out = Buffer.alloc(size);
    if (offset < Layout.ISR) {
      const common = this.commonBytes();
      if (offset < common.length) common.copy(out, 0, offset, Math.min(common.length, offset + size));
    } else if (offset === Layout.ISR) {
      // Reading ISR acknowledges it (§4.1.4.5): INTx drops.
      out[0] = this.isr;
      this.isr = 0;
      this.irq.lower();
    } else if (offset >= Layout.DEVICE && offset < Layout.NOTIFY) {
      const at = offset - Layout.DEVICE;
      if (at < this.deviceConfig.length) this.deviceConfig.copy(out, 0, at, Math.min(this.deviceConfig.length, at + size));
    }
    return out;
  }

  private writeBar(offset: number, data: Buffer): void {
    if (offset < Layout.ISR) return this.writeCommon(offset, data);
    if (offset >= Layout.DEVICE && offset < Layout.NOTIFY) {
      const at = offset - Layout.DEVICE;
      if (at < this.deviceConfig.length) this.virtio.configWrite?.(at, data.subarray(0, this.deviceConfig.length - at));
      return;
    }
    if (offset >= Layout.NOTIFY) {
      // A trapped notification (no mapped page, no ioeventfd): the queue is the slot's.
      const q = Math.floor((offset - Layout.NOTIFY) / NOTIFY_MULTIPLIER);
      if (q < this.queues.length) this.notifications.write(q, data.readUIntLE(0, Math.min(4, data.length)));
    }
  }

  /**
   * Queue `q`'s slot was written (`value`) or kicked (undefined). With
   * NOTIFICATION_DATA the value is le32 { vqn: 16, next_off: 15, next_wrap: 1 }
   * (§4.1.5.2): where the driver's ring stands, split or packed alike. The
   * device reads the ring itself, so it only checks that the notification
   * names this slot's queue: one naming another is a broken driver.
   */
  private notified(q: number, value: number | undefined, seenAt: number): void {
    this.trace?.notified(q, seenAt);
    if (value !== undefined && this.negotiated(Feature.NOTIFICATION_DATA) && (value & 0xffff) !== q) {
      return this.fail(new VirtqueueError(q, `notification data 0x${value.toString(16)} names queue ${value & 0xffff} at queue ${q}'s address`));
    }
    this.queues[q].kick();
  }

  /** Follows queue `q` being enabled or reset: only enabled queues' slots are watched. */
  private trackNotify(q: Virtqueue): void {
    if (!q.enabled) return this.notifications.disable(q.index);
    try {
      this.notifications.enable(q.index, this.notifications.mode === 'avail' ? { dma: this.dma, driver: q.driver } : undefined);
    } catch (error) {
      // 'avail': a ring the device cannot watch is one it cannot serve.
      this.fail(error);
    }
  }

  // ---- common configuration ----

  private get selected(): Virtqueue | undefined {
    return this.queues[this.queueSelect];
  }

  private commonBytes(): Buffer {
    const b = Buffer.alloc(Common.SIZE);
    const word = (features: bigint, select: number) => (select < 2 ? Number((features >> BigInt(32 * select)) & 0xffffffffn) : 0);
    b.writeUInt32LE(this.deviceFeatureSelect, Common.DEVICE_FEATURE_SELECT);
    b.writeUInt32LE(word(this.offered, this.deviceFeatureSelect), Common.DEVICE_FEATURE);
    b.writeUInt32LE(this.driverFeatureSelect, Common.DRIVER_FEATURE_SELECT);
    b.writeUInt32LE(word(this.driverFeatures, this.driverFeatureSelect), Common.DRIVER_FEATURE);
    b.writeUInt16LE(this.configVector, Common.CONFIG_MSIX_VECTOR);
    b.writeUInt16LE(this.queues.length, Common.NUM_QUEUES);
    b[Common.DEVICE_STATUS] = this.status;
    b[Common.CONFIG_GENERATION] = this.generation;
    b.writeUInt16LE(this.queueSelect, Common.QUEUE_SELECT);
    const q = this.selected;
    if (q) {
      b.writeUInt16LE(q.size, Common.QUEUE_SIZE);
      b.writeUInt16LE(q.vector, Common.QUEUE_MSIX_VECTOR);
      b.writeUInt16LE(q.enabled ? 1 : 0, Common.QUEUE_ENABLE);
      b.writeUInt16LE(q.index, Common.QUEUE_NOTIFY_OFF);
      b.writeBigUInt64LE(q.desc, Common.QUEUE_DESC);
      b.writeBigUInt64LE(q.driver, Common.QUEUE_DRIVER);
      b.writeBigUInt64LE(q.device, Common.QUEUE_DEVICE);
      b.writeUInt16LE(q.index, Common.QUEUE_NOTIFY_DATA);
      b.writeUInt16LE(q.resetDone ? 1 : 0, Common.QUEUE_RESET);
    }
    return b;
  }

  /**
   * Any width at any offset: the write is laid over the current registers
   * and every field it touches takes its new value, in offset order.
   */
  private writeCommon(offset: number, data: Buffer): void {
    if (offset >= Common.SIZE) return;
    const after = this.commonBytes();
    data.copy(after, offset, 0, Common.SIZE - offset);
    const end = Math.min(Common.SIZE, offset + data.length);
    for (const [at, width] of COMMON_FIELDS) {
      if (at + width <= offset || at >= end) continue;
      this.setCommon(at, width === 8 ? after.readBigUInt64LE(at) : after.readUIntLE(at, width));
    }
  }

  private setCommon(at: number, value: number | bigint): void {
    const n = Number(value);
    const q = this.selected;
    const configurable = q && !q.enabled;
    switch (at) {
      case Common.DEVICE_FEATURE_SELECT: this.deviceFeatureSelect = n; break;
      case Common.DRIVER_FEATURE_SELECT: this.driverFeatureSelect = n; break;
      case Common.DRIVER_FEATURE:
        // Features are fixed once FEATURES_OK is set; only words 0 and 1 exist.
        if (this.status & Status.FEATURES_OK || this.driverFeatureSelect > 1) break;
        {
          const shift = BigInt(32 * this.driverFeatureSelect);
          this.driverFeatures = (this.driverFeatures & ~(0xffffffffn << shift)) | (BigInt(n) << shift);
        }
        break;
      case Common.CONFIG_MSIX_VECTOR: this.configVector = this.vectorOrNone(n); break;
      case Common.DEVICE_STATUS: this.setStatus(n); break;
      case Common.QUEUE_SELECT: this.queueSelect = n; break;
      case Common.QUEUE_SIZE: if (configurable) q.size = n; break;
      case Common.QUEUE_MSIX_VECTOR: if (q) q.vector = this.vectorOrNone(n); break;
      case Common.QUEUE_ENABLE:
        if (configurable && n === 1) {
          q.enable();
          this.trackNotify(q);
        }
        break;
      case Common.QUEUE_DESC: if (configurable) q.desc = BigInt(value); break;
      case Common.QUEUE_DRIVER: if (configurable) q.driver = BigInt(value); break;
      case Common.QUEUE_DEVICE: if (configurable) q.device = BigInt(value); break;
      case Common.QUEUE_RESET:
        if (q && n === 1 && this.negotiated(Feature.RING_RESET)) {
          q.reset();
          q.resetDone = true;
          this.trackNotify(q);
        }
        break;
    }
  }

  /** A vector the table has, or NO_VECTOR: what the driver reads back tells it the mapping failed (§4.1.5.1.2). */
  private vectorOrNone(vector: number): number {
    return vector < this.queues.length + 1 ? vector : NO_VECTOR;
  }

  /**
   * The status machine (§2.1, §3.1): 0 resets; bits only get set; FEATURES_OK
   * sticks only for a feature set the device offered, with VERSION_1;
   * DRIVER_OK without FEATURES_OK is a broken driver.
   */
  private setStatus(value: number): void {
    if (value === 0) return this.resetVirtio();
    const old = this.status;
    let next = (value & ~Status.NEEDS_RESET) | (old & Status.NEEDS_RESET);
    if ((next & old) !== old) return;
    if (next & Status.FEATURES_OK && !(old & Status.FEATURES_OK) && !this.acceptable(this.driverFeatures)) next &= ~Status.FEATURES_OK;
    this.status = next;
    if (next & Status.DRIVER_OK && !(old & Status.DRIVER_OK)) {
      if (!(next & Status.FEATURES_OK)) return this.fail(new UsageError('the driver set DRIVER_OK without FEATURES_OK'));
      this.virtio.onReady?.call(this);
      this.kickAll();
    }
  }

  private acceptable(features: bigint): boolean {
    return (features & ~this.offered) === 0n && (features & featureBit(Feature.VERSION_1)) !== 0n;
  }

  private resetVirtio(): void {
    this.status = 0;
    this.driverFeatures = 0n;
    this.deviceFeatureSelect = this.driverFeatureSelect = 0;
    this.configVector = NO_VECTOR;
    this.queueSelect = 0;
    this.isr = 0;
    this.needsReset = undefined;
    this.irq.lower();
    for (const q of this.queues) {
      q.reset();
      this.trackNotify(q);
    }
    this.virtio.onReset?.call(this);
  }

  private kickAll(): void {
    for (const q of this.queues) q.kick();
  }

  // ---- VIRTIO_PCI_CAP_PCI_CFG: BAR access through config space ----

  /** The window's target when it is one the driver may use: our BAR, 1/2/4 bytes, aligned, inside. */
  private pciWindowTarget(): { offset: number; length: number } | undefined {
    const bar = pciFunction(this).config.u8(CapAt.PCI + Cap.BAR);
    const offset = pciFunction(this).config.u32(CapAt.PCI + Cap.OFFSET);
    const length = pciFunction(this).config.u32(CapAt.PCI + Cap.LENGTH);
    if (bar !== VIRTIO_BAR || ![1, 2, 4].includes(length) || offset % length !== 0 || offset + length > Layout.BAR_SIZE) return undefined;
    return { offset, length };
  }

  private readPciWindow(offset: number, size: number): Uint8Array {
    const out = Buffer.from(pciFunction(this).config.bytes.subarray(CapAt.PCI + 3 + offset, CapAt.PCI + 3 + offset + size));
    const data = Cap.EXTRA - 3;
    const target = this.pciWindowTarget();
    if (target && offset + size > data) {
      const value = Buffer.alloc(4);
      value.set(this.readBar(target.offset, target.length));
      for (let i = Math.max(offset, data); i < offset + size; i++) out[i - offset] = value[i - data];
    }
    return out;
  }

  private writePciWindow(offset: number, data: Buffer): void {
    const window = Cap.EXTRA - 3;
    const target = this.pciWindowTarget();
    if (!target || offset + data.length <= window) return;
    const bytes = pciFunction(this).config.bytes.subarray(CapAt.PCI + Cap.EXTRA, CapAt.PCI + Cap.EXTRA + target.length);
    // Through the BAR's own path, so a notification written here still reaches the queue.
    void pciFunction(this).write(VIRTIO_BAR, target.offset, Buffer.from(bytes));
  }

  // ---- migration ----

  private saveState(): Uint8Array {
    const state: SavedState = {
      version: STATE_VERSION,
      deviceId: this.virtio.deviceId,
      offered: this.offered.toString(16),
      status: this.status,
      driverFeatures: this.driverFeatures.toString(16),
      deviceFeatureSelect: this.deviceFeatureSelect,
      driverFeatureSelect: this.driverFeatureSelect,
      configVector: this.configVector,
      queueSelect: this.queueSelect,
      isr: this.isr,
      generation: this.generation,
      config: this.deviceConfig.toString('hex'),
      queues: this.queues.map((q) => {
        const s = q.save();
        return { ...s, desc: s.desc.toString(16), driver: s.driver.toString(16), device: s.device.toString(16) };
      }),
      device: this.virtio.migration?.saveState ? Buffer.from(this.virtio.migration.saveState()).toString('base64') : undefined,
    };
    return Buffer.from(JSON.stringify(state));
  }

  /** Checks everything before changing anything: a bad stream leaves the device as it was. */
  private loadState(data: Uint8Array): void {
    const fail = (why: string): never => {
      throw new UsageError(`virtio device state: ${why}`);
    };
    let state: SavedState;
    try {
      state = JSON.parse(Buffer.from(data).toString('utf8')) as SavedState;
    } catch {
      return fail('not JSON');
    }
    const u = (value: unknown, bits: number, name: string): number => {
      if (!Number.isInteger(value) || (value as number) < 0 || (value as number) >= 2 ** bits) fail(`${name} is not a ${bits}-bit unsigned integer`);
      return value as number;
    };
    const hex = (value: unknown, name: string): bigint => {
      if (typeof value !== 'string' || !/^[0-9a-f]{1,16}$/.test(value)) fail(`${name} is not a 64-bit hex number`);
      return BigInt(`0x${value as string}`);
    };
    if (typeof state !== 'object' || state === null || state.version !== STATE_VERSION) fail(`version ${String(state?.version)} is not ${STATE_VERSION}`);
    if (state.deviceId !== this.virtio.deviceId) fail(`the source is device type ${String(state.deviceId)}, this one ${this.virtio.deviceId}`);
    if (hex(state.offered, 'offered') !== this.offered) fail(`the source offered features 0x${state.offered}, this device 0x${this.offered.toString(16)}`);
    const status = u(state.status, 8, 'status');
    const driverFeatures = hex(state.driverFeatures, 'driverFeatures');
    if (status & Status.FEATURES_OK && !this.acceptable(driverFeatures)) fail(`negotiated features 0x${state.driverFeatures} are not a set this device accepts`);
    const vectors = this.queues.length + 1;
    const configVector = u(state.configVector, 16, 'configVector');
    if (configVector !== NO_VECTOR && configVector >= vectors) fail(`config vector ${configVector} is past the ${vectors} MSI-X vectors`);
    if (typeof state.config !== 'string' || state.config.length !== this.deviceConfig.length * 2 || !/^[0-9a-f]*$/.test(state.config)) fail('the device configuration has another size');
    if (!Array.isArray(state.queues) || state.queues.length !== this.queues.length) fail(`the source has ${state.queues?.length} queues, this device ${this.queues.length}`);
    const queues: QueueState[] = state.queues.map((s, i) => {
      const q: QueueState = {
        size: u(s.size, 16, `queue ${i} size`), vector: u(s.vector, 16, `queue ${i} vector`), enabled: s.enabled === true,
        desc: hex(s.desc, `queue ${i} desc`), driver: hex(s.driver, `queue ${i} driver`), device: hex(s.device, `queue ${i} device`),
        lastAvail: u(s.lastAvail, 16, `queue ${i} lastAvail`), usedIdx: u(s.usedIdx, 16, `queue ${i} usedIdx`),
        held: Array.isArray(s.held) ? s.held : fail(`queue ${i} has no held list`),
      };
      const problem = checkQueueState(q, this.queues[i].maxSize, vectors, this.queues[i].holds, (driverFeatures & featureBit(Feature.RING_PACKED)) !== 0n);
      if (problem) fail(`queue ${i}: ${problem}`);
      return q;
    });
    if (state.device !== undefined && typeof state.device !== 'string') fail('the device section is not base64');
    const own = state.device === undefined ? undefined : Buffer.from(state.device, 'base64');
    if ((own !== undefined) !== (this.virtio.migration?.loadState !== undefined)) fail('the device section does not match this device');
    if (own) this.virtio.migration!.loadState!(own);
    this.status = status;
    this.driverFeatures = driverFeatures;
    this.deviceFeatureSelect = u(state.deviceFeatureSelect, 32, 'deviceFeatureSelect');
    this.driverFeatureSelect = u(state.driverFeatureSelect, 32, 'driverFeatureSelect');
    this.configVector = configVector;
    this.queueSelect = u(state.queueSelect, 16, 'queueSelect');
    this.isr = u(state.isr, 8, 'isr') & (Isr.QUEUE | Isr.CONFIG);
    this.generation = u(state.generation, 8, 'generation');
    this.deviceConfig.set(Buffer.from(state.config, 'hex'));
    queues.forEach((q, i) => {
      this.queues[i].load(q);
      this.trackNotify(this.queues[i]);
    });
  }
}

/** The common configuration's fields as [offset, width], in offset order. */
const COMMON_FIELDS: readonly (readonly [number, 1 | 2 | 4 | 8])[] = [
  [Common.DEVICE_FEATURE_SELECT, 4], [Common.DEVICE_FEATURE, 4], [Common.DRIVER_FEATURE_SELECT, 4], [Common.DRIVER_FEATURE, 4],
  [Common.CONFIG_MSIX_VECTOR, 2], [Common.NUM_QUEUES, 2], [Common.DEVICE_STATUS, 1], [Common.CONFIG_GENERATION, 1],
  [Common.QUEUE_SELECT, 2], [Common.QUEUE_SIZE, 2], [Common.QUEUE_MSIX_VECTOR, 2], [Common.QUEUE_ENABLE, 2],
  [Common.QUEUE_NOTIFY_OFF, 2], [Common.QUEUE_DESC, 8], [Common.QUEUE_DRIVER, 8], [Common.QUEUE_DEVICE, 8],
  [Common.QUEUE_NOTIFY_DATA, 2], [Common.QUEUE_RESET, 2],
];

interface SavedState {
  version: number;
  deviceId: number;
  offered: string;
  status: number;
  driverFeatures: string;
  deviceFeatureSelect: number;
  driverFeatureSelect: number;
  configVector: number;
  queueSelect: number;
  isr: number;
  generation: number;
  config: string;
  queues: (Omit<QueueState, 'desc' | 'driver' | 'device'> & { desc: string; driver: string; device: string })[];
  device?: string;
}

/** Checks what PciDevice does not: the virtio parts. Returns the queue count. */
function checkDescription(d: VirtioDeviceDescription): number {
  if (!Number.isInteger(d.deviceId) || d.deviceId < 1 || d.deviceId > 63) throw new UsageError(`deviceId ${d.deviceId} is not a virtio device ID (1-63)`);
  if (d.features !== undefined && (typeof d.features !== 'bigint' || d.features < 0n || d.features >= 1n << 64n)) throw new UsageError('features must be a 64-bit bigint mask');
  if (!Array.isArray(d.queues) || d.queues.length === 0 || d.queues.length > MAX_QUEUES) throw new UsageError(`queues: 1 to ${MAX_QUEUES} queues`);
  d.queues.forEach((q, i) => {
    if (!Number.isInteger(q.size) || q.size < 1 || q.size > MAX_QUEUE_SIZE || (q.size & (q.size - 1)) !== 0) {
      throw new UsageError(`queues[${i}].size ${q.size} is not a power of two from 1 to ${MAX_QUEUE_SIZE}`);
    }
  });
  if (d.config !== undefined && (!(d.config instanceof Uint8Array) || d.config.length > Layout.NOTIFY - Layout.DEVICE)) throw new UsageError('config must be a Uint8Array of at most 4096 bytes');
  if (typeof d.onQueue !== 'function') throw new UsageError('onQueue must be a function');
  if (d.notify !== undefined && !NOTIFY_MODES.includes(d.notify)) throw new UsageError(`notify '${String(d.notify)}' is not one of ${NOTIFY_MODES.join(', ')}`);
  return d.queues.length;
}
