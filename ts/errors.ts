/**
 * Errors thrown by the API. Protocol failures are `ProtocolError` (errno +
 * command, from ts/protocol); misuse and connection state have their own
 * classes so callers can tell them apart with `instanceof`, which holds even
 * for an error made by another copy of the library (ts/brand.ts).
 */
import { brand } from './brand.js';

export { ProtocolError } from './protocol/errors.js';

/** Base class of the library's own (non-protocol) errors. */
export class VfioUserError extends Error {
  static {
    brand(this, 'VfioUserError');
  }

  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** The connection is closed, or closed while a request waited for its reply. */
export class ConnectionClosedError extends VfioUserError {
  static {
    brand(this, 'ConnectionClosedError');
  }

  /** The errno the system (or the send-queue bound: ENOBUFS) gave, when a failure ended the connection. */
  readonly errno?: number;
  /** The request that was waiting, or being sent, when it ended. */
  readonly command?: number;

  constructor(message: string, details: { errno?: number; command?: number } = {}) {
    super(message);
    if (details.errno !== undefined) this.errno = details.errno;
    if (details.command !== undefined) this.command = details.command;
  }
}

/** A request got no reply in time. */
export class TimeoutError extends VfioUserError {
  static {
    brand(this, 'TimeoutError');
  }
}

/** Every msg_id (16 bits) belongs to a request still awaiting its reply: wait for some to settle. */
export class TooManyRequestsError extends VfioUserError {
  static {
    brand(this, 'TooManyRequestsError');
  }
}

/** The peer broke the protocol in a way that ends the connection. */
export class PeerProtocolError extends VfioUserError {
  static {
    brand(this, 'PeerProtocolError');
  }
}

/** The API was used wrongly (bad argument, wrong state). */
export class UsageError extends VfioUserError {
  static {
    brand(this, 'UsageError');
  }
}

/**
 * A read handler answered something that is not `size` bytes of register:
 * the message names the handler (`bars[2].read`), the access and the value,
 * so the mistake is found in device code rather than in the guest.
 */
export class HandlerResultError extends UsageError {
  static {
    brand(this, 'HandlerResultError');
  }

  constructor(
    readonly handler: string,
    readonly offset: number,
    readonly size: number,
    readonly value: unknown,
    problem: string,
  ) {
    super(`${handler} at offset 0x${offset.toString(16)}, size ${size}, returned ${describeValue(value)}: ${problem}`);
  }
}

function describeValue(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value instanceof Uint8Array) return `a ${value.constructor.name} of ${value.length} bytes`;
  if (typeof value === 'number' || typeof value === 'bigint') return typeof value === 'bigint' ? `${value}n` : String(value);
  if (typeof value === 'string') return `the string ${JSON.stringify(value.slice(0, 40))}`;
  if (value === null) return 'null';
  return typeof value === 'object' ? `an object (${value.constructor?.name ?? 'no prototype'})` : `a ${typeof value}`;
}
