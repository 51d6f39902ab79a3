/**
 * Guest memory as the server sees it: the DMA windows the client declared
 * with DMA_MAP, each either mmapped from the client's fd or reachable only
 * through DMA_READ/DMA_WRITE messages. Lookups are by IOVA (bigint). Device
 * code reads and writes it through the inherited GuestMemoryAccess methods.
 */
import { errnoOf, native, type NativeDmaTable, type NativeMapping } from '../native.js';
import { Command, ProtocolError } from '../protocol/index.js';
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

/**
 * The window table itself lives in the native core (crates/core/src/dma.rs),
 * where the connection's reader applies DMA_MAP and DMA_UNMAP without
 * entering JS. This class mirrors it for zero-copy lookups: the table moves
 * `changes[0]` whenever it changed, and every lookup first compares it with
 * what was applied, taking the changes in one batch when it moved. So device
 * code, whatever wakes it (a message, a doorbell, a timer), sees every map
 * and unmap answered before it runs.
 */
export class DmaSpace extends GuestMemoryAccess {
  /** Sorted by IOVA; windows never overlap. */
  private windows: DmaWindow[] = [];
  private recent: DmaWindow | undefined;
  private transport: MessageDma | undefined;
  private closed = false;
  /** Moved by the native table at each change waiting for the mirror (a SharedArrayBuffer: its memory never moves). */
  private readonly changes = new Uint32Array(new SharedArrayBuffer(4));
  private applied = 0;
  /** The native window table. @internal */
  readonly table: NativeDmaTable;

  constructor(readonly maxWindows: number) {
    super();
    this.table = new native.NativeDmaTable(maxWindows, this.changes);
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
    if (this.changes[0] !== this.applied) this.catchUp();
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
    if (this.changes[0] !== this.applied) this.catchUp();
    for (let at = Math.max(0, this.lowerBound(iova + 1n) - 1); at < this.windows.length && this.windows[at].iova < end; at++) {
      const w = this.windows[at];
      if (w.end > iova) yield w;
    }
  }

  get count(): number {
    return this.list().length;
  }

  list(): readonly DmaWindow[] {
    if (this.changes[0] !== this.applied) this.catchUp();
    return this.windows;
  }

  /**
   * Adds a window. Errors follow docs/protocol-choices.md: an exact repeat of a
   * live window is accepted (QEMU re-sends maps; libvfio-user does the same),
   * any other overlap is EEXIST as the spec says.
   */
  map(req: MapRequest): void {
    if (this.closed) throw new DmaSpaceClosedError(req.iova);
    refused(Command.DMA_MAP, () => this.table.map(req.iova, req.size, req.readable, req.writable, req.fd, req.fileOffset));
  }

  /** Removes the window that exactly matches, detaching its views first. */
  unmap(iova: bigint, size: bigint): void {
    refused(Command.DMA_UNMAP, () => this.table.unmap(iova, size));
  }

  unmapAll(): void {
    this.table.unmapAll();
  }

  /**
   * Applies a DMA_MAP or DMA_UNMAP message that reached JS (`fds` borrowed),
   * with the rules the native reader applies; returns the reply's payload.
   * @internal
   */
  applyMessage(command: typeof Command.DMA_MAP | typeof Command.DMA_UNMAP, payload: Uint8Array, fds: readonly number[]): Buffer {
    return refused(command, () => this.table.applyMessage(command, payload, fds as number[]));
  }

  /** The client is gone: every window goes, and every later access throws DmaSpaceClosedError. */
  close(): void {
    this.unmapAll();
    this.catchUp();
    this.transport = undefined;
    this.closed = true;
  }

  /** The window holding [iova, iova + length), or undefined. */
  find(iova: bigint, length: number): DmaWindow | undefined {
    const w = this.windowAt(iova);
    return w && iova + BigInt(length) <= w.end ? w : undefined;
  }

  /** Applies the native table's changes to the mirror, in order. */
  private catchUp(): void {
    this.applied = this.changes[0];
    this.recent = undefined;
    for (const change of this.table.takeChanges()) {
      if (change.kind === 'unmapAll') {
        this.windows = [];
      } else if (change.kind === 'unmap') {
        this.windows.splice(this.lowerBound(change.iova!), 1);
      } else {
        const iova = change.iova!;
        const size = change.size!;
        const window: DmaWindow = {
          iova, size, end: iova + size, readable: change.readable!, writable: change.writable!, mapping: change.mapping ?? undefined, fileOffset: change.fileOffset!,
        };
        this.windows.splice(this.lowerBound(iova), 0, window);
      }
    }
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

/** Runs a native table call, turning its refusal (an errno as the error's `code`) into the ProtocolError a reply carries. */
function refused<T>(command: number, call: () => T): T {
  try {
    return call();
  } catch (error) {
    const errno = errnoOf(error);
    if (errno === undefined) throw error;
    throw new ProtocolError(errno, command, (error as Error).message);
  }
}
