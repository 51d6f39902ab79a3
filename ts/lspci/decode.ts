/**
 * Pure decoding of what `vfio-user lspci` fetched from a server: the config
 * bytes plus the region and IRQ info the server reported, into one typed
 * report that format.ts prints and `--json` serialises.
 *
 * BAR sizes come from DEVICE_GET_REGION_INFO (region i is BAR i), never from
 * BAR sizing: sizing writes all-ones to the BAR, which changes device state
 * under a VMM that may be using it. The BAR registers are only read, for the
 * type bits and the address the guest assigned.
 */
import { DeviceInfoFlags, IrqInfoFlags, Region, RegionCapId, RegionInfoFlags, type DeviceInfo, type IrqInfo, type RegionInfo } from '../protocol/index.js';
import { BarBits, Cfg, Command, CONFIG_HEADER_END, CONFIG_SIZE, HeaderType, NUM_BARS, Rom, Status } from '../pci/spec.js';
import { COMMAND_FLAGS, decodeFlags, field, register, STATUS_FLAGS, type Flags, type FlagTable, type Register } from './registers.js';
import { className, devselTiming, IRQ_NAMES, REGION_NAMES } from './names.js';
import { walkCapabilities, type Capability, type CapabilityChain } from './caps.js';
import { walkExtendedCapabilities, type ExtendedCapability } from './ext-caps.js';

/** One region or IRQ query: the server's answer, or why it failed. */
export type Answer<T> = { index: number; info: T } | { index: number; error: string };

/** Everything fetched from the server; the input of decode(). */
export interface DeviceSnapshot {
  device: DeviceInfo;
  regions: Answer<RegionInfo>[];
  irqs: Answer<IrqInfo>[];
  /** Config space as read: 256 bytes, or 4 KiB for PCIe. */
  config: Buffer;
  /** Problems met while fetching that did not stop it. */
  warnings: string[];
}

export interface BarReport {
  index: number;
  kind: 'io' | 'memory';
  /** '32-bit', '64-bit', 'low-1M' or 'type 3' (reserved); memory BARs only. */
  memoryType?: string;
  prefetchable?: boolean;
  /** The address the guest assigned (0 = unassigned). */
  address: bigint;
  /** From the region info; 0 when the server reports no region for it. */
  size: bigint;
  /** Whether the command register enables decoding of this BAR's space. */
  enabled: boolean;
}

export interface RomReport {
  address: number;
  enabled: boolean;
  size: bigint;
}

export type RegionCapReport =
  | { kind: 'sparse-mmap'; areas: { offset: bigint; size: bigint }[] }
  | { kind: 'type'; type: number; subtype: number };

export interface RegionReport {
  index: number;
  name?: string;
  size?: bigint;
  offset?: bigint;
  flags?: Flags;
  caps?: RegionCapReport[];
  unknownCapIds?: number[];
  error?: string;
}

export interface IrqReport {
  index: number;
  name?: string;
  count?: number;
  flags?: Flags;
  error?: string;
}

export interface LspciReport {
  vendorId: number;
  deviceId: number;
  /** Type-0 headers only. */
  subsystem?: { vendorId: number; deviceId: number };
  class: { base: number; sub: number; progIf: number; name?: string; progIfName?: string };
  revision: number;
  headerType: { raw: number; layout: number; multifunction: boolean };
  command: Register;
  status: Register & { devsel: string };
  latencyTimer: number;
  cacheLineBytes: number;
  /** `pin` is the register (1-4 = INTA-INTD, 0 = none); `pinName` its letter. */
  interrupt: { pin: number; pinName?: 'A' | 'B' | 'C' | 'D'; line: number };
  bars: BarReport[];
  rom?: RomReport;
  capabilities: CapabilityChain<Capability>;
  /** Absent when config space is only the conventional 256 bytes. */
  extendedCapabilities?: CapabilityChain<ExtendedCapability>;
  vfioUser: {
    flags: Flags;
    numRegions: number;
    numIrqs: number;
    regions: RegionReport[];
    irqs: IrqReport[];
  };
  warnings: string[];
}

const DEVICE_FLAGS: FlagTable = [['PCI', Math.log2(DeviceInfoFlags.PCI)], ['RESET', Math.log2(DeviceInfoFlags.RESET)]];
const REGION_FLAGS: FlagTable = [['R', Math.log2(RegionInfoFlags.READ)], ['W', Math.log2(RegionInfoFlags.WRITE)], ['MMAP', Math.log2(RegionInfoFlags.MMAP)]];
const IRQ_FLAGS: FlagTable = [
  ['EVENTFD', Math.log2(IrqInfoFlags.EVENTFD)], ['MASKABLE', Math.log2(IrqInfoFlags.MASKABLE)],
  ['AUTOMASKED', Math.log2(IrqInfoFlags.AUTOMASKED)], ['NORESIZE', Math.log2(IrqInfoFlags.NORESIZE)],
];
const MEMORY_TYPES = ['32-bit', 'low-1M', '64-bit', 'type 3'];
const INTERRUPT_PINS = ['A', 'B', 'C', 'D'] as const;

function regionSize(snapshot: DeviceSnapshot, index: number): bigint {
  const answer = snapshot.regions.find((r) => r.index === index);
  return answer && 'info' in answer ? answer.info.size : 0n;
}

/**
 * BARs of a type-0 header. A BAR exists when the server reports a region for
 * it or its register is non-zero (an unassigned 32-bit memory BAR reads 0).
 */
