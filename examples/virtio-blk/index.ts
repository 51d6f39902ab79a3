/**
 * A virtio block device (virtio-blk, type 2) backed by a raw image file, with
 * multiple queues, flush, discard, write-zeroes, read-only mode and a serial
 * ID. Linux's virtio_blk driver binds it as /dev/vdX.
 *
 *   vfio-user serve examples/virtio-blk --socket /tmp/blk.sock -- --image disk.img
 *       [--queues N] [--read-only] [--serial ID] [--notify mmap|trap|ioeventfd|avail]
 *
 * Served, it offers 4 request queues unless told (`--queues`): Linux takes one
 * per vCPU up to that, each with its own interrupt, so a request completes on
 * the CPU that made it (one queue sent every completion through another
 * vCPU, halving QD1 in a 2-vCPU TCG guest). QEMU's own virtio-blk-pci offers
 * one per vCPU.
 *
 * Notifications default to the mapped notify page (`mmap`), as the NVMe
 * example's doorbells do: a data path watched in memory, no message per
 * request (docs/virtio.md).
 *
 * The image is read and written through the library's asynchronous block I/O
 * (`BlockDevice`): straight between the file and guest memory, no copy.
 *
 * Requests (§5.2.6) are parsed by byte offset, never by descriptor layout: a
 * 16-byte header the device reads, data, and a status byte the device
 * writes last. A chain too short for the header or the status byte breaks
 * the device (NEEDS_RESET); a bad sector range, a misaligned length or a
 * write to a read-only disk fails just that request (IOERR); an unknown type
 * is UNSUPP.
 */
import { parseArgs } from 'node:util';
import { BlockDevice, featureBit, UsageError, VirtioDevice, VirtioDeviceType, VirtqueueError, type DescriptorChain, type SgList, type VirtioNotifyMode, type Virtqueue } from 'vfio-user';

export const SECTOR = 512;

/** Feature bits (§5.2.3). */
export const BlkFeature = { SEG_MAX: 2, RO: 5, BLK_SIZE: 6, FLUSH: 9, MQ: 12, DISCARD: 13, WRITE_ZEROES: 14 } as const;

/** Request types and status values (§5.2.6). */
export const BlkRequest = { IN: 0, OUT: 1, FLUSH: 4, GET_ID: 8, DISCARD: 11, WRITE_ZEROES: 13 } as const;
export const BlkStatus = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;
/** Each status as the byte the device writes, made once. */
const STATUS_BYTES = [Uint8Array.of(BlkStatus.OK), Uint8Array.of(BlkStatus.IOERR), Uint8Array.of(BlkStatus.UNSUPP)];

/** `struct virtio_blk_config` offsets used here; the layout is 60 bytes up to write_zeroes_may_unmap. */
const Config = {
  CAPACITY: 0, SEG_MAX: 12, BLK_SIZE: 20, NUM_QUEUES: 34,
  MAX_DISCARD_SECTORS: 36, MAX_DISCARD_SEG: 40, DISCARD_ALIGNMENT: 44,
  MAX_WRITE_ZEROES_SECTORS: 48, MAX_WRITE_ZEROES_SEG: 52, WRITE_ZEROES_MAY_UNMAP: 56, SIZE: 60,
} as const;

const HEADER = 16;

/** A le64 sector number as a number: one past 2^53 is past any disk (BlockDevice refuses such files), so its rounding never lets it pass a range check. */
function readSector(bytes: Buffer, at: number): number {
  return bytes.readUInt32LE(at + 4) * 2 ** 32 + bytes.readUInt32LE(at);
}
/** A discard or write-zeroes segment: sector u64, num_sectors u32, flags u32 (bit 0: unmap). */
const SEGMENT = 16;
const MAX_SEGMENTS = 32;
const MAX_RANGE_SECTORS = 0x3fffff;
const ID_BYTES = 20;
const QUEUE_SIZE = 256;
/** Request queues `vfio-user serve` offers unless `--queues` says. */
const SERVED_QUEUES = 4;

export interface VirtioBlkOptions {
  /** Request queues (default 1); more than one offers VIRTIO_BLK_F_MQ. */
  queues?: number;
  queueSize?: number;
  /** Offers VIRTIO_BLK_F_RO and fails every write (default: the backend's). */
  readOnly?: boolean;
  /** GET_ID's answer, at most 20 bytes. */
  serial?: string;
  /** How notifications arrive (the kit's default 'trap' here; `vfio-user serve` passes 'mmap' unless told; 'avail' for SPDK's polling driver; docs/virtio.md). */
  notify?: VirtioNotifyMode;
}

export class VirtioBlk extends VirtioDevice {
  readonly readOnly: boolean;
  private readonly serial: Buffer;
  /** The disk's size in sectors (below 2^53: BlockDevice refuses larger files). */
  private readonly sectors: number;

