/**
 * Message-based DMA: guest memory the client mapped without an fd is reached
 * with DMA_READ/DMA_WRITE requests to the client (§6.10), split at the
 * client's max_data_xfer_size and paced to one chunk's worth in flight. Replies are matched by the
 * Channel as they arrive, never queued behind the command being handled, so
 * a device may await these from inside a request handler.
 */
import type { Message } from '../channel.js';
import {
  Command,
  decodeDmaReadReply,
  decodeDmaWriteReply,
  encodeDmaReadRequest,
  encodeDmaWriteRequest,
  Errno,
  ProtocolError,
} from '../protocol/index.js';

/** The part of a Channel message-based DMA needs. */
export interface DmaRequester {
  request(command: number, payload?: Uint8Array, fds?: number[], timeoutMs?: number): Promise<Message>;
}

export class MessageDma {
  /**
   * Data bytes in flight (DMA_WRITE data sent, DMA_READ data asked for) and
   * not yet answered, across every transfer in progress: at most one chunk's
   * worth. All at once, a large transfer would sit in an outgoing queue (ours
   * for writes, the client's for read replies) and trip its bound (a peer is
   * cut off when more than `maxQueuedBytes` waits for it), however fast the
   * other side reads.
   */
  private inFlight = 0;
  /** Transfers waiting for room, in order. */
  private readonly waiting: { count: number; start(): void }[] = [];

  constructor(
    private readonly channel: DmaRequester,
    /** Largest `count` per message: the client's max_data_xfer_size (capped by our frame limit). */
    readonly chunkSize: number,
    /** The spec forbids blocking forever on the other side; QEMU's default. */
    readonly timeoutMs = 5000,
  ) {}

  /** Fills `target` from guest memory at `iova`. */
  async read(iova: bigint, target: Uint8Array): Promise<void> {
    await Promise.all(this.chunks(target.length, async (at, count) => {
      const address = iova + BigInt(at);
      // Sent at once when there is room (the common case), without a turn of the loop.
      const wait = this.room(count);
      if (wait) await wait;
      try {
        const reply = await this.channel.request(Command.DMA_READ, encodeDmaReadRequest({ address, count }), undefined, this.timeoutMs);
        const data = decodeDmaReadReply(reply.payload);
        if (data.address !== address || data.count !== count) throw mismatch(Command.DMA_READ, address, count, data);
        target.set(data.data, at);
      } finally {
        this.done(count);
      }
    }));
  }

  /** Writes `data` to guest memory at `iova`. */
  async write(iova: bigint, data: Uint8Array): Promise<void> {
    await Promise.all(this.chunks(data.length, async (at, count) => {
      const address = iova + BigInt(at);
      const wait = this.room(count);
      if (wait) await wait;
      try {
        const payload = encodeDmaWriteRequest(address, data.subarray(at, at + count));
        const reply = await this.channel.request(Command.DMA_WRITE, payload, undefined, this.timeoutMs);
        // QEMU answers with a bare header (undefined here): nothing to check.
        const echo = decodeDmaWriteReply(reply.payload);
        if (echo && (echo.address !== address || echo.count !== count)) throw mismatch(Command.DMA_WRITE, address, count, echo);
      } finally {
        this.done(count);
      }
    }));
  }

  /** Counts `count` more bytes in flight now, or returns a Promise of when they may be (in arrival order). */
  private room(count: number): Promise<void> | undefined {
    if (this.waiting.length === 0 && this.fits(count)) {
      this.inFlight += count;
      return undefined;
    }
    return new Promise((start) => this.waiting.push({ count, start }));
  }

  private done(count: number): void {
    this.inFlight -= count;
    while (this.waiting.length > 0 && this.fits(this.waiting[0].count)) {
      const next = this.waiting.shift()!;
      this.inFlight += next.count;
      next.start();
    }
  }

  private fits(count: number): boolean {
    return this.inFlight === 0 || this.inFlight + count <= this.chunkSize;
  }

  private chunks(length: number, each: (at: number, count: number) => Promise<void>): Promise<void>[] {
    const parts: Promise<void>[] = [];
    for (let at = 0; at < length; at += this.chunkSize) parts.push(each(at, Math.min(this.chunkSize, length - at)));
    return parts;
  }
}

function mismatch(command: number, address: bigint, count: number, got: { address: bigint; count: number }): ProtocolError {
  return new ProtocolError(Errno.EPROTO, command,
    `asked ${count} bytes at 0x${address.toString(16)}, the reply is for ${got.count} at 0x${got.address.toString(16)}`);
}
