/**
 * A queue card in the NVMe doorbell pattern: the guest writes queue tails
 * into a BAR page it maps directly (no exit per doorbell), then kicks the
 * queue through an ioeventfd (no trip through the VMM); the device reads the
 * tails from the same memory as a typed array. Everything else in the BAR
 * stays trapped. BAR0, 16 KiB, 64-bit, shared, only page 1 mappable:
 *
 *   0x0000 registers, trapped (dwords):
 *     +0x00 ID         RO  0x51444231 ("QDB1")
 *     +0x04 QUEUES     RO  4
 *     +0x08 COMPLETED  RO  entries consumed since reset, all queues
 *     +0x0C NOTIFY     WO  writing q (0-3) kicks queue q: one ioeventfd per queue (datamatch q)
 *   0x1000 doorbells, mappable: queue q's tail (u32) at 0x1000 + 4q
 *   0x2000 MSI-X table (4 vectors), 0x3000 PBA: trapped, emulated by the library
 *
 * A kicked queue consumes the entries up to its tail and raises MSI-X vector
 * q (or MSI, or INTA). The kick is what makes the device look: nothing
 * signals a store to mapped memory, so the doorbell values alone are read
 * only when kicked, as with virtio's notify register. Each kick wakes the
 * device through its ioeventfd's 'signal' event on the event loop: an idle
 * card costs nothing (while it is stopped for migration the library holds
 * the events back, and kicks stay in the eventfds).
 *
 * IDs as in msix-device.ts: Red Hat's QEMU vendor ID with an unused device ID.
 */
import { PciDevice } from 'vfio-user';

export const QUEUE_REGISTERS = {
  ID: 0x00,
  QUEUES: 0x04,
  COMPLETED: 0x08,
  NOTIFY: 0x0c,
} as const;

export const QUEUE_CARD_ID = 0x51444231;
export const QUEUES = 4;
export const BAR_SIZE = 0x4000;
export const DOORBELL_PAGE = 0x1000;
export const MSIX_TABLE = 0x2000;
export const MSIX_PBA = 0x3000;

const REGISTER_BYTES = 0x10;

export class QueueCard extends PciDevice {
  private readonly heads = new Uint32Array(QUEUES);
  private completed = 0;

  constructor() {
    super({
      vendorId: 0x1b36,
      deviceId: 0x10f1,
      subsystemVendorId: 0x1b36,
      subsystemId: 0x0001,
      // Base class 0xff, not NVMe's 0x010802: no stock driver may bind to it.
      classCode: 0xff0000,
      intx: 'A',
      bars: {
        0: {
          kind: 'memory',
          size: BAR_SIZE,
          width: 64,
          shared: true,
          mmap: [{ offset: DOORBELL_PAGE, size: 0x1000 }],
          read: (offset, size) => this.readRegisters(offset, size),
          ioeventfds: Array.from({ length: QUEUES }, (_, q) => ({ offset: QUEUE_REGISTERS.NOTIFY, size: 4 as const, datamatch: q })),
        },
      },
      capabilities: [
        { kind: 'pm' },
        { kind: 'msix', vectors: QUEUES, table: { bar: 0, offset: MSIX_TABLE }, pba: { bar: 0, offset: MSIX_PBA } },
        { kind: 'pcie', type: 'endpoint' },
      ],
      // The library zeroes the BAR (doorbells included); kicks from before the reset are void.
      onReset: () => {
        this.heads.fill(0);
        this.completed = 0;
        for (const kick of this.bar(0).ioeventfds) kick.take();
      },
      // Doorbells, the MSI-X table and un-taken kicks are the library's; the
      // queue heads and the counter travel in saveState.
      migration: {
        saveState: () => {
          const state = Buffer.alloc(1 + 4 * (QUEUES + 1));
          state[0] = 1;
          this.heads.forEach((head, q) => state.writeUInt32LE(head, 1 + 4 * q));
          state.writeUInt32LE(this.completed, 1 + 4 * QUEUES);
          return state;
        },
        loadState: (data) => {
          if (data.length !== 1 + 4 * (QUEUES + 1) || data[0] !== 1) throw new Error(`not version-1 queue card state (${data.length} bytes)`);
          const state = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
          this.heads.forEach((_, q) => (this.heads[q] = state.readUInt32LE(1 + 4 * q)));
          this.completed = state.readUInt32LE(1 + 4 * QUEUES);
        },
      },
    });
    this.bar(0).ioeventfds.forEach((kick, q) => kick.on('signal', () => this.consume(q)));
  }

  /** Entries consumed since reset. */
  get entries(): number {
    return this.completed;
  }

  private consume(q: number): void {
    const bytes = this.bar(0).bytes!;
    const tail = new DataView(bytes.buffer, bytes.byteOffset).getUint32(DOORBELL_PAGE + 4 * q, true);
    this.completed = (this.completed + ((tail - this.heads[q]) >>> 0)) >>> 0;
    this.heads[q] = tail;
    this.irq.raise(q);
  }

  private readRegisters(offset: number, size: number): Uint8Array {
    const regs = Buffer.alloc(REGISTER_BYTES);
    regs.writeUInt32LE(QUEUE_CARD_ID, QUEUE_REGISTERS.ID);
    regs.writeUInt32LE(QUEUES, QUEUE_REGISTERS.QUEUES);
    regs.writeUInt32LE(this.completed, QUEUE_REGISTERS.COMPLETED);
    const out = Buffer.alloc(size);
    regs.copy(out, 0, Math.min(offset, REGISTER_BYTES), Math.min(offset + size, REGISTER_BYTES));
    return out;
  }
}

/** `vfio-user serve` loads the default export. */
export default function createDevice(): QueueCard {
  return new QueueCard();
}