  constructor(private readonly backend: BlockDevice, options: VirtioBlkOptions = {}) {
    const queues = options.queues ?? 1;
    if (!Number.isInteger(queues) || queues < 1 || queues > 64) throw new UsageError(`queues ${queues}: 1 to 64`);
    if (backend.size % BigInt(SECTOR) !== 0n) throw new UsageError(`the image is ${backend.size} bytes, not whole ${SECTOR}-byte sectors`);
    const readOnly = options.readOnly ?? backend.readOnly;
    if (!readOnly && backend.readOnly) throw new UsageError('the backend is read-only');
    const serial = Buffer.from(options.serial ?? '', 'utf8');
    if (serial.length > ID_BYTES) throw new UsageError(`serial "${options.serial}" is longer than ${ID_BYTES} bytes`);
    const config = Buffer.alloc(Config.SIZE);
    config.writeBigUInt64LE(backend.size / BigInt(SECTOR), Config.CAPACITY);
    config.writeUInt32LE((options.queueSize ?? QUEUE_SIZE) - 2, Config.SEG_MAX);
    config.writeUInt32LE(SECTOR, Config.BLK_SIZE);
    config.writeUInt16LE(queues, Config.NUM_QUEUES);
    config.writeUInt32LE(MAX_RANGE_SECTORS, Config.MAX_DISCARD_SECTORS);
    config.writeUInt32LE(MAX_SEGMENTS, Config.MAX_DISCARD_SEG);
    config.writeUInt32LE(1, Config.DISCARD_ALIGNMENT);
    config.writeUInt32LE(MAX_RANGE_SECTORS, Config.MAX_WRITE_ZEROES_SECTORS);
    config.writeUInt32LE(MAX_SEGMENTS, Config.MAX_WRITE_ZEROES_SEG);
    config[Config.WRITE_ZEROES_MAY_UNMAP] = 1;
    const bits: number[] = [BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES];
    if (queues > 1) bits.push(BlkFeature.MQ);
    if (readOnly) bits.push(BlkFeature.RO);
    super({
      deviceId: VirtioDeviceType.BLOCK,
      classCode: 0x010000,
      features: bits.reduce((mask, bit) => mask | featureBit(bit), 0n),
      queues: Array.from({ length: queues }, () => ({ size: options.queueSize ?? QUEUE_SIZE })),
      config,
      notify: options.notify,
      onQueue: (queue) => {
        for (let chain = queue.pop(); chain; chain = queue.pop()) this.serve(queue, chain);
      },
    });
    this.readOnly = readOnly;
    this.serial = serial;
    this.sectors = Number(backend.size / BigInt(SECTOR));
  }

  /** Closes the image too (after the server is closed). */
  override close(): void {
    super.close();
    void this.backend.close();
  }

  /**
   * Serves one request. Reads and writes, the requests that come by the
   * hundred thousand, go to the image with a callback (no promise each);
   * the rest run as an async function. The callbacks are inline arrows:
   * `vfio-user serve` loads TypeScript through tsx, which names every
   * function bound to a name with a call to Object.defineProperty, a cost
   * per request here.
   */
  private serve(queue: Virtqueue, chain: DescriptorChain): void {
    if (chain.readableLength < HEADER || chain.writableLength < 1) {
      return this.fail(new VirtqueueError(queue.index, `request ${chain.head} has ${chain.readableLength} readable bytes and ${chain.writableLength} writable: no room for the header and the status`));
    }
    const statusAt = chain.writableLength - 1;
    try {
      const header = chain.readAt(0, HEADER);
      const type = header.readUInt32LE(0);
      const sector = readSector(header, 8);
      if (type !== BlkRequest.IN && type !== BlkRequest.OUT) {
        this.serveOther(chain, type, statusAt).then(([status, written]) => this.finish(queue, chain, statusAt, status, written), (error: unknown) => this.fail(error));
        return;
      }
      const read = type === BlkRequest.IN;
      const sg = read ? chain.writableRange(0, statusAt) : chain.readableRange(HEADER, chain.readableLength - HEADER);
      const refused = this.refusal(sg, sector, read);
      if (refused !== undefined) return this.finish(queue, chain, statusAt, refused, 1);
      // The file failed (EIO, ENOSPC) or guest memory went away under the request: IOERR.
      const offset = BigInt(sector * SECTOR);
      if (read) this.backend.read(chain.memory, sg, offset, (error) => this.finish(queue, chain, statusAt, error ? BlkStatus.IOERR : BlkStatus.OK, error ? 1 : 1 + statusAt));
      else this.backend.write(chain.memory, sg, offset, (error) => this.finish(queue, chain, statusAt, error ? BlkStatus.IOERR : BlkStatus.OK, 1));
    } catch {
      this.finish(queue, chain, statusAt, BlkStatus.IOERR, 1);
    }
  }

