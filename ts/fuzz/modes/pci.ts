/**
 * The generic mode: a hostile VMM that knows PCI and the protocol but not
 * the device. Config space (BAR sizing, the command register, capability
 * enables, MSI and MSI-X), region accesses of every size, offset and
 * alignment including out of range, MSI-X tables and PBA, DMA windows that
 * overlap, move and vanish, interrupt wiring and teardown, resets (DEVICE_RESET
 * and FLR), migration state changes and data, dirty page logging, and
 * disconnects with a request in flight. Every run includes it.
 */
import { MigrationState, ProtocolError, Region } from '../../protocol/index.js';
import { Cfg, DevCtl, Express, NUM_BARS, MsiX } from '../../pci/spec.js';
import { big, GUEST_MEMORY, hex, type DeviceProfile, type FuzzContext, type FuzzMode, type FuzzOp, type OpValue } from '../mode.js';
import type { Random } from '../random.js';

export type PciOp = FuzzOp & { readonly mode: 'pci' };

const U64_MAX = (1n << 64n) - 1n;
/** Access sizes worth trying: every width a CPU makes, odd ones, and a few long ones. */
const COUNTS = [0, 1, 1, 2, 2, 3, 4, 4, 4, 5, 7, 8, 8, 16, 64, 256, 4096];
const MIGRATION_STATES = [...Object.values(MigrationState), 8, 0xffff];

/** A `count`-byte access to a region of `size` bytes, mostly at its edges. */
function regionOffset(random: Random, size: bigint, count: number): bigint {
  const c = BigInt(count);
  const inside = size > 0n ? (random.u64() % size) : 0n;
  const aligned = count > 0 && size > 0n ? inside - (inside % c) : inside;
  // Mostly inside, where the device's own code runs; the rest past the end, where the library must refuse.
  const edge = random.chance(0.75)
    ? random.pick([0n, size - c, aligned, aligned, aligned, aligned, inside])
    : random.pick([size - 1n, size, size + 1n, size + 0x1000n, U64_MAX, U64_MAX - c + 1n, 1n << 63n]);
  return edge < 0n ? 0n : edge & U64_MAX;
}

function pickRegion(random: Random, device: DeviceProfile): number {
  if (random.chance(0.03)) return random.pick([device.info.numRegions, 0xff, 0xffffffff]);
  const implemented = device.regions.filter((r) => r.size > 0n);
  if (implemented.length === 0) return random.below(Math.max(device.info.numRegions, 1));
  return random.pick(implemented).index;
}

/** A config write aimed where a device is likely to mind. */
function configWrite(random: Random, device: DeviceProfile): PciOp {
  const write = (offset: number, width: number, value = random.edgeValue(width)): PciOp => {
    const bytes = Buffer.alloc(width);
    for (let i = 0; i < width; i++) bytes[i] = Number((value >> BigInt(8 * i)) & 0xffn);
    return { mode: 'pci', kind: 'config-write', offset, data: bytes.toString('hex') };
  };
  const caps = [...device.capabilities, ...device.extendedCapabilities];
  switch (random.below(8)) {
    case 0: // BAR sizing, or a BAR moved anywhere; the ROM BAR too
      return random.chance(0.85)
        ? write(Cfg.BAR0 + 4 * random.below(NUM_BARS), 4, random.chance(0.6) ? 0xffffffffn : random.edgeValue(4))
        : write(Cfg.ROM_ADDRESS, 4);
    case 1:
      return write(Cfg.COMMAND, 2);
    case 2:
    case 3: { // somewhere in a capability: enables, masks, table sizes
      if (caps.length === 0) break;
      const cap = random.pick(caps);
      const width = random.pick([1, 2, 4]);
      return write(cap.offset + random.below(24), width);
    }
    case 4: // MSI-X: enable and function mask bits in every combination
      if (!device.msix) break;
      return write(device.msix.offset + MsiX.CONTROL, 2, BigInt(random.below(4) << 14));
    default:
      break;
  }
  const size = Number(device.regions[Region.CONFIG]?.size ?? 256n);
  const width = random.pick([1, 2, 4, 4, 3, 8]);
  return write(random.chance(0.9) ? random.below(size) : size - random.below(8), width);
}

/** A write to the MSI-X table or PBA, where a guest programs vectors. */
function msixWrite(random: Random, device: DeviceProfile): PciOp | undefined {
  const msix = device.msix;
  if (!msix) return undefined;
  const pba = random.chance(0.2);
  const base = pba ? msix.pbaOffset : msix.tableOffset;
  const span = pba ? Math.ceil(msix.vectors / 64) * 8 : msix.vectors * MsiX.ENTRY_SIZE;
  const width = random.pick([4, 4, 4, 8, 2, 1]);
  const offset = base + random.below(span + 16);
  return { mode: 'pci', kind: 'region-write', region: pba ? msix.pbaRegion : msix.tableRegion, offset: hex(offset), data: random.hexBytes(width) };
}

