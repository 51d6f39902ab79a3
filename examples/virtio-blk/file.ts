/**
 * The disk's bytes: a file, read and written asynchronously (libuv's thread
 * pool) through a buffer of ours, copied to and from guest memory on the
 * event loop. Not through views of guest memory: a thread still writing into
 * a view when the client unmaps that memory would write into whatever is
 * mapped there next. The same shape as the library's block I/O API
 * (`BlockDevice`), which moves the data natively with no copy; the device
 * switches to it by changing how the backend is opened.
 */
import { promises as fs } from 'node:fs';
import { punchHole, type GuestMemoryAccess, type SgList } from 'vfio-user';

export interface BlockBackend {
  /** Bytes. */
  readonly size: bigint;
  readonly readOnly: boolean;
  read(memory: GuestMemoryAccess, sg: SgList, offset: bigint): Promise<void>;
  write(memory: GuestMemoryAccess, sg: SgList, offset: bigint): Promise<void>;
  flush(): Promise<void>;
  /** The range reads as zeros afterwards and, where the filesystem can, takes no space. */
  discard(offset: bigint, length: bigint): Promise<void>;
  writeZeroes(offset: bigint, length: bigint): Promise<void>;
  close(): Promise<void>;
}

const ZEROS = new Uint8Array(1 << 20);

export class FileBackend implements BlockBackend {
  private constructor(
    private readonly file: fs.FileHandle,
    readonly size: bigint,
    readonly readOnly: boolean,
  ) {}

  static async open(path: string, readOnly: boolean): Promise<FileBackend> {
    const file = await fs.open(path, readOnly ? 'r' : 'r+');
    return new FileBackend(file, BigInt((await file.stat()).size), readOnly);
  }

  async read(memory: GuestMemoryAccess, sg: SgList, offset: bigint): Promise<void> {
    let at = Number(offset);
    for (const e of sg) {
      const buffer = Buffer.allocUnsafe(e.length);
      await this.readFully(buffer, at);
      await memory.writeAsync(e.iova, buffer);
      at += e.length;
    }
  }

  async write(memory: GuestMemoryAccess, sg: SgList, offset: bigint): Promise<void> {
    let at = Number(offset);
    for (const e of sg) {
      const source = await memory.readAsync(e.iova, e.length);
      for (let done = 0; done < source.length;) done += (await this.file.write(source, done, source.length - done, at + done)).bytesWritten;
      at += e.length;
    }
  }

  flush(): Promise<void> {
    return this.file.datasync();
  }

  async discard(offset: bigint, length: bigint): Promise<void> {
    if (!punchHole(this.file.fd, Number(offset), Number(length))) await this.writeZeroes(offset, length);
  }

  async writeZeroes(offset: bigint, length: bigint): Promise<void> {
    for (let done = 0; done < Number(length);) {
      const n = Math.min(ZEROS.length, Number(length) - done);
      done += (await this.file.write(ZEROS, 0, n, Number(offset) + done)).bytesWritten;
    }
  }

  close(): Promise<void> {
    return this.file.close();
  }

  private async readFully(into: Uint8Array, position: number): Promise<void> {
    for (let done = 0; done < into.length;) {
      const { bytesRead } = await this.file.read(into, done, into.length - done, position + done);
      // The range was checked against the size: a short file was truncated under us.
      if (bytesRead === 0) throw new Error(`unexpected end of file at ${position + done}`);
      done += bytesRead;
    }
  }
}
