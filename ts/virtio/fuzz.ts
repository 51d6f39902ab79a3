/**
 * The virtio fuzz mode: a hostile virtio driver for `vfio-user fuzz` and
 * `fuzzDevice()` (docs/testing.md). It sets the device up as Linux would,
 * with split or packed rings, then offers descriptor chains built from
 * seeded random parts (buffers in guest memory, outside it and across its
 * end, loops, wild `next` indices and buffer IDs, chains running on past
 * what was made available, every flag combination, indirect tables nested
 * or not, request headers a device type may parse), lies about the
 * available index (or the packed ring's position and wrap counter), and
 * writes the common and device configuration and the status byte at random. After each
 * chain offered to a device it had just set up, the device owes an answer
 * within the deadline: a used entry, or NEEDS_RESET. Silence is a 'stalled'
 * finding.
 */
import { big, hex, type FuzzContext, type FuzzMode, type FuzzOp } from '../fuzz/mode.js';
import type { Random } from '../fuzz/random.js';
import { PackedDriverQueue, VirtioDriver } from './driver.js';
import { Common, Desc, Feature, featureBit, Status, VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE, VirtioDeviceType } from './spec.js';

export type VirtioOp = FuzzOp & { readonly mode: 'virtio' };

/** Guest memory from here up holds the fuzzer's buffers; the driver's rings sit below. */
const DATA_OFFSET = 2 << 20;
const DATA_SIZE = 1 << 20;
/** Where an op's indirect table goes, inside the data area. */
const TABLE_OFFSET = DATA_OFFSET + DATA_SIZE;
const TABLE_ENTRIES = 8;
/** Device types whose queue 0 receives: its chains wait in the device for input, by design. */
const RECEIVING = new Set<number>([VirtioDeviceType.NET, VirtioDeviceType.CONSOLE]);
/** Request headers worth sending: virtio-blk's types, and nonsense. */
const REQUEST_TYPES = [0, 0, 1, 1, 4, 8, 11, 13, 2, 0xffffffff];
const LENGTHS = [0, 1, 7, 16, 17, 512, 513, 4096, 65536, 0xffffffff];
const COMMON_FIELDS = Object.entries(Common).filter(([name]) => name !== 'SIZE');

function descriptor(random: Random, memorySize: number) {
  // Mostly in the data area, where a device does its work; the rest where it must refuse.
  const addr = random.weighted<() => bigint>([
    [() => BigInt(DATA_OFFSET + random.below(DATA_SIZE)), 12],
    [() => BigInt(TABLE_OFFSET), 1],
    [() => -0x1000n, 1],
    [() => BigInt(memorySize - 8), 1],
    [() => BigInt(memorySize) + 0x10000n, 1],
  ])();
  const flags = random.weighted([[0, 4], [Desc.F_WRITE, 4], [Desc.F_NEXT, 4], [Desc.F_NEXT | Desc.F_WRITE, 4], [Desc.F_INDIRECT, 2], [random.below(8), 1], [0xffff, 1]]);
  return { addr: hex(BigInt.asUintN(64, addr)), len: random.chance(0.7) ? random.pick([16, 512, 4096, 1]) : random.pick(LENGTHS), flags, next: random.chance(0.8) ? random.below(8) : random.pick([255, 256, 0xffff]) };
}

