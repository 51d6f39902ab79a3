/**
 * The namespace's blocks: a raw image file (sparse when created here) or
 * memory. Reads and writes take the caller's buffer, which for I/O commands
 * is a view of guest memory: the file is read straight into the guest's page
 * and written straight from it, with no copy in between.
 */
import * as fs from 'node:fs';
import { punchHole } from 'vfio-user';

export interface BackingStore {
  /** Bytes; a whole number of blocks. */
  readonly size: number;
  read(into: Uint8Array, position: number): void;
  write(from: Uint8Array, position: number): void;
  /** Makes [position, position + length) read as zeros (Write Zeroes). */
  zero(position: number, length: number): void;
  /** Makes [position, position + length) read as zeros and, where it can, frees its space (Deallocate). */
  deallocate(position: number, length: number): void;
  /** Makes completed writes durable. */
  flush(): void;
  close(): void;
}

/** Zeros are written from this buffer, a MiB at a time. */
const ZEROS = new Uint8Array(1 << 20);

export class FileStore implements BackingStore {
  readonly size: number;
  private readonly fd: number;

  /** Opens `path`, creating it sparse at `createSize` bytes when it does not exist. */
  constructor(readonly path: string, createSize: number) {
    if (!fs.existsSync(path)) {
      const fd = fs.openSync(path, 'wx');
      fs.ftruncateSync(fd, createSize);
      fs.closeSync(fd);
    }
    this.fd = fs.openSync(path, 'r+');
    this.size = fs.fstatSync(this.fd).size;
  }

  read(into: Uint8Array, position: number): void {
    // A read past the end of a file shorter than its namespace (never here: size is the file's) would return short.
    for (let done = 0; done < into.length;) {
      const n = fs.readSync(this.fd, into, done, into.length - done, position + done);
      if (n === 0) throw new Error(`${this.path}: unexpected end of file at ${position + done}`);
      done += n;
    }
  }

  write(from: Uint8Array, position: number): void {
    for (let done = 0; done < from.length;) done += fs.writeSync(this.fd, from, done, from.length - done, position + done);
  }

  zero(position: number, length: number): void {
    for (let done = 0; done < length;) {
      const n = Math.min(ZEROS.length, length - done);
      this.write(ZEROS.subarray(0, n), position + done);
      done += n;
    }
  }

  /** Punches a hole (the file stays sparse); writes zeros where the filesystem cannot. */
  deallocate(position: number, length: number): void {
    if (!punchHole(this.fd, position, length)) this.zero(position, length);
  }

  flush(): void {
    fs.fdatasyncSync(this.fd);
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}

export class MemoryStore implements BackingStore {
  private readonly bytes: Uint8Array;

  constructor(readonly size: number) {
    this.bytes = new Uint8Array(size);
  }

  read(into: Uint8Array, position: number): void {
    into.set(this.bytes.subarray(position, position + into.length));
  }

  write(from: Uint8Array, position: number): void {
    this.bytes.set(from, position);
  }

  zero(position: number, length: number): void {
    this.bytes.fill(0, position, position + length);
  }

  deallocate(position: number, length: number): void {
    this.zero(position, length);
  }

  flush(): void {}

  close(): void {}
}
