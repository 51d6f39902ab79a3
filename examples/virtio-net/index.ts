/**
 * A virtio network device (virtio-net, type 1) whose wire is a port of the
 * userspace switch in ./switch.ts, reached over a UNIX socket, so NICs
 * served by separate processes (and the guests using them) share a LAN.
 *
 *   node --import tsx examples/virtio-net/switch.ts /tmp/switch.sock
 *   vfio-user serve examples/virtio-net --socket /tmp/nic0.sock -- --switch /tmp/switch.sock [--mac 52:54:00:12:34:56]
 *
 * One queue pair, no offloads: VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS
 * (link up). Frames carry the 12-byte virtio_net_hdr (VERSION_1). Receive
 * buffers wait in the device for frames; frames that find no buffer (at most
 * 256 wait) are dropped, as a NIC drops them.
 */
import { randomBytes } from 'node:crypto';
import { createConnection, type Socket } from 'node:net';
import { parseArgs } from 'node:util';
import { featureBit, UsageError, VirtioDevice, VirtioDeviceType, type DescriptorChain, type Virtqueue } from 'vfio-user';
import { FrameReader, frameMessage, MAX_FRAME } from './switch.js';

export { L2Switch } from './switch.js';

export const NetFeature = { MAC: 5, STATUS: 16 } as const;
const RECEIVE = 0;
/** virtio_net_hdr with num_buffers (§5.1.6). */
export const NET_HEADER = 12;
const NUM_BUFFERS = 10;
const LINK_UP = 1;
const MAX_WAITING_FRAMES = 256;
const MIN_FRAME = 14;

export class VirtioNet extends VirtioDevice {
  private buffers: DescriptorChain[] = [];
  private frames: Buffer[] = [];
  private wire: Socket | undefined;
  /** Frames dropped: no receive buffer, or one too small. */
  dropped = 0;

  constructor(readonly mac: Buffer) {
    if (mac.length !== 6 || (mac[0] & 1) !== 0) throw new UsageError(`MAC ${mac.toString('hex')} is not a unicast address`);
    const config = Buffer.alloc(10);
    mac.copy(config, 0);
    config.writeUInt16LE(LINK_UP, 6);
    config.writeUInt16LE(1, 8); // max_virtqueue_pairs
    super({
      deviceId: VirtioDeviceType.NET,
      classCode: 0x020000,
      features: featureBit(NetFeature.MAC) | featureBit(NetFeature.STATUS),
      queues: [{ size: 256, holds: true }, { size: 256 }],
      config,
      onQueue: (queue) => (queue.index === RECEIVE ? this.take(queue) : this.transmit(queue)),
      onReset: () => {
        this.buffers = [];
        this.frames = [];
      },
    });
  }

  /** Plugs the NIC into a switch port (a socket speaking length-prefixed frames). */
  plug(wire: Socket): void {
    this.wire = wire;
    const reader = new FrameReader();
    // A switch that goes away unplugs the cable; the NIC stays.
    wire.on('error', () => wire.destroy());
    wire.on('data', (chunk: Buffer) => {
      const frames = reader.push(chunk);
      if (!frames) return wire.destroy();
      for (const frame of frames) this.receive(frame);
    });
  }

  private transmit(queue: Virtqueue): void {
    for (let chain = queue.pop(); chain; chain = queue.pop()) {
      const length = chain.readableLength - NET_HEADER;
      // A frame without a header, or shorter or longer than Ethernet allows, goes nowhere.
      if (length >= MIN_FRAME && length <= MAX_FRAME) this.wire?.write(frameMessage(chain.readAt(NET_HEADER, length)));
      queue.complete(chain, 0);
    }
  }

  private take(queue: Virtqueue): void {
    for (let chain = queue.pop(); chain; chain = queue.pop()) this.buffers.push(chain);
    this.deliver();
  }

  private receive(frame: Buffer): void {
    if (this.frames.length >= MAX_WAITING_FRAMES) {
      this.dropped++;
      return;
    }
    this.frames.push(Buffer.from(frame));
    this.take(this.queues[RECEIVE]);
  }

  private deliver(): void {
    const queue = this.queues[RECEIVE];
    try {
      while (this.frames.length > 0 && this.buffers.length > 0) {
        const frame = this.frames.shift()!;
        const chain = this.buffers[0];
        if (chain.writableLength < NET_HEADER + frame.length) {
          this.dropped++;
          continue;
        }
        this.buffers.shift();
        const header = Buffer.alloc(NET_HEADER);
        header.writeUInt16LE(1, NUM_BUFFERS);
        chain.writeAt(0, header);
        chain.writeAt(NET_HEADER, frame);
        queue.complete(chain);
      }
    } catch (error) {
      // Guest memory went away under a held buffer (the client left): the device needs a reset.
      this.buffers = [];
      this.fail(error);
    }
  }
}

/** Parses "52:54:00:12:34:56". */
export function parseMac(text: string): Buffer {
  const bytes = text.split(':');
  if (bytes.length !== 6 || !bytes.every((b) => /^[0-9a-f]{2}$/i.test(b))) throw new UsageError(`--mac ${text}: expected six hex bytes separated by colons`);
  return Buffer.from(bytes.join(''), 'hex');
}

/** The device `vfio-user serve` serves: `--switch PATH` (required), `--mac` (default random, locally administered). */
export default async function createDevice(args: readonly string[] = []): Promise<VirtioNet> {
  const { values } = parseArgs({ args: [...args], options: { switch: { type: 'string' }, mac: { type: 'string' } }, strict: true });
  if (!values.switch) throw new UsageError('--switch PATH is required (start examples/virtio-net/switch.ts first)');
  const mac = values.mac ? parseMac(values.mac) : randomBytes(6);
  if (!values.mac) mac[0] = (mac[0] & 0xfe) | 0x02;
  const nic = new VirtioNet(mac);
  const wire = createConnection(values.switch);
  await new Promise<void>((resolve, reject) => wire.once('connect', resolve).once('error', reject));
  nic.plug(wire);
  wire.unref();
  return nic;
}
