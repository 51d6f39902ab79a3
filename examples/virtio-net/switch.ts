/**
 * A small userspace Ethernet switch: NICs (examples/virtio-net, in their own
 * processes) connect to its UNIX socket, each connection a port, and send
 * frames as a u32 little-endian length then the frame. It learns which port
 * each source MAC is behind, forwards unicast frames there, and floods
 * broadcast, multicast and unknown destinations to every other port.
 *
 *   node --import tsx examples/virtio-net/switch.ts /tmp/switch.sock
 */
import { createServer, type Server, type Socket } from 'node:net';

/** Largest frame carried: a jumbo frame's worth; a port sending more is dropped. */
export const MAX_FRAME = 9216;
/** Ethernet header: destination MAC, source MAC, EtherType. */
const ETHER_HEADER = 14;
/** MACs remembered; past it the table starts over (a port flooding random sources cannot grow it). */
const MAX_LEARNED = 4096;

/** Splits a byte stream into length-prefixed frames; `undefined` from `push` means the peer broke framing. */
export class FrameReader {
  private buffered: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): Buffer[] | undefined {
    this.buffered = this.buffered.length === 0 ? chunk : Buffer.concat([this.buffered, chunk]);
    const frames: Buffer[] = [];
    while (this.buffered.length >= 4) {
      const length = this.buffered.readUInt32LE(0);
      if (length > MAX_FRAME) return undefined;
      if (this.buffered.length < 4 + length) break;
      frames.push(this.buffered.subarray(4, 4 + length));
      this.buffered = this.buffered.subarray(4 + length);
    }
    return frames;
  }
}

export function frameMessage(frame: Uint8Array): Buffer {
  const message = Buffer.alloc(4 + frame.length);
  message.writeUInt32LE(frame.length, 0);
  message.set(frame, 4);
  return message;
}

export class L2Switch {
  private readonly ports = new Set<Socket>();
  private readonly learned = new Map<string, Socket>();
  private readonly server: Server;

  constructor() {
    this.server = createServer((port) => this.connect(port));
  }

  listen(path: string): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(path, () => resolve());
    });
  }

  close(): Promise<void> {
    for (const port of this.ports) port.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  private connect(port: Socket): void {
    const reader = new FrameReader();
    this.ports.add(port);
    port.on('data', (chunk: Buffer) => {
      const frames = reader.push(chunk);
      if (!frames) return port.destroy();
      for (const frame of frames) this.forward(port, frame);
    });
    port.on('error', () => port.destroy());
    port.on('close', () => {
      this.ports.delete(port);
      for (const [mac, p] of this.learned) if (p === port) this.learned.delete(mac);
    });
  }

  private forward(from: Socket, frame: Buffer): void {
    if (frame.length < ETHER_HEADER) return;
    const destination = frame.subarray(0, 6);
    const source = frame.subarray(6, 12);
    // A multicast source (group bit) is bogus: never learned.
    if ((source[0] & 1) === 0) {
      if (this.learned.size >= MAX_LEARNED) this.learned.clear();
      this.learned.set(source.toString('hex'), from);
    }
    const message = frameMessage(frame);
    const known = (destination[0] & 1) === 0 ? this.learned.get(destination.toString('hex')) : undefined;
    if (known) {
      if (known !== from) known.write(message);
      return;
    }
    for (const port of this.ports) if (port !== from) port.write(message);
  }
}

// Run as a program (node --import tsx switch.ts PATH), not when imported.
if (typeof require !== 'undefined' && require.main === module) {
  const path = process.argv[2];
  if (!path) {
    console.error('usage: switch.ts SOCKET');
    process.exit(2);
  }
  const l2 = new L2Switch();
  l2.listen(path).then(() => console.error(`switch: listening on ${path}`));
  process.on('SIGTERM', () => void l2.close().then(() => process.exit(0)));
}
