/**
 * Message-based DMA: guest memory the client mapped without an fd is reached
 * with DMA_READ/DMA_WRITE requests to the client (§6.10), split at the
 * client's max_data_xfer_size and pipelined. Replies are matched by the
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
      const reply = await this.channel.request(Command.DMA_READ, encodeDmaReadRequest({ address, count }), undefined, this.timeoutMs);
      const data = decodeDmaReadReply(reply.payload);
      if (data.address !== address || data.count !== count) throw mismatch(Command.DMA_READ, address, count, data);
      target.set(data.data, at);
    }));
  }

  /** Writes `data` to guest memory at `iova`. */
  async write(iova: bigint, data: Uint8Array): Promise<void> {
    await Promise.all(this.chunks(data.length, async (at, count) => {
      const address = iova + BigInt(at);
      const payload = encodeDmaWriteRequest(address, data.subarray(at, at + count));
      const reply = await this.channel.request(Command.DMA_WRITE, payload, undefined, this.timeoutMs);
      // QEMU answers with a bare header (undefined here): nothing to check.
      const echo = decodeDmaWriteReply(reply.payload);
      if (echo && (echo.address !== address || echo.count !== count)) throw mismatch(Command.DMA_WRITE, address, count, echo);
    }));
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
