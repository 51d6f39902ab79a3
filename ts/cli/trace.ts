/**
 * `vfio-user trace --listen PATH --connect PATH`: a man in the middle for
 * debugging. Each client (a VMM) that connects to PATH gets its own
 * connection to the server; every message passes through unchanged, fds
 * included (received, sent on, our copy closed), and is printed decoded.
 *
 * A twin socket (§4) arrives as an fd in the server's VERSION reply. Passing
 * it on unchanged would let DMA_READ/DMA_WRITE bypass the trace, so the
 * trace hands the client one end of a socket pair of its own instead and
 * relays between that and the server's twin socket, printing those too.
 */
import { closeFds, describeFailure, errnoOf, native, type NativeConnection } from '../native.js';
import { Command, decodeVersion, HEADER_SIZE } from '../protocol/index.js';
import { formatMessage, messageJson, MessageDescriber, type MessageView, type Side } from '../protocol/describe.js';

/**
 * Largest message relayed. The endpoints negotiate their own limit (1 MiB of
 * data by default); the trace only needs a bound that no sane peer reaches.
 */
const MAX_FRAME = 64 * 1024 * 1024;
/** Before retrying a failed accept (out of fds): the client waits in the backlog meanwhile. */
const ACCEPT_RETRY_MS = 100;

export interface TraceOptions {
  listen: string;
  connect: string;
  /** Permission bits of the listening socket (owner-only by default). */
  mode?: number;
  /** JSON lines instead of text. */
  json?: boolean;
  /** ANSI colors in text lines. */
  color?: boolean;
  /** Where each message line goes. */
  print(line: string): void;
  /** Where connection events and errors go. */
  log(line: string): void;
}

/** One relayed socket: what one end sends, the other receives. */
interface Relay {
  client: NativeConnection;
  server: NativeConnection;
}

class TraceSession {
  private readonly relays: Relay[] = [];
  private ended = false;

  constructor(
    readonly number: number,
    private readonly options: TraceOptions,
    private readonly onEnd: (session: TraceSession) => void,
  ) {}

  /** Relays between the client's fd and the server's fd (the main socket, or a twin). */
  relay(clientFd: number, serverFd: number, twin: boolean): void {
    const describer = new MessageDescriber({ twin });
    const socket = twin ? 'twin socket' : 'connection';
    let relay: Relay;
    const forward = (from: Side) => (buffer: ArrayBuffer, offset: number, length: number, fds: number[] | undefined, truncated: boolean): void => {
      const message = Buffer.from(buffer, offset, length);
      let received = fds ?? [];
      const view = describer.describe(from, message, received.length);
      if (truncated) view.problem = `${view.problem ? `${view.problem}; ` : ''}more fds were sent than the trace could receive`;
      if (from === 'server' && !twin) received = this.interposeTwin(message, view, received);
      this.show(view);
      try {
        (from === 'client' ? relay.server : relay.client).send(message, received);
      } catch (error) {
        this.end(`sending to the ${from === 'client' ? 'server' : 'client'} failed: ${describeFailure(errnoOf(error), (error as Error).message)}`);
      } finally {
        closeFds(received);
      }
    };
    const closed = (side: Side) => (reason?: string, errno?: number) =>
      this.end(`the ${side} ${reason !== undefined || errno !== undefined ? `${socket} broke: ${describeFailure(errno, reason)}` : `closed the ${socket}`}`);
    relay = {
      client: new native.NativeConnection(clientFd, MAX_FRAME, forward('client'), closed('client')),
      server: new native.NativeConnection(serverFd, MAX_FRAME, forward('server'), closed('server')),
    };
    this.relays.push(relay);
  }

  /**
   * A VERSION reply that turns the twin socket on carries the server's end
   * of it: keep that, relay it, and give the client a socket of ours.
   */
  private interposeTwin(message: Buffer, view: MessageView, fds: number[]): number[] {
    if (view.type !== 'reply' || view.command !== Command.VERSION) return fds;
    let fdIndex: number | undefined;
    try {
      const { twinSocket } = decodeVersion(message.subarray(HEADER_SIZE)).capabilities;
      fdIndex = twinSocket.supported ? twinSocket.fdIndex : undefined;
    } catch {
      return fds; // undecodable: passed on as it is, and shown with the reason
    }
    if (fdIndex === undefined || fdIndex >= fds.length) return fds;
    const [ours, theirs] = native.socketPair();
    const passed = fds.slice();
    passed[fdIndex] = theirs;
    this.relay(ours, fds[fdIndex], true);
    this.options.log(`session ${this.number}: relaying the twin socket`);
    return passed;
  }

  private show(view: MessageView): void {
    const { json, color, print } = this.options;
    print(json ? JSON.stringify({ session: this.number, ...messageJson(view) }) : formatMessage(view, { color }));
  }

  /** Either end leaving (or breaking) ends the whole session, twin included. */
  end(reason: string): void {
    if (this.ended) return;
    this.ended = true;
    // close() sends what is still queued first, so the last messages arrive.
    for (const { client, server } of this.relays) {
      client.close();
      server.close();
    }
    this.options.log(`session ${this.number} ended: ${reason}`);
    this.onEnd(this);
  }
}

/** Listens at once and traces every client until `stop()`. */
export function startTrace(options: TraceOptions): { stop(): void } {
  const sessions = new Set<TraceSession>();
  let count = 0;
  const listener: InstanceType<typeof native.NativeListener> = new native.NativeListener(options.listen, options.mode ?? 0o600, (fd) => {
    if (fd < 0) {
      options.log(`accept failed (errno ${-fd}); retrying`);
      setTimeout(() => listener.resume(), ACCEPT_RETRY_MS);
      return;
    }
    const session = new TraceSession(++count, options, (ended) => sessions.delete(ended));
    let serverFd: number;
    try {
      serverFd = native.connectUnix(options.connect);
    } catch (error) {
      native.closeFd(fd);
      options.log(`session ${session.number}: ${(error as Error).message}; the client was turned away`);
      return;
    }
    sessions.add(session);
    session.relay(fd, serverFd, false);
    options.log(`session ${session.number}: a client connected to ${options.listen}, relaying to ${options.connect}`);
  });
  options.log(`listening on ${options.listen}, relaying to ${options.connect}`);
  return {
    stop() {
      listener.close();
      for (const session of [...sessions]) session.end('the trace stopped');
    },
  };
}
