/**
 * Errors of device-side guest memory access. Each is a class (tell them apart
 * with `instanceof`, which holds across copies of the library: ts/brand.ts);
 * access failures carry the errno that names them.
 */
import { brand } from '../brand.js';
import { VfioUserError } from '../errors.js';
import { errnoName } from '../protocol/index.js';

/**
 * Guest memory at `iova` could not be accessed. `errno` is EFAULT when no DMA
 * window covers the range or the client's backing file no longer does (it was
 * truncated), EPERM when the window does not allow the access.
 */
export class DmaAccessError extends VfioUserError {
  static {
    brand(this, 'DmaAccessError');
  }

  constructor(
    readonly errno: number,
    readonly iova: bigint,
    readonly length: number,
    detail: string,
  ) {
    super(`DMA of ${length} bytes at 0x${iova.toString(16)} failed: ${errnoName(errno)} (${detail})`);
  }
}

/**
 * A synchronous access reached a window the client mapped without an fd:
 * that memory is reachable only by DMA_READ/DMA_WRITE messages, so use the
 * `...Async` method instead.
 */
export class AsyncDmaRequiredError extends VfioUserError {
  static {
    brand(this, 'AsyncDmaRequiredError');
  }

  constructor(readonly iova: bigint) {
    super(`guest memory at 0x${iova.toString(16)} is message-based (mapped without an fd): use the async methods`);
  }
}

/**
 * The client this guest memory belonged to is gone. Device code that
 * outlived its client's session (a late handler, a timer it started) gets
 * this instead of reaching the memory of whoever connected next.
 */
export class DmaSpaceClosedError extends VfioUserError {
  static {
    brand(this, 'DmaSpaceClosedError');
  }

  constructor(readonly iova: bigint) {
    super(`guest memory at 0x${iova.toString(16)} belonged to a client that has disconnected`);
  }
}

/** Why a zero-copy view cannot be made. */
export type DmaViewRefusal =
  /** The window has no fd: there is no memory in this process to view. */
  | 'message-based'
  /** The window is not readable and writable: a store through a view would kill the process. */
  | 'read-only'
  /** The range crosses a window boundary: separate mmaps are not contiguous here. */
  | 'spans-windows'
  /** Longer than the largest ArrayBuffer this runtime makes (buffer.constants.MAX_LENGTH). */
  | 'too-large'
  /** The runtime refuses external ArrayBuffers (Electron): copies would silently lose writes. */
  | 'unsupported-runtime';

export class DmaViewError extends VfioUserError {
  static {
    brand(this, 'DmaViewError');
  }

  constructor(
    readonly reason: DmaViewRefusal,
    readonly iova: bigint,
    detail: string,
  ) {
    super(`no view at 0x${iova.toString(16)}: ${detail}`);
  }
}
