/**
 * A virtio console (virtio-console, type 3) with one port bridged to a host
 * stream: this process's stdin and stdout, or a UNIX socket it listens on
 * (one connection at a time). Linux's virtio_console binds it as /dev/hvc0.
 *
 *   vfio-user serve examples/virtio-console --socket /tmp/con.sock [-- --listen /tmp/console.sock]
 *
 * The receive queue's buffers wait in the device until the host sends
 * something; host input waits (the stream paused) until the driver gives
 * buffers. VIRTIO_CONSOLE_F_EMERG_WRITE is offered: a byte written to
 * `emerg_wr` goes out at once.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { parseArgs } from 'node:util';
import type { Readable, Writable } from 'node:stream';
import { featureBit, VirtioDevice, VirtioDeviceType, type DescriptorChain, type Virtqueue } from 'vfio-user';

export const ConsoleFeature = { SIZE: 0, MULTIPORT: 1, EMERG_WRITE: 2 } as const;
const RECEIVE = 0;
/** `struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr. */
const CONFIG_SIZE = 12;
const EMERG_WR = 8;
/** Host input held while the guest gives no buffers; past it the stream is paused. */
const MAX_PENDING = 64 * 1024;

export class VirtioConsole extends VirtioDevice {
  /** Receive buffers the driver gave, oldest first. */
  private buffers: DescriptorChain[] = [];
  /** Host input not yet delivered. */
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private input: Readable | undefined;
  private output: Writable | undefined;

  constructor() {
    super({
      deviceId: VirtioDeviceType.CONSOLE,
      classCode: 0x078000,
      features: featureBit(ConsoleFeature.EMERG_WRITE),
      // The receive queue's chains wait for host input: migration carries them instead of waiting.
      queues: [{ size: 64, holds: true }, { size: 64 }],
      config: new Uint8Array(CONFIG_SIZE),
      configWrite: (offset, data) => {
        if (offset === EMERG_WR && data.length >= 1) this.output?.write(data.subarray(0, 1));
      },
      onQueue: (queue) => (queue.index === RECEIVE ? this.take(queue) : this.transmit(queue)),
      onReset: () => {
        // The kit forgot the chains; what the host sent before the reset is dropped with them.
        this.buffers = [];
        this.pending = [];
        this.pendingBytes = 0;
        this.input?.resume();
      },
    });
  }

  /** Bridges the port to `input` and `output` (replacing any earlier pair). */
  attachStream(input: Readable, output: Writable): void {
    this.input?.removeAllListeners('data');
    this.input = input;
    this.output = output;
    input.on('data', (chunk: Buffer) => this.receive(chunk));
  }

  private transmit(queue: Virtqueue): void {
    for (let chain = queue.pop(); chain; chain = queue.pop()) {
      if (chain.readableLength > 0) this.output?.write(chain.read());
      queue.complete(chain, 0);
    }
  }

  private take(queue: Virtqueue): void {
    for (let chain = queue.pop(); chain; chain = queue.pop()) this.buffers.push(chain);
    this.deliver();
  }

  private receive(chunk: Buffer): void {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    if (this.pendingBytes > MAX_PENDING) this.input?.pause();
    // Buffers the driver gave without a notification (suppressed, or before a migration) count too.
    this.take(this.queues[RECEIVE]);
  }

  /** Fills the oldest buffers with the oldest input. */
  private deliver(): void {
    const queue = this.queues[RECEIVE];
    try {
      while (this.pending.length > 0 && this.buffers.length > 0) {
        const chain = this.buffers.shift()!;
        const data = Buffer.concat(this.pending);
        const n = Math.min(data.length, chain.writableLength);
        chain.writeAt(0, data.subarray(0, n));
        queue.complete(chain, n);
        this.pending = n < data.length ? [data.subarray(n)] : [];
        this.pendingBytes = data.length - n;
      }
    } catch (error) {
      // Guest memory went away under a held buffer (the client left): the device needs a reset.
      this.buffers = [];
      this.fail(error);
    }
    if (this.pendingBytes <= MAX_PENDING) this.input?.resume();
  }
}

/** `--listen PATH`: a UNIX socket whose current connection is the port; else stdin and stdout. */
export default function createDevice(args: readonly string[] = []): VirtioConsole {
  const { values } = parseArgs({ args: [...args], options: { listen: { type: 'string' } }, strict: true });
  const console_ = new VirtioConsole();
  if (!values.listen) {
    console_.attachStream(process.stdin, process.stdout);
    return console_;
  }
  let current: Socket | undefined;
  const server: Server = createServer((socket) => {
    current?.destroy();
    current = socket;
    socket.on('error', () => socket.destroy());
    console_.attachStream(socket, socket);
  });
  server.listen(values.listen);
  server.unref();
  return console_;
}