  /** Writes the status byte and returns the chain; guest memory gone under a request (the client left) breaks the device, never the process. */
  private finish(queue: Virtqueue, chain: DescriptorChain, statusAt: number, status: number, written: number): void {
    try {
      chain.writeAt(statusAt, STATUS_BYTES[status]!);
      queue.complete(chain, written);
    } catch (error) {
      this.fail(error);
    }
  }

  /** Requests other than IN and OUT: their status and the bytes written with it. */
  private async serveOther(chain: DescriptorChain, type: number, statusAt: number): Promise<[number, number]> {
    let status: number;
    let written = 1;
    try {
      switch (type) {
        case BlkRequest.FLUSH:
          await this.backend.flush();
          status = BlkStatus.OK;
          break;
        case BlkRequest.GET_ID: {
          const id = Buffer.alloc(Math.min(ID_BYTES, statusAt));
          this.serial.copy(id);
          chain.writeAt(0, id);
          written += id.length;
          status = BlkStatus.OK;
          break;
        }
        case BlkRequest.DISCARD:
        case BlkRequest.WRITE_ZEROES:
          status = await this.ranges(chain, type);
          break;
        default:
          status = BlkStatus.UNSUPP;
      }
    } catch {
      // The file failed (EIO, ENOSPC) or guest memory went away under the request.
      status = BlkStatus.IOERR;
    }
    return [status, written];
  }

  /** Why IN or OUT of `sg`'s bytes at `sector` is refused (IOERR), if it is: whole sectors inside the disk, no writes to a read-only one. */
  private refusal(sg: SgList, sector: number, read: boolean): number | undefined {
    let length = 0;
    for (const entry of sg) length += entry.length;
    if (!read && this.readOnly) return BlkStatus.IOERR;
    if (length % SECTOR !== 0 || !this.inside(sector, length / SECTOR)) return BlkStatus.IOERR;
    return undefined;
  }

  /** DISCARD and WRITE_ZEROES: a list of segments after the header, each checked before any is applied. */
  private async ranges(chain: DescriptorChain, type: number): Promise<number> {
    if (this.readOnly) return BlkStatus.IOERR;
    const bytes = chain.readableLength - HEADER;
    if (bytes === 0 || bytes % SEGMENT !== 0 || bytes / SEGMENT > MAX_SEGMENTS) return BlkStatus.IOERR;
    const data = chain.readAt(HEADER, bytes);
    const segments: { offset: bigint; length: bigint; unmap: boolean }[] = [];
    for (let at = 0; at < bytes; at += SEGMENT) {
      const sector = readSector(data, at);
      const count = data.readUInt32LE(at + 8);
      const flags = data.readUInt32LE(at + 12);
      // Only unmap (bit 0), and only for write-zeroes (§5.2.6.2).
      if (flags & ~1 || (type === BlkRequest.DISCARD && flags !== 0)) return BlkStatus.UNSUPP;
      if (count > MAX_RANGE_SECTORS || !this.inside(sector, count)) return BlkStatus.IOERR;
      segments.push({ offset: BigInt(sector * SECTOR), length: BigInt(count * SECTOR), unmap: (flags & 1) !== 0 });
    }
    for (const s of segments) {
      // A punched hole reads as zeros: write-zeroes may unmap when the driver allows it.
      if (type === BlkRequest.DISCARD || s.unmap) await this.backend.discard(s.offset, s.length);
      else await this.backend.writeZeroes(s.offset, s.length);
    }
    return BlkStatus.OK;
  }

  private inside(sector: number, count: number): boolean {
    return sector + count <= this.sectors;
  }
}

/** The device `vfio-user serve` serves. */
export default function createDevice(args: readonly string[] = []): VirtioBlk {
  const { values } = parseArgs({
    args: [...args],
    options: {
      image: { type: 'string' },
      queues: { type: 'string', default: String(SERVED_QUEUES) },
      'read-only': { type: 'boolean', default: false },
      serial: { type: 'string' },
      notify: { type: 'string', default: 'mmap' },
    },
    strict: true,
  });
  if (!values.image) throw new UsageError('--image FILE is required (a raw disk image)');
  const queues = Number(values.queues);
  const readOnly = values['read-only'];
  // One slot per descriptor a queue can have in flight, up to what the block layer takes.
  const disk = BlockDevice.open(values.image, { readOnly, queueDepth: Math.min(4096, queues * QUEUE_SIZE) });
  return new VirtioBlk(disk, { queues, readOnly, serial: values.serial, notify: values.notify as VirtioNotifyMode });
}
