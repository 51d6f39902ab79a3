/**
 * A virtio network device (virtio-net, type 1) whose wire is either a port of
 * the userspace switch in ./switch.ts, reached over a UNIX socket, so NICs
 * served by separate processes (and the guests using them) share a LAN; or
 * a host TAP interface, so the guest's NIC reaches the host's network stack.
 *
 *   node --import tsx examples/virtio-net/switch.ts /tmp/switch.sock
 *   vfio-user serve examples/virtio-net --socket /tmp/nic0.sock -- --switch /tmp/switch.sock [--mac 52:54:00:12:34:56]
 *   vfio-user serve examples/virtio-net --socket /tmp/nic1.sock -- --tap tap0 [--mac ...]
 *
 * One queue pair, no offloads: VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS (link
 * up; down once the wire goes away) and, on a TAP, VIRTIO_NET_F_MTU with the
 * interface's MTU. Frames carry the 12-byte virtio_net_hdr (VERSION_1),
 * which is also the TAP's vnet header; no offload is negotiated, so the
 * device sends the host a zeroed one whatever the guest wrote, and gives the
 * guest a zeroed one. Receive buffers wait in the device for frames (one too
 * small for the next frame is returned empty, the frame dropped). Frames
 * from the switch that find no buffer (at most 256 wait) are dropped, as a
 * NIC drops them; a TAP is not read while no buffer waits, so the host's
 * kernel holds its frames (up to the interface's txqueuelen, then drops).
 */
import { randomBytes } from 'node:crypto';
import { createConnection, type Socket } from 'node:net';
import { parseArgs } from 'node:util';
import { featureBit, TapInterface, UsageError, VirtioDevice, VirtioDeviceType, type DescriptorChain, type Virtqueue } from 'vfio-user';
import { FrameReader, frameMessage, MAX_FRAME } from './switch.js';

export { L2Switch } from './switch.js';

export const NetFeature = { MTU: 3, MAC: 5, STATUS: 16 } as const;
const RECEIVE = 0;
/** virtio_net_hdr with num_buffers (§5.1.6). */
export const NET_HEADER = 12;
const NUM_BUFFERS = 10;
const LINK_UP = 1;
const STATUS_OFFSET = 6;
const MAX_WAITING_FRAMES = 256;
const MIN_FRAME = 14;
/** Ethernet header and a VLAN tag: what a frame carries beyond the MTU. */
const FRAME_OVERHEAD = 18;
/** The MTUs Linux accepts on an Ethernet interface. */
const MIN_MTU = 68;
const MAX_MTU = 65535;

export interface NetOptions {
  /** Offer VIRTIO_NET_F_MTU with this MTU (68-65535); frames the guest sends are then bounded by it. */
  mtu?: number;
}

export class VirtioNet extends VirtioDevice {
  private buffers: DescriptorChain[] = [];
  /** Packets from the switch waiting for a buffer (header room, then the frame). */
  private frames: Buffer[] = [];
  private wire: Socket | undefined;
  private tap: TapInterface | undefined;
  /** The largest frame the guest may send. */
  private readonly maxFrame: number;
  /** Frames dropped on the way in: no receive buffer, or one too small. */
  dropped = 0;
  /** Frames the host refused on the way out (a TAP that is down). */
  transmitDropped = 0;

  constructor(
    readonly mac: Buffer,
    options: NetOptions = {},
  ) {
    if (mac.length !== 6 || (mac[0] & 1) !== 0) throw new UsageError(`MAC ${mac.toString('hex')} is not a unicast address`);
    const { mtu } = options;
    if (mtu !== undefined && !(Number.isInteger(mtu) && mtu >= MIN_MTU && mtu <= MAX_MTU)) throw new UsageError(`MTU ${mtu} is not an integer in ${MIN_MTU}..${MAX_MTU}`);
    const config = Buffer.alloc(12);
    mac.copy(config, 0);
    config.writeUInt16LE(LINK_UP, STATUS_OFFSET);
    config.writeUInt16LE(1, 8); // max_virtqueue_pairs
    config.writeUInt16LE(mtu ?? 0, 10);
    super({
      deviceId: VirtioDeviceType.NET,
      classCode: 0x020000,
      features: featureBit(NetFeature.MAC) | featureBit(NetFeature.STATUS) | (mtu === undefined ? 0n : featureBit(NetFeature.MTU)),
      queues: [{ size: 256, holds: true }, { size: 256 }],
      config,
      onQueue: (queue) => (queue.index === RECEIVE ? this.take(queue) : this.transmit(queue)),
      onReset: () => {
        this.buffers = [];
        this.frames = [];
      },
    });
    this.maxFrame = mtu === undefined ? MAX_FRAME : mtu + FRAME_OVERHEAD;
  }

  /** Plugs the NIC into a switch port (a socket speaking length-prefixed frames); the NIC owns it from now on. */
  plug(wire: Socket): void {
    this.wire = wire;
    const reader = new FrameReader();
    // A switch that goes away unplugs the cable; the NIC stays.
    wire.on('error', () => wire.destroy());
    wire.on('close', () => {
      if (this.wire === wire) this.unplug();
    });
    wire.on('data', (chunk: Buffer) => {
      const frames = reader.push(chunk);
      if (!frames) return wire.destroy();
      for (const frame of frames) this.receive(frame);
    });
  }

