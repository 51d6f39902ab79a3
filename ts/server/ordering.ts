/**
 * Where a request waits, and why: the server's ordering and backpressure.
 *
 * A client sees its commands take effect in the order it sent them: a
 * command starts only once every earlier one has been answered. Three layers
 * take part in the order; this queue is the one that decides, the other two
 * follow it:
 *
 * 1. The native connection (crates/napi/src/connection.rs) answers a
 *    REGION_READ of a natively shared region, and DMA_MAP and DMA_UNMAP
 *    (from the native window table, crates/core/src/dma.rs), itself,
 *    without entering JS, but only while its `busy` count is 0. `busy` mirrors this queue: every
 *    `receive()` that returns true (a message deferred: running or waiting
 *    here) adds one, and every `channel.done()` takes one away. So while
 *    anything runs or waits here, every message comes to JS and waits in
 *    line; when the queue is empty, reads bypass it, which cannot reorder.
 * 2. The channel (ts/channel.ts) sends a reply computed inside `receive()`
 *    as the native callback's return value, and releases it before anything
 *    else is sent: a saving of one native call, never a reordering.
 * 3. This queue: one handler at a time; messages that arrive while a handler
 *    is pending (a Promise) wait here in arrival order. What waits is bounded
 *    (MAX_WAITING_BYTES, see costOf): a client that keeps sending behind a
 *    stalled handler is cut off, not the server. How long a handler may keep
 *    the others waiting is bounded too when the server sets a deadline
 *    (`requestTimeoutMs`): past it the client gets ETIMEDOUT and the next
 *    command runs; whatever the late handler produces is dropped.
 *
 * Replies waiting to leave are the other side of backpressure: the native
 * connection queues what the client does not read, up to the server's
 * `maxQueuedBytes`, and cuts the client off past it.
 */
import type { Channel, Message } from '../channel.js';
import { PeerProtocolError } from '../errors.js';
import { closeFds } from '../native.js';
import type { Reply } from './handlers/index.js';

/** Commands may wait behind a pending (async) handler; past this many bytes (costOf) the client is cut off. */
export const MAX_WAITING_BYTES = 64 * 1024 * 1024;

/** What a waiting message holds besides its payload (header, views, bookkeeping: about 300 bytes measured). */
const MESSAGE_COST = 512;
/** A waiting fd holds a slot of the process's fd table: 1 024 of them reach the cap on their own. */
const FD_COST = 64 * 1024;

/** What a waiting message costs against MAX_WAITING_BYTES: empty messages and fds are not free. */
function costOf(message: Message): number {
  return MESSAGE_COST + message.payload.length + message.fds.length * FD_COST;
}

export interface RequestHandling {
  /** Starts handling a message: its reply, or a Promise of it when it finishes later. */
  dispatch(message: Message): Reply | Promise<Reply>;
  /** Sends the reply (an error reply when `error` is set) and closes the message's fds. */
  answer(message: Message, reply: Reply, error?: unknown): void;
  /** The client overran what may wait: end the session with `error`. */
  overflow(error: PeerProtocolError): void;
  /** A handler missed its deadline: answer ETIMEDOUT and tell the server's owner. */
  expired(message: Message): void;
  /** What a handler produced after its deadline: dropped (its reply fds closed). */
  late(message: Message, reply: Reply, error?: unknown): void;
}

export class RequestQueue {
  private readonly waiting: Message[] = [];
  /** The cost (costOf) of what is in `waiting`. */
  private waitingCost = 0;
  /** A handler's Promise is pending. */
  private running = false;
  /** Fires when the running handler misses its deadline. */
  private deadline: NodeJS.Timeout | undefined;

  constructor(
    private readonly channel: Pick<Channel, 'done' | 'closed'>,
    private readonly handling: RequestHandling,
    /** How long one handler may keep later commands waiting; undefined: for ever. */
    private readonly timeoutMs: number | undefined,
  ) {}

  /**
   * Takes a message from the channel. Returns true when it is deferred (it
   * runs or waits here): `channel.done()` then follows once it is answered.
   */
  receive(message: Message): boolean {
    if (!this.running && this.waiting.length === 0) return this.run(message);
    this.waitingCost += costOf(message);
    if (this.waitingCost > MAX_WAITING_BYTES) {
      // A client that keeps sending while a handler is pending would grow the queue without bound.
      closeFds(message.fds);
      this.handling.overflow(new PeerProtocolError(`the client queued more than ${MAX_WAITING_BYTES} bytes behind a pending handler`));
      return false;
    }
    this.waiting.push(message);
    return true;
  }

  /** How many messages wait behind the running handler. */
  get waitingCount(): number {
    return this.waiting.length;
  }

  /** The session ended: what still waits is dropped, its fds closed; no deadline fires. */
  clear(): void {
    clearTimeout(this.deadline);
    for (const message of this.waiting.splice(0)) closeFds(message.fds);
    this.waitingCost = 0;
  }

  /** Handles one message; true if it finishes later (then `channel.done()` follows). */
  private run(message: Message): boolean {
    let result: Reply | Promise<Reply>;
    try {
      result = this.handling.dispatch(message);
    } catch (error) {
      this.handling.answer(message, undefined, error);
      return false;
    }
    if (!(result instanceof Promise)) {
      this.handling.answer(message, result);
      return false;
    }
    this.running = true;
    let answered = false;
    // Answers once (the handler's result or the deadline, whichever comes first), then moves on.
    const finish = (answer: () => void) => {
      answered = true;
      try {
        answer();
      } finally {
        clearTimeout(this.deadline);
        this.running = false;
        this.channel.done();
        this.drain();
      }
    };
    if (this.timeoutMs !== undefined) {
      this.deadline = setTimeout(() => finish(() => this.handling.expired(message)), this.timeoutMs).unref();
    }
    result.then(
      (reply) => (answered ? this.handling.late(message, reply) : finish(() => this.handling.answer(message, reply))),
      (error: unknown) => (answered ? this.handling.late(message, undefined, error) : finish(() => this.handling.answer(message, undefined, error))),
    );
    return true;
  }

  private drain(): void {
    while (!this.running && this.waiting.length > 0 && !this.channel.closed) {
      const next = this.waiting.shift()!;
      this.waitingCost -= costOf(next);
      if (!this.run(next)) this.channel.done();
    }
  }
}
