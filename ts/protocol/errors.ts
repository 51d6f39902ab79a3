import { brand } from '../brand.js';
import { commandName } from './constants.js';

/** The errno values the protocol code uses (Linux numbering). */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  E2BIG: 7,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  ENOSPC: 28,
  ENOSYS: 38,
  EPROTO: 71,
  ENOTSUP: 95,
  ENOTCONN: 107,
  ETIMEDOUT: 110,
} as const;
export type Errno = (typeof Errno)[keyof typeof Errno];

const errnoNames = new Map<number, string>(Object.entries(Errno).map(([name, n]) => [n, name]));

/** 'EINVAL', or 'errno 123' for values not in `Errno`. */
export function errnoName(n: number): string {
  return errnoNames.get(n) ?? `errno ${n}`;
}

/** A failed command: raised by decoders for malformed payloads, and for error replies. */
export class ProtocolError extends Error {
  static {
    brand(this, 'ProtocolError');
  }

  readonly errno: number;
  readonly command: number;

  constructor(errno: number, command: number, detail?: string) {
    super(
      `${commandName(command)} failed: ${errnoName(errno)}` + (detail ? ` (${detail})` : ''),
    );
    this.name = 'ProtocolError';
    this.errno = errno;
    this.command = command;
  }
}

/** Shorthand for the decoders' only failure: EINVAL for `command`. */
export function invalid(command: number, detail: string): ProtocolError {
  return new ProtocolError(Errno.EINVAL, command, detail);
}
