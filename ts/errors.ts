/**
 * Errors thrown by the API. Protocol failures are `ProtocolError` (errno +
 * command, from ts/protocol); misuse and connection state have their own
 * classes so callers can tell them apart with `instanceof`.
 */
export { ProtocolError } from './protocol/errors.js';

/** Base class of the library's own (non-protocol) errors. */
export class VfioUserError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** The connection is closed, or closed while a request waited for its reply. */
export class ConnectionClosedError extends VfioUserError {}

/** A request got no reply in time. */
export class TimeoutError extends VfioUserError {}

/** Every msg_id (16 bits) belongs to a request still awaiting its reply: wait for some to settle. */
export class TooManyRequestsError extends VfioUserError {}

/** The peer broke the protocol in a way that ends the connection. */
export class PeerProtocolError extends VfioUserError {}

/** The API was used wrongly (bad argument, wrong state). */
export class UsageError extends VfioUserError {}
