/**
 * Guest memory as the server sees it: the DMA windows the client declared
 * with DMA_MAP, each either mmapped from the client's fd or reachable only
 * through DMA_READ/DMA_WRITE messages. Lookups are by IOVA (bigint). Device
 * code reads and writes it through the inherited GuestMemoryAccess methods.
 */
import { native, type NativeMapping } from '../native.js';
import { Errno, ProtocolError, Command } from '../protocol/index.js';
import { GuestMemoryAccess } from './access.js';
import { DmaSpaceClosedError } from './errors.js';
import type { MessageDma } from './messages.js';

export interface DmaWindow {
  readonly iova: bigint;
  readonly size: bigint;
  /** iova + size, kept so lookups allocate no bigint. */
  readonly end: bigint;
  readonly readable: boolean;
  readonly writable: boolean;
  /** Present when the client passed an fd; absent for message-based windows. @internal */
  readonly mapping?: NativeMapping;
  /** File offset of the fd the window was mapped from, to spot exact repeats (with `mapping.file`). */
  readonly fileOffset: bigint;
  /** Plain-memory access, looked up on first use (see GuestMemoryAccess). @internal */
  fast?: FastAccess | null;
}

/**
 * The whole window as a Buffer plus its dirty bitmap, for windows whose file
 * cannot shrink (sealed, as QEMU seals guest RAM): no access can fault, so
 * copies need no native call.
 */
export interface FastAccess {
  readonly bytes: Uint8Array;
  /** Bit p % 32 of word p / 32 is page p of the window. */
  readonly dirty: Uint32Array;
}

export interface MapRequest {
  iova: bigint;
  size: bigint;
  readable: boolean;
  writable: boolean;
  /** The client's fd (borrowed: closed by the caller after the call). */
  fd?: number;
  fileOffset: bigint;
}

const PAGE = 4096n;
const U64_MAX = (1n << 64n) - 1n;

export class DmaSpace extends GuestMemoryAccess {
  /** Sorted by IOVA; windows never overlap. */
  private windows: DmaWindow[] = [];
  private recent: DmaWindow | undefined;
  private transport: MessageDma | undefined;
  private closed = false;

  constructor(readonly maxWindows: number) {
    super();
  }

  /** How message-based windows are reached (set by the session once negotiated). */
  useMessages(transport: MessageDma | undefined): void {
    this.transport = transport;
  }

  /**
   * DMA_READ/DMA_WRITE to the attached client at any IOVA, mapped with an fd
   * or not, for a device that wants the client to do its accesses (as
   * libvfio-user's vfu_sgl_read/write can); the client tracks what it writes
   * (§6.10). Undefined while no client is attached. The `...Async` methods
   * use messages only where a window has no fd.
   */
  get messages(): MessageDma | undefined {
    return this.transport;
  }

  protected windowAt(iova: bigint): DmaWindow | undefined {
    // Device code tends to stay in one window: try the last one hit first.
    const recent = this.recent;
    if (recent && iova >= recent.iova && iova < recent.end) return recent;
    const w = this.windows[this.lowerBound(iova + 1n) - 1];
    if (!w || iova >= w.end) {
      if (this.closed) throw new DmaSpaceClosedError(iova);
      return undefined;
    }
    this.recent = w;
    return w;
  }

  protected *windowsIn(iova: bigint, end: bigint): Iterable<DmaWindow> {
    if (this.closed) throw new DmaSpaceClosedError(iova);
    for (let at = Math.max(0, this.lowerBound(iova + 1n) - 1); at < this.windows.length && this.windows[at].iova < end; at++) {
      const w = this.windows[at];
      if (w.end > iova) yield w;
    }
  }

  get count(): number {
    return this.windows.length;
  }

  list(): readonly DmaWindow[] {
    return this.windows;
  }