function decodeBars(snapshot: DeviceSnapshot, command: number): BarReport[] {
  const c = snapshot.config;
  const bars: BarReport[] = [];
  for (let i = 0; i < NUM_BARS; i++) {
    const raw = c.readUInt32LE(Cfg.BAR0 + 4 * i);
    const size = regionSize(snapshot, i);
    if (raw === 0 && size === 0n) continue;
    if (raw & BarBits.IO_SPACE) {
      bars.push({ index: i, kind: 'io', address: BigInt((raw & BarBits.IO_ADDRESS_MASK) >>> 0), size, enabled: (command & Command.IO) !== 0 });
      continue;
    }
    const type = field(raw, BarBits.MEM_TYPE_SHIFT, BarBits.MEM_TYPE_MASK);
    const wide = type === BarBits.MEM_TYPE_64 && i + 1 < NUM_BARS;
    const high = wide ? BigInt(c.readUInt32LE(Cfg.BAR0 + 4 * (i + 1))) : 0n;
    bars.push({
      index: i,
      kind: 'memory',
      memoryType: MEMORY_TYPES[type],
      prefetchable: (raw & BarBits.MEM_PREFETCHABLE) !== 0,
      address: (high << 32n) | BigInt((raw & BarBits.MEM_ADDRESS_MASK) >>> 0),
      size,
      enabled: (command & Command.MEMORY) !== 0,
    });
    // The next slot is this BAR's upper half, not a BAR of its own.
    if (wide) i++;
  }
  return bars;
}

function decodeRom(snapshot: DeviceSnapshot): RomReport | undefined {
  const raw = snapshot.config.readUInt32LE(Cfg.ROM_ADDRESS);
  const size = regionSize(snapshot, Region.ROM);
  const address = (raw & Rom.ADDRESS_MASK) >>> 0;
  if (address === 0 && size === 0n) return undefined;
  return { address, enabled: (raw & Rom.ENABLE) !== 0, size };
}

function decodeRegion(answer: Answer<RegionInfo>): RegionReport {
  const name = REGION_NAMES[answer.index];
  if ('error' in answer) return { index: answer.index, name, error: answer.error };
  const { info } = answer;
  const caps = info.caps.map((cap): RegionCapReport =>
    cap.id === RegionCapId.SPARSE_MMAP
      ? { kind: 'sparse-mmap', areas: cap.areas.map((a) => ({ offset: a.offset, size: a.size })) }
      : { kind: 'type', type: cap.type, subtype: cap.subtype },
  );
  return {
    index: answer.index,
    name,
    size: info.size,
    offset: info.offset,
    flags: decodeFlags(info.flags, REGION_FLAGS),
    caps,
    unknownCapIds: info.unknownCapIds,
  };
}

function decodeIrq(answer: Answer<IrqInfo>): IrqReport {
  const name = IRQ_NAMES[answer.index];
  if ('error' in answer) return { index: answer.index, name, error: answer.error };
  return { index: answer.index, name, count: answer.info.count, flags: decodeFlags(answer.info.flags, IRQ_FLAGS) };
}

/** Decodes a snapshot; config must hold at least the 64-byte header. */
export function decode(snapshot: DeviceSnapshot): LspciReport {
  const c = snapshot.config;
  if (c.length < CONFIG_HEADER_END) throw new RangeError(`config space is ${c.length} bytes, shorter than the ${CONFIG_HEADER_END}-byte header`);
  const command = c.readUInt16LE(Cfg.COMMAND);
  const status = c.readUInt16LE(Cfg.STATUS);
  const headerType = c[Cfg.HEADER_TYPE];
  const layout = headerType & HeaderType.LAYOUT_MASK;
  const normal = layout === HeaderType.NORMAL;
  const [base, sub, progIf] = [c[Cfg.BASE_CLASS], c[Cfg.SUBCLASS], c[Cfg.CLASS_PROG_IF]];
  const names = className(base, sub, progIf);
  const pin = c[Cfg.INTERRUPT_PIN];
  const warnings = [...snapshot.warnings];
  if (!normal) warnings.push(`header type ${layout} is not a type-0 header: BARs, ROM and subsystem are not decoded`);
  return {
    vendorId: c.readUInt16LE(Cfg.VENDOR_ID),
    deviceId: c.readUInt16LE(Cfg.DEVICE_ID),
    subsystem: normal ? { vendorId: c.readUInt16LE(Cfg.SUBSYSTEM_VENDOR_ID), deviceId: c.readUInt16LE(Cfg.SUBSYSTEM_ID) } : undefined,
    class: { base, sub, progIf, name: names.name, progIfName: names.progIf },
    revision: c[Cfg.REVISION],
    headerType: { raw: headerType, layout, multifunction: (headerType & HeaderType.MULTIFUNCTION) !== 0 },
    command: register(command, COMMAND_FLAGS),
    status: { ...register(status, STATUS_FLAGS), devsel: devselTiming(field(status, Status.DEVSEL_SHIFT, Status.DEVSEL_MASK)) },
    latencyTimer: c[Cfg.LATENCY_TIMER],
    // The register counts dwords.
    cacheLineBytes: c[Cfg.CACHE_LINE_SIZE] * 4,
    interrupt: { pin, pinName: INTERRUPT_PINS[pin - 1], line: c[Cfg.INTERRUPT_LINE] },
    bars: normal ? decodeBars(snapshot, command) : [],
    rom: normal ? decodeRom(snapshot) : undefined,
    capabilities: walkCapabilities(c),
    extendedCapabilities: c.length > CONFIG_SIZE ? walkExtendedCapabilities(c) : undefined,
    vfioUser: {
      flags: decodeFlags(snapshot.device.flags, DEVICE_FLAGS),
      numRegions: snapshot.device.numRegions,
      numIrqs: snapshot.device.numIrqs,
      regions: snapshot.regions.map(decodeRegion),
      irqs: snapshot.irqs.map(decodeIrq),
    },
    warnings,
  };
}