  /** Makes host TAP interface `tap` the NIC's wire; the NIC owns it from now on. */
  attach(tap: TapInterface): void {
    this.tap = tap;
    tap.watch(() => this.deliver());
  }

  /** Closes the device and its wire (a TAP it created goes away). */
  override close(): void {
    this.disconnect();
    super.close();
  }

  /** The cable is gone: the link goes down, and the guest hears it. */
  private unplug(): void {
    this.disconnect();
    this.updateConfig((config) => config.writeUInt16LE(0, STATUS_OFFSET));
  }

  private disconnect(): void {
    const { wire, tap } = this;
    this.wire = undefined;
    this.tap = undefined;
    wire?.destroy();
    tap?.close();
  }

  private transmit(queue: Virtqueue): void {
    for (let chain = queue.pop(); chain; chain = queue.pop()) {
      const length = chain.readableLength - NET_HEADER;
      // A frame without a header, or shorter or longer than Ethernet (or the MTU) allows, goes nowhere.
      if (length >= MIN_FRAME && length <= this.maxFrame) this.send(chain, length);
      queue.complete(chain, 0);
    }
  }

  private send(chain: DescriptorChain, length: number): void {
    if (this.tap) {
      const packet = chain.read();
      // No offload was negotiated: nothing the guest put in the header is for the host.
      packet.fill(0, 0, NET_HEADER);
      if (this.tap.write(packet) !== 0) this.transmitDropped++;
    } else {
      this.wire?.write(frameMessage(chain.readAt(NET_HEADER, length)));
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
    const packet = Buffer.alloc(NET_HEADER + frame.length);
    frame.copy(packet, NET_HEADER);
    this.frames.push(packet);
    this.deliver();
  }

  /** Fills receive buffers with waiting packets, while both last. */
  private deliver(): void {
    const queue = this.queues[RECEIVE];
    try {
      for (let packet = this.next(); packet; packet = this.next()) {
        const chain = this.buffers.shift()!;
        if (chain.writableLength < packet.length) {
          // Too small (a driver without MRG_RXBUF posts whole-frame buffers): the frame is
          // dropped and the buffer goes back empty, so it cannot hold up the ones behind it.
          this.dropped++;
          queue.complete(chain, 0);
          continue;
        }
        // No offload was negotiated: flags and GSO fields are 0, whatever the host said.
        packet.fill(0, 0, NET_HEADER);
        packet.writeUInt16LE(1, NUM_BUFFERS);
        chain.writeAt(0, packet);
        queue.complete(chain);
      }
    } catch (error) {
      // Guest memory went away under a held buffer (the client left): the device needs a reset.
      this.buffers = [];
      this.fail(error);
    }
  }

  /**
   * The next packet for a receive buffer, if a buffer is free: from the
   * switch's queue, or read from the TAP. The TAP is read only while buffers
   * are free, so its frames wait in the host's kernel, not here.
   */
  private next(): Buffer | undefined {
    const free = this.buffers.length > 0;
    if (!this.tap) return free ? this.frames.shift() : undefined;
    this.tap.reading = free;
    if (!free) return undefined;
    try {
      return this.tap.read();
    } catch {
      // The interface was deleted under us (EBADFD): the cable is gone.
      this.unplug();
      return undefined;
    }
  }
}

/** Parses "52:54:00:12:34:56". */
export function parseMac(text: string): Buffer {
  const bytes = text.split(':');
  if (bytes.length !== 6 || !bytes.every((b) => /^[0-9a-f]{2}$/i.test(b))) throw new UsageError(`--mac ${text}: expected six hex bytes separated by colons`);
  return Buffer.from(bytes.join(''), 'hex');
}

/**
 * The device `vfio-user serve` serves: `--switch PATH` or `--tap NAME` (one
 * of them), `--mac` (default random, locally administered).
 */
export default async function createDevice(args: readonly string[] = []): Promise<VirtioNet> {
  const { values } = parseArgs({ args: [...args], options: { switch: { type: 'string' }, tap: { type: 'string' }, mac: { type: 'string' } }, strict: true });
  if (!values.switch === !values.tap) throw new UsageError('one of --switch PATH (start examples/virtio-net/switch.ts first) or --tap NAME is required');
  const mac = values.mac ? parseMac(values.mac) : randomBytes(6);
  if (!values.mac) mac[0] = (mac[0] & 0xfe) | 0x02;
  if (values.tap) {
    const tap = TapInterface.open(values.tap);
    const nic = new VirtioNet(mac, { mtu: tap.mtu });
    nic.attach(tap);
    return nic;
  }
  const nic = new VirtioNet(mac);
  const wire = createConnection(values.switch!);
  await new Promise<void>((resolve, reject) => wire.once('connect', resolve).once('error', reject));
  nic.plug(wire);
  wire.unref();
  return nic;
}