  /**
   * Adds a window. Errors follow docs/protocol-choices.md: an exact repeat of a
   * live window is accepted (QEMU re-sends maps; libvfio-user does the same),
   * any other overlap is EEXIST as the spec says.
   */
  map(req: MapRequest): void {
    const fail = (errno: number, why: string) => new ProtocolError(errno, Command.DMA_MAP, why);
    if (this.closed) throw new DmaSpaceClosedError(req.iova);
    if (req.size === 0n) throw fail(Errno.EINVAL, 'size is 0');
    if (req.iova + req.size - 1n > U64_MAX) throw fail(Errno.EINVAL, 'iova + size wraps past 2^64');
    if (req.iova % PAGE !== 0n || req.size % PAGE !== 0n) throw fail(Errno.EINVAL, 'iova and size must be 4 KiB aligned');
    const at = this.lowerBound(req.iova);
    // Only the neighbours can overlap: windows never do.
    for (let i = Math.max(0, at - 1); i <= at && i < this.windows.length; i++) {
      const w = this.windows[i];
      if (!overlaps(w, req.iova, req.size)) continue;
      if (isRepeat(w, req)) return;
      throw fail(Errno.EEXIST, `overlaps the window at 0x${w.iova.toString(16)}`);
    }
    if (this.windows.length >= this.maxWindows) throw fail(Errno.ENOSPC, `${this.maxWindows} windows are mapped already`);
    let mapping: NativeMapping | undefined;
    if (req.fd !== undefined) {
      try {
        mapping = new native.NativeMapping(req.fd, req.fileOffset, req.size, req.readable, req.writable);
      } catch (error) {
        throw fail(Errno.EINVAL, (error as Error).message);
      }
    }
    const window: DmaWindow = {
      iova: req.iova, size: req.size, end: req.iova + req.size, readable: req.readable, writable: req.writable, mapping, fileOffset: req.fileOffset,
    };
    this.windows.splice(at, 0, window);
  }

  /** Removes the window that exactly matches, detaching its views first. */
  unmap(iova: bigint, size: bigint): void {
    const at = this.lowerBound(iova);
    const w = this.windows[at];
    if (!w || w.iova !== iova || w.size !== size) {
      throw new ProtocolError(Errno.ENOENT, Command.DMA_UNMAP, 'no window matches exactly');
    }
    this.windows.splice(at, 1);
    if (this.recent === w) this.recent = undefined;
    w.mapping?.unmap();
  }

  unmapAll(): void {
    for (const w of this.windows) w.mapping?.unmap();
    this.windows = [];
    this.recent = undefined;
  }

  /** The client is gone: every window goes, and every later access throws DmaSpaceClosedError. */
  close(): void {
    this.unmapAll();
    this.transport = undefined;
    this.closed = true;
  }

  /** The window holding [iova, iova + length), or undefined. */
  find(iova: bigint, length: number): DmaWindow | undefined {
    const w = this.windowAt(iova);
    return w && iova + BigInt(length) <= w.end ? w : undefined;
  }

  /** First index whose iova is >= `iova`. */
  private lowerBound(iova: bigint): number {
    let lo = 0;
    let hi = this.windows.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.windows[mid].iova < iova) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}

function overlaps(w: DmaWindow, iova: bigint, size: bigint): boolean {
  return iova < w.end && w.iova < iova + size;
}

/**
 * Whether `req` repeats `w` exactly: the same range, permissions and file offset, and the same
 * file too (the same range backed by another file is a new mapping, not a repeat). The file is
 * looked up only here, so a map that overlaps nothing costs no fstat of its own.
 */
function isRepeat(w: DmaWindow, req: MapRequest): boolean {
  if (w.iova !== req.iova || w.size !== req.size || w.readable !== req.readable || w.writable !== req.writable || w.fileOffset !== req.fileOffset) {
    return false;
  }
  if (req.fd === undefined || w.mapping === undefined) return req.fd === undefined && w.mapping === undefined;
  return w.mapping.file === native.fileIdentity(req.fd);
}
