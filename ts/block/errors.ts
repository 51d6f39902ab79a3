/**
 * Errors of block I/O. Each is a class (tell them apart with `instanceof`);
 * failures of the file carry the errno the kernel gave. Guest memory that
 * cannot be reached is a `DmaAccessError` (EFAULT, EPERM), as everywhere else.
 */
import { VfioUserError } from '../errors.js';
import { describeFailure } from '../native.js';
import { Errno } from '../protocol/index.js';

export type BlockOp = 'read' | 'write' | 'flush' | 'discard' | 'writeZeroes';

/**
 * A request failed: `errno` is the kernel's (EIO, ENOSPC...), EINVAL for a
 * range outside the device or not aligned as O_DIRECT needs, EBADF for a
 * change to a read-only device, EFAULT when guest memory vanished under the
 * I/O (the client truncated its file), ENOTSUP for memory mapped without an fd.
 */
export class BlockIoError extends VfioUserError {
  constructor(
    readonly errno: number,
    readonly op: BlockOp,
    readonly offset: bigint,
    readonly length: bigint,
    detail?: string,
  ) {
    super(`block ${op} of ${length} bytes at ${offset} failed: ${describeFailure(errno, detail)}`);
  }
}

/**
 * `queueDepth` requests are in flight already: nothing was started. Wait for
 * one to settle (or size the queue for the device's own bound) and retry.
 */
export class BlockQueueFullError extends VfioUserError {
  readonly errno = Errno.EAGAIN;

  constructor(
    readonly op: BlockOp,
    readonly queueDepth: number,
  ) {
    super(`block ${op} refused: ${queueDepth} requests are in flight already (EAGAIN)`);
  }
}

/** The device was closed (or is closing): no new request is taken. */
export class BlockDeviceClosedError extends VfioUserError {
  constructor(
    readonly path: string,
    readonly op: BlockOp,
  ) {
    super(`block ${op} on ${path}: the device is closed`);
  }
}

/** Opening failed: `errno` is the kernel's (ENOENT, EACCES...), ENODEV for neither a file nor a block device, ENOSYS and kin when io_uring was required and is unavailable. */
export class BlockOpenError extends VfioUserError {
  constructor(
    readonly errno: number,
    readonly path: string,
    detail: string,
  ) {
    super(`cannot open ${path} for block I/O: ${detail}`);
  }
}