function generate(random: Random): VirtioOp {
  const memorySize = 4 << 20;
  const queue = random.chance(0.9) ? random.below(4) : 0xffff;
  // The ring layout of the next set-up this op causes.
  const packed = random.chance(0.5);
  switch (random.weighted([['chain', 10], ['avail', 1], ['common', 2], ['status', 1], ['config', 1], ['notify', 1]] as const)) {
    case 'chain': {
      const count = random.between(1, 6);
      const header = Buffer.alloc(16);
      header.writeUInt32LE(random.pick(REQUEST_TYPES), 0);
      header.writeBigUInt64LE(random.chance(0.8) ? BigInt(random.below(64)) : random.u64(), 8);
      return {
        mode: 'virtio', kind: 'chain', queue, packed, setUp: random.chance(0.8), head: random.chance(0.95) ? 0 : random.pick([7, 255, 256, 0xffff]),
        descs: Array.from({ length: count }, () => descriptor(random, memorySize)),
        table: Array.from({ length: random.below(TABLE_ENTRIES + 1) }, () => descriptor(random, memorySize)),
        header: header.toString('hex'),
      };
    }
    case 'avail':
      return { mode: 'virtio', kind: 'avail', queue, packed, index: random.chance(0.5) ? random.below(4) : Number(random.edgeValue(2)) };
    case 'common': {
      const [, offset] = random.pick(COMMON_FIELDS);
      const width = random.pick([1, 2, 4, 8] as const);
      return { mode: 'virtio', kind: 'common', packed, offset: offset + (random.chance(0.9) ? 0 : random.below(4)), width, value: hex(random.edgeValue(width)) };
    }
    case 'status':
      return { mode: 'virtio', kind: 'status', packed, value: random.chance(0.5) ? random.below(256) : random.pick([0, 1, 3, 11, 15, 7, 0x4f, 0x80]) };
    case 'config':
      return { mode: 'virtio', kind: 'config', packed, offset: random.below(80), length: random.pick([1, 2, 4, 8]), value: random.hexBytes(8), write: random.chance(0.5) };
    case 'notify':
      return { mode: 'virtio', kind: 'notify', packed, queue: random.chance(0.8) ? random.below(4) : random.below(0x10000) };
  }
}