function irqOp(random: Random, device: DeviceProfile): PciOp {
  const index = random.chance(0.9) && device.irqs.length > 0 ? random.below(device.irqs.length) : random.pick([device.info.numIrqs, 0xffffffff]);
  if (random.chance(0.15)) return { mode: 'pci', kind: 'irq-info', index };
  const vectors = device.irqs[index]?.count ?? 1;
  const start = random.chance(0.8) ? random.below(Math.max(vectors, 1)) : random.pick([vectors, 0xffffffff, 2048]);
  const count = random.chance(0.8) ? random.between(0, Math.max(vectors - start, 1)) : random.pick([vectors + 1, 0xffffffff, 0]);
  const data = random.weighted([['eventfd', 4], ['deassign', 2], ['none', 2], ['bool', 2]] as const);
  const action = data === 'eventfd' || data === 'deassign' ? 'trigger' : random.pick(['trigger', 'mask', 'unmask']);
  const op: Record<string, OpValue> = { mode: 'pci', kind: 'set-irqs', index, start, action, data };
  if (data === 'eventfd') op.eventfds = Array.from({ length: Math.min(random.between(1, 8), Math.max(count, 1)) }, () => random.below(8));
  else if (data === 'bool') op.bools = Array.from({ length: Math.min(count, 64) }, () => random.chance(0.5));
  else op.count = count;
  return op as PciOp;
}

function dmaOp(random: Random): PciOp {
  const page = 0x1000;
  const pages = GUEST_MEMORY.size / page;
  // Near the fuzzer's own window (overlapping, moved), or anywhere.
  const iova = random.chance(0.7) ? GUEST_MEMORY.iova + BigInt((random.below(2 * pages) - pages / 2) * page) : random.u64() & ~0xfffn;
  switch (random.below(6)) {
    case 0:
      return { mode: 'pci', kind: 'dma-unmap-all' };
    case 1:
    case 2:
      return { mode: 'pci', kind: 'dma-unmap', iova: hex(iova), size: hex(BigInt(random.between(1, pages) * page)) };
    default: {
      const offset = random.below(pages) * page;
      const size = random.between(1, pages - offset / page) * page;
      return { mode: 'pci', kind: 'dma-map', iova: hex(iova), offset, size, readable: random.chance(0.9), writable: random.chance(0.8) };
    }
  }
}

/** Dirty page logging's page sizes and lengths: the usual, and what a server must refuse. */
const LOG_PAGE_SIZES = [0x1000n, 0x1000n, 0x200000n, 0n, 3n, 1n << 63n];
const LOG_LENGTHS = [BigInt(GUEST_MEMORY.size), 0x1000n, 0n, 0x1001n, 1n << 34n];

function migrationOp(random: Random): PciOp {
  const iova = () => hex(random.chance(0.8) ? GUEST_MEMORY.iova + BigInt(random.below(GUEST_MEMORY.size / 0x1000) * 0x1000) : random.u64());
  switch (random.below(7)) {
    case 0:
      return { mode: 'pci', kind: 'migration-read', size: random.pick([0, 1, 16, 4096, 65536]) };
    case 1:
      return { mode: 'pci', kind: 'migration-write', data: random.hexBytes(random.pick([0, 1, 8, 64, 512])) };
    case 2: {
      const ranges = Array.from({ length: random.below(4) }, () => ({ iova: iova(), length: hex(random.pick(LOG_LENGTHS)) }));
      return { mode: 'pci', kind: 'dirty-start', pageSize: hex(random.pick(LOG_PAGE_SIZES)), ranges };
    }
    case 3:
      return random.chance(0.5)
        ? { mode: 'pci', kind: 'dirty-stop' }
        : { mode: 'pci', kind: 'dirty-report', iova: iova(), length: hex(random.pick(LOG_LENGTHS)), pageSize: hex(random.pick(LOG_PAGE_SIZES)) };
    default:
      return { mode: 'pci', kind: 'migration-state', state: random.pick(MIGRATION_STATES) };
  }
}

function accessOp(random: Random, device: DeviceProfile, write: boolean): PciOp {
  const region = pickRegion(random, device);
  const size = device.regions[region]?.size ?? 0x1000n;
  const count = write ? Math.max(1, random.pick(COUNTS)) : random.pick(COUNTS);
  const offset = hex(regionOffset(random, size, count));
  return write ? { mode: 'pci', kind: 'region-write', region, offset, data: random.hexBytes(count) } : { mode: 'pci', kind: 'region-read', region, offset, count };
}

