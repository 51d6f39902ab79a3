/**
 * The namespace's blocks: a raw image file (sparse when created here) or
 * memory. Reads and writes take scatter-gather lists of guest memory: a file
 * is read straight into the guest's pages and written straight from them by
 * the library's BlockDevice (io_uring, or native threads where the kernel
 * refuses it), so no file call runs on the event loop and no byte is copied.
 */
import * as fs from 'node:fs';
import { BlockDevice, type BlockCallback, type DmaSpace, type SgList } from 'vfio-user';

export interface BackingStore {
  /** Bytes; a whole number of blocks. */
  readonly size: number;
  /** Operations the store runs at once; the controller starts no more than this many. */
  readonly queueDepth: number;
  /**
   * Reads `position..` into guest memory along `sg`; `done(null)` or
   * `done(error)` follows, never before it returns. Reads and writes take a
   * callback, not a promise: they are the commands that come by the
   * hundred thousand, and a promise each (with the server's promise hooks)
   * was a tenth of the controller's CPU at depth.
   */
  read(dma: DmaSpace, sg: SgList, position: number, done: BlockCallback): void;
  /** Writes guest memory along `sg` to `position..`; `done` as for `read`. */
  write(dma: DmaSpace, sg: SgList, position: number, done: BlockCallback): void;
  /** Makes [position, position + length) read as zeros (Write Zeroes). */
  zero(position: number, length: number): Promise<void>;
  /** Makes [position, position + length) read as zeros and, where it can, frees its space (Deallocate). */
  deallocate(position: number, length: number): Promise<void>;
  /** Makes completed writes durable. */
  flush(): Promise<void>;
  /** Closes once what is in flight has finished. */
  close(): void;
}

/** Enough for every queue's commands to keep a disk busy; commands past it wait in their SQs. */
const FILE_QUEUE_DEPTH = 256;

export class FileStore implements BackingStore {
  readonly size: number;
  readonly queueDepth = FILE_QUEUE_DEPTH;
  private readonly block: BlockDevice;

  /** Opens `path`, creating it sparse at `createSize` bytes when it does not exist (at setup, before serving). */
  constructor(readonly path: string, createSize: number) {
    if (!fs.existsSync(path)) {
      const fd = fs.openSync(path, 'wx');
      fs.ftruncateSync(fd, createSize);
      fs.closeSync(fd);
    }
    this.block = BlockDevice.open(path, { queueDepth: FILE_QUEUE_DEPTH });
    this.size = Number(this.block.size);
  }

  read(dma: DmaSpace, sg: SgList, position: number, done: BlockCallback): void {
    this.block.read(dma, sg, BigInt(position), done);
  }

  write(dma: DmaSpace, sg: SgList, position: number, done: BlockCallback): void {
    this.block.write(dma, sg, BigInt(position), done);
  }

  zero(position: number, length: number): Promise<void> {
    return this.block.writeZeroes(BigInt(position), BigInt(length));
  }

  /** Punches a hole (the file stays sparse); zeros are written where the filesystem cannot. */
  deallocate(position: number, length: number): Promise<void> {
    return this.block.discard(BigInt(position), BigInt(length));
  }

  flush(): Promise<void> {
    return this.block.flush();
  }

  close(): void {
    void this.block.close();
  }
}

export class MemoryStore implements BackingStore {
  /** Every operation is done before it returns: nothing is ever waiting. */
  readonly queueDepth = Number.POSITIVE_INFINITY;
  private readonly bytes: Uint8Array;

  constructor(readonly size: number) {
    this.bytes = new Uint8Array(size);
  }

  read(dma: DmaSpace, sg: SgList, position: number, done: BlockCallback): void {
    finished(() => dma.writeSg(sg, this.bytes.subarray(position, position + sgLength(sg))), done);
  }

  write(dma: DmaSpace, sg: SgList, position: number, done: BlockCallback): void {
    finished(() => this.bytes.set(dma.readSg(sg), position), done);
  }

  zero(position: number, length: number): Promise<void> {
    this.bytes.fill(0, position, position + length);
    return DONE;
  }

  deallocate(position: number, length: number): Promise<void> {
    return this.zero(position, length);
  }

  flush(): Promise<void> {
    return DONE;
  }

  close(): void {}
}

const DONE = Promise.resolve();

/** Runs `work` now and reports it to `done` on the next microtask. */
function finished(work: () => void, done: BlockCallback): void {
  let error: Error | null = null;
  try {
    work();
  } catch (e) {
    error = e as Error;
  }
  queueMicrotask(() => done(error));
}

function sgLength(sg: SgList): number {
  return sg.reduce((n, e) => n + e.length, 0);
}