/** The virtio mode; `fuzzDevice(device, { modes: [virtioMode()] })`. */
export function virtioMode(): FuzzMode<VirtioOp> {
  let driver: VirtioDriver | undefined;
  /** Whether the device is as `initialize` left it: then a chain must be answered. */
  let fresh = false;

  const setUp = async (ctx: FuzzContext, packed: boolean): Promise<VirtioDriver> => {
    driver?.close();
    driver = await VirtioDriver.connect(ctx.client, { memory: ctx.memory, iova: ctx.memoryIova, mapped: true });
    const offersPacked = ((await driver.deviceFeatures()) & featureBit(Feature.RING_PACKED)) !== 0n;
    await driver.initialize({ queueSize: 64, ring: packed && offersPacked ? 'packed' : 'split' });
    // Chains here are raw: the driver's completion bookkeeping must not see them.
    for (const q of driver.queues) q.forget();
    fresh = true;
    return driver;
  };

  return {
    name: 'virtio',
    weight: 3,
    refuses(device) {
      const vendor = device.config.readUInt16LE(0);
      const id = device.config.readUInt16LE(2);
      return vendor === VIRTIO_PCI_VENDOR && id >= VIRTIO_PCI_DEVICE_BASE ? undefined : `${vendor.toString(16)}:${id.toString(16)} is not a modern virtio device`;
    },
    generate: (random) => generate(random),
    async restart() {
      driver?.close();
      driver = undefined;
      fresh = false;
    },
    async run(op, ctx) {
      // A chain goes to a device just set up (then it must be answered) or, sometimes, to whatever state the ops before left.
      const current = driver && driver.client === ctx.client ? driver : undefined;
      let d = current && !(op.kind === 'chain' && op.setUp && !fresh) ? current : await setUp(ctx, op.packed === true);
      const queue = Number(op.queue) % d.queues.length;
      const descCount = op.kind === 'chain' ? (op.descs as unknown[]).length : 0;
      // A packed ring gets entries back only as used entries are collected: one too full for the chain is set up again.
      const ring = d.queues[queue];
      if (ring instanceof PackedDriverQueue && ring.freeEntries < descCount) d = await setUp(ctx, true);
      const q = d.queues[queue];
      const packed = q instanceof PackedDriverQueue;
      const at = (offset: number) => ctx.memoryIova + BigInt(offset);
      switch (op.kind) {
        case 'chain': {
          // Addresses are offsets into guest memory; a negative one or one past its end is outside.
          const place = (raw: { addr: string; len: number; flags: number; next: number }) => ({ ...raw, addr: BigInt.asUintN(64, ctx.memoryIova + big(raw.addr)) });
          const table = (op.table as { addr: string; len: number; flags: number; next: number }[]).map(place);
          const bytes = Buffer.alloc(TABLE_ENTRIES * Desc.SIZE);
          // Split tables have flags then next; packed ones an ID then flags.
          table.forEach((e, i) => {
            bytes.writeBigUInt64LE(e.addr, i * 16);
            bytes.writeUInt32LE(e.len, i * 16 + 8);
            bytes.writeUInt16LE(packed ? e.next : e.flags, i * 16 + 12);
            bytes.writeUInt16LE(packed ? e.flags : e.next, i * 16 + 14);
          });
          d.at(at(TABLE_OFFSET), bytes.length).set(bytes);
          const descs = (op.descs as { addr: string; len: number; flags: number; next: number }[]).map(place);
          // The first readable buffer starts with a request header a device may parse.
          const first = descs[0];
          if (first.addr >= at(DATA_OFFSET) && first.addr + 16n <= at(DATA_OFFSET + DATA_SIZE)) d.at(first.addr, 16).set(Buffer.from(String(op.header), 'hex'));
          // A receive queue keeps good chains until input comes: only a broken one owes an answer now.
          const receiving = q.index === 0 && RECEIVING.has(ctx.device.config.readUInt16LE(2) - VIRTIO_PCI_DEVICE_BASE);
          const owed = fresh && !receiving;
          // A packed queue counts used entries by collecting them: only while driver and device agree on the ring.
          const before = owed ? q.usedIndex : 0;
          if (packed) {
            // Chained as the driver says (NEXT on all but the last, which may chain on into nothing), `head` the buffer ID.
            q.offerChain(descs.map((e, i) => ({ addr: e.addr, len: e.len, flags: i + 1 < descs.length ? e.flags | Desc.F_NEXT : e.flags })), Number(op.head));
          } else {
            const split = d.split(queue);
            descs.forEach((e, i) => split.writeDescriptor(i, e));
            split.offer(Number(op.head));
          }
          await q.kick();
          if (!owed) return;
          await ctx.waitFor('a used entry or NEEDS_RESET after a chain', async () => q.usedIndex !== before || ((await d.status()) & Status.NEEDS_RESET) !== 0);
          // A device that took the chain stays set up; one that needs a reset gets one next time.
          if (((await d.status()) & Status.NEEDS_RESET) !== 0) fresh = false;
          return;
        }
        case 'avail':
          if (q instanceof PackedDriverQueue) q.setAvailPosition(Number(op.index) & 0x7fff, (Number(op.index) & 0x8000) !== 0);
          else d.split(queue).setAvailIndex(Number(op.index));
          await q.kick();
          break;
        case 'common':
          await d.writeCommon(Number(op.offset), Number(op.width) as 1 | 2 | 4 | 8, big(op.value));
          break;
        case 'status':
          await d.setStatus(Number(op.value));
          break;
        case 'config': {
          const offset = Number(op.offset);
          const length = Number(op.length);
          // Past the configuration's end reads zeros and drops writes; the region itself is large enough.
          if (op.write) await d.writeConfig(offset, Buffer.from(String(op.value), 'hex').subarray(0, length)).catch(() => undefined);
          else await d.readConfig(offset, length).catch(() => undefined);
          break;
        }
        case 'notify':
          await d.notifyQueue(Number(op.queue) & 0xffff, Number(op.queue) & 0x3ff);
          break;
      }
      fresh = false;
    },
  };
}