export function generatePciOp(random: Random, device: DeviceProfile): PciOp {
  const kind = random.weighted([
    ['config-read', 6], ['config-write', 14], ['region-read', 14], ['region-write', 14], ['msix', 4], ['irq', 8],
    ['dma', 6], ['reset', 1], ['flr', 1], ['migration', device.migration ? 3 : 0.2], ['disconnect', 1], ['burst', 3],
  ] as const);
  switch (kind) {
    case 'config-read': {
      const size = Number(device.regions[Region.CONFIG]?.size ?? 256n);
      const count = random.pick(COUNTS);
      return { mode: 'pci', kind: 'region-read', region: Region.CONFIG, offset: hex(regionOffset(random, BigInt(size), count)), count };
    }
    case 'config-write':
      return configWrite(random, device);
    case 'region-read':
      return accessOp(random, device, false);
    case 'region-write':
      return accessOp(random, device, true);
    case 'msix':
      return msixWrite(random, device) ?? accessOp(random, device, true);
    case 'irq':
      return irqOp(random, device);
    case 'dma':
      return dmaOp(random);
    case 'reset':
      return { mode: 'pci', kind: 'reset' };
    case 'flr':
      return { mode: 'pci', kind: 'flr' };
    case 'migration':
      return migrationOp(random);
    case 'disconnect':
      return { mode: 'pci', kind: 'disconnect', inflight: accessOp(random, device, random.chance(0.5)) };
    case 'burst':
      return { mode: 'pci', kind: 'burst', ops: Array.from({ length: random.between(2, 8) }, () => accessOp(random, device, random.chance(0.5))) };
  }
}

async function runPciOp(op: PciOp, ctx: FuzzContext): Promise<void> {
  const client = ctx.client;
  switch (op.kind) {
    case 'region-read':
      await client.regionRead(op.region as number, big(op.offset), op.count as number);
      return;
    case 'region-write':
    case 'config-write': {
      const region = op.kind === 'config-write' ? Region.CONFIG : (op.region as number);
      const offset = op.kind === 'config-write' ? BigInt(op.offset as number) : big(op.offset);
      await client.regionWrite(region, offset, Buffer.from(op.data as string, 'hex'));
      return;
    }
    case 'irq-info':
      await client.getIrqInfo(op.index as number);
      return;
    case 'set-irqs': {
      const { index, start, action } = op as unknown as { index: number; start: number; action: 'trigger' | 'mask' | 'unmask' };
      if (op.data === 'eventfd') await client.setIrqs({ index, start, action, eventfds: (op.eventfds as number[]).map((i) => ctx.eventfds[i % ctx.eventfds.length]) });
      else if (op.data === 'deassign') await client.setIrqs({ index, start, action, count: op.count as number, eventfds: [] });
      else if (op.data === 'bool') await client.setIrqs({ index, start, action, bools: op.bools as boolean[] });
      else await client.setIrqs({ index, start, action, count: op.count as number });
      // Whatever the device signalled is drained, so counters never saturate over a long run.
      for (const eventfd of ctx.eventfds) eventfd.take();
      return;
    }
    case 'dma-map':
      await client.dmaMap({ iova: big(op.iova), memory: ctx.memory, offset: op.offset as number, size: op.size as number, readable: op.readable as boolean, writable: op.writable as boolean });
      return;
    case 'dma-unmap':
      await client.dmaUnmap(big(op.iova), big(op.size));
      return;
    case 'dma-unmap-all':
      await client.dmaUnmapAll();
      return;
    case 'reset':
      await client.reset();
      return;
    case 'flr': {
      const express = ctx.device.express;
      if (!express) return;
      const control = await client.pci.read(express.offset + Express.DEVCTL, 2);
      await client.pci.write(express.offset + Express.DEVCTL, 2, control | DevCtl.INITIATE_FLR);
      return;
    }
    case 'migration-state':
      if (!ctx.device.migration) return;
      await client.migration.setState(op.state as MigrationState);
      return;
    case 'migration-read':
      await client.migDataRead(op.size as number);
      return;
    case 'migration-write':
      await client.migDataWrite(Buffer.from(op.data as string, 'hex'));
      return;
    case 'dirty-start':
      await client.migration.startDirtyLogging(big(op.pageSize), (op.ranges as { iova: string; length: string }[]).map((r) => ({ iova: big(r.iova), length: big(r.length) })));
      return;
    case 'dirty-stop':
      await client.migration.stopDirtyLogging();
      return;
    case 'dirty-report':
      await client.migration.dirtyReport(big(op.iova), big(op.length), big(op.pageSize));
      return;
    case 'disconnect': {
      // The request goes out, the connection goes before its reply: the server must cope and serve the next client.
      const inflight = runPciOp(op.inflight as PciOp, ctx).catch(() => undefined);
      await ctx.reconnect();
      await inflight;
      return;
    }
    case 'burst': {
      // Pipelined: the requests are all in flight before the first reply is read.
      const results = await Promise.allSettled((op.ops as PciOp[]).map((inner) => runPciOp(inner, ctx)));
      // A finding (a missing reply) outranks the error replies around it.
      const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => r.reason as unknown);
      if (failed.length > 0) throw failed.find((reason) => !(reason instanceof ProtocolError)) ?? failed[0];
      return;
    }
    default:
      throw new Error(`pci mode: unknown op kind ${op.kind}`);
  }
}

/** Reads leave the device as it was (a burst or a disconnect may carry writes). */
const READS = new Set(['region-read', 'irq-info', 'migration-read', 'dirty-report']);

export const pciMode: FuzzMode<PciOp> = {
  name: 'pci',
  weight: 1,
  generate: generatePciOp,
  run: runPciOp,
  disturbs: (op) => !READS.has(op.kind),
};
