/**
 * The standard capability list (0x40-0xFF): a bounded walk of the chain and
 * a decoder per capability. A chain that loops, points outside the list or
 * reads as 0xFF ends the walk with a `problem`; a capability whose body runs
 * past the config bytes we have is reported as truncated. Nothing here throws
 * on bad device data: a broken server is something to show, not a crash.
 */
import {
  Cap, CAP_ID_BROKEN, CapabilityId, Cfg, CONFIG_HEADER_END, CONFIG_SIZE, DevCap, DevCtl, Express, LnkCap, LnkCtl, Msi, MsiX,
  Pm, PortType, Status, Vendor,
} from '../pci/spec.js';
import {
  DEVCAP_FLAGS, DEVCTL_ERROR_FLAGS, DEVCTL_FLAGS, DEVSTA_FLAGS, field, LNKCAP_FLAGS, LNKCTL_FLAGS, LNKSTA_FLAGS,
  PMC_FLAGS, PMC_PME_FLAGS, PMCSR_FLAGS, register, type Flags, type Register,
} from './registers.js';
import {
  aspmControl, aspmSupport, capabilityName, l0sLatency, l1Latency, linkSpeed, PM_AUX_CURRENT_MA, portTypeName, SLOT_POWER_SCALES,
} from './names.js';

export type ChainProblemReason = 'looped' | 'out of range' | 'broken';

/** Why a walk stopped early; `at` is the offending pointer. */
export interface ChainProblem {
  at: number;
  reason: ChainProblemReason;
}

export interface CapabilityChain<C> {
  items: C[];
  problem?: ChainProblem;
}

interface CapabilityBase {
  /** Where the capability sits in config space. */
  offset: number;
  id: number;
}

export interface PowerManagementCap extends CapabilityBase {
  kind: 'power-management';
  version: number;
  pmc: Register;
  auxCurrentMa: number;
  /** Power states PME can be signalled from. */
  pmeFrom: Flags;
  pmcsr: Register;
  powerState: number;
  dataSelect: number;
  dataScale: number;
}

export interface MsiCap extends CapabilityBase {
  kind: 'msi';
  control: number;
  enabled: boolean;
  vectorsCapable: number;
  vectorsEnabled: number;
  is64Bit: boolean;
  maskable: boolean;
  address: bigint;
  data: number;
  /** Only with per-vector masking. */
  mask?: number;
  pending?: number;
}

export interface MsiXLocation {
  bar: number;
  offset: number;
}

export interface MsiXCap extends CapabilityBase {
  kind: 'msi-x';
  control: number;
  enabled: boolean;
  functionMasked: boolean;
  tableSize: number;
  table: MsiXLocation;
  pba: MsiXLocation;
}

export interface ExpressLink {
  capability: Register & { port: number; speed: string; width: number; aspm: string; l0sExit: string; l1Exit: string };
  control: Register & { aspm: string; readCompletionBoundary: number };
  status: Register & { speed: string; width: number };
}

export interface ExpressCap extends CapabilityBase {
  kind: 'express';
  version: number;
  portType: number;
  portTypeName: string;
  interruptMessage: number;
  deviceCapabilities: Register & {
    maxPayload: number;
    phantomFunctions: number;
    l0sLatency: string;
    l1Latency: string;
    slotPowerLimitW: number;
  };
  deviceControl: Register & { errorReporting: Flags; maxPayload: number; maxReadRequest: number };
  deviceStatus: Register;
  /** Absent for port types without a link (root-complex integrated endpoints, event collectors). */
  link?: ExpressLink;
}

export interface VendorCap extends CapabilityBase {
  kind: 'vendor';
  length: number;
}

/** A capability we name at most: its ID and the 16 bits after the header. */
export interface OtherCap extends CapabilityBase {
  kind: 'other';
  name?: string;
  flags: number;
}

/** The capability's registers run past the end of the config bytes. */
export interface TruncatedCap extends CapabilityBase {
  kind: 'truncated';
}

export type Capability = PowerManagementCap | MsiCap | MsiXCap | ExpressCap | VendorCap | OtherCap | TruncatedCap;

function powerManagement(c: Buffer, at: number): PowerManagementCap {
  const pmc = c.readUInt16LE(at + Pm.PMC);
  const pmcsr = c.readUInt16LE(at + Pm.PMCSR);
  return {
    kind: 'power-management',
    offset: at,
    id: CapabilityId.POWER_MANAGEMENT,
    version: pmc & Pm.VERSION_MASK,
    pmc: register(pmc, PMC_FLAGS),
    auxCurrentMa: PM_AUX_CURRENT_MA[field(pmc, Pm.AUX_CURRENT_SHIFT, Pm.AUX_CURRENT_MASK)],
    pmeFrom: register(pmc, PMC_PME_FLAGS).flags,
    pmcsr: register(pmcsr, PMCSR_FLAGS),
    powerState: pmcsr & Pm.STATE_MASK,
    dataSelect: field(pmcsr, Pm.DATA_SELECT_SHIFT, Pm.DATA_SELECT_MASK),
    dataScale: field(pmcsr, Pm.DATA_SCALE_SHIFT, Pm.DATA_SCALE_MASK),
  };
}

function msi(c: Buffer, at: number): MsiCap {
  const control = c.readUInt16LE(at + Msi.CONTROL);
  const is64Bit = (control & Msi.ADDRESS_64) !== 0;
  const maskable = (control & Msi.MASKABLE) !== 0;
  const low = BigInt(c.readUInt32LE(at + Msi.ADDRESS_LO));
  const high = is64Bit ? BigInt(c.readUInt32LE(at + Msi.ADDRESS_HI_64)) : 0n;
  const cap: MsiCap = {
    kind: 'msi',
    offset: at,
    id: CapabilityId.MSI,
    control,
    enabled: (control & Msi.ENABLE) !== 0,
    vectorsCapable: 1 << field(control, Msi.CAPABLE_SHIFT, Msi.LOG2_MASK),
    vectorsEnabled: 1 << field(control, Msi.ENABLED_SHIFT, Msi.LOG2_MASK),
    is64Bit,
    maskable,
    address: (high << 32n) | low,
    data: c.readUInt16LE(at + (is64Bit ? Msi.DATA_64 : Msi.DATA_32)),
  };
  if (maskable) {
    cap.mask = c.readUInt32LE(at + (is64Bit ? Msi.MASK_64 : Msi.MASK_32));
    cap.pending = c.readUInt32LE(at + (is64Bit ? Msi.PENDING_64 : Msi.PENDING_32));
  }
  return cap;
}

function msiXLocation(value: number): MsiXLocation {
  return { bar: value & MsiX.BIR_MASK, offset: (value & ~MsiX.BIR_MASK) >>> 0 };
}

function msiX(c: Buffer, at: number): MsiXCap {
  const control = c.readUInt16LE(at + MsiX.CONTROL);
  return {
    kind: 'msi-x',
    offset: at,
    id: CapabilityId.MSIX,
    control,
    enabled: (control & MsiX.ENABLE) !== 0,
    functionMasked: (control & MsiX.FUNCTION_MASK) !== 0,
    tableSize: (control & MsiX.TABLE_SIZE_MASK) + 1,
    table: msiXLocation(c.readUInt32LE(at + MsiX.TABLE)),
    pba: msiXLocation(c.readUInt32LE(at + MsiX.PBA)),
  };
}

function expressLink(c: Buffer, at: number): ExpressLink {
  const cap = c.readUInt32LE(at + Express.LNKCAP);
  const ctl = c.readUInt16LE(at + Express.LNKCTL);
  const sta = c.readUInt16LE(at + Express.LNKSTA);
  return {
    capability: {
      ...register(cap, LNKCAP_FLAGS),
      port: cap >>> LnkCap.PORT_SHIFT,
      speed: linkSpeed(cap & LnkCap.SPEED_MASK),
      width: field(cap, LnkCap.WIDTH_SHIFT, LnkCap.WIDTH_MASK),
      aspm: aspmSupport(field(cap, LnkCap.ASPM_SHIFT, LnkCap.ASPM_MASK)),
      l0sExit: l0sLatency(field(cap, LnkCap.L0S_SHIFT, LnkCap.LATENCY_MASK)),
      l1Exit: l1Latency(field(cap, LnkCap.L1_SHIFT, LnkCap.LATENCY_MASK)),
    },
    control: {
      ...register(ctl, LNKCTL_FLAGS),
      aspm: aspmControl(ctl & LnkCtl.ASPM_MASK),
      readCompletionBoundary: ctl & LnkCtl.RCB_128 ? 128 : 64,
    },
    status: {
      ...register(sta, LNKSTA_FLAGS),
      speed: linkSpeed(sta & LnkCap.SPEED_MASK),
      width: field(sta, LnkCap.WIDTH_SHIFT, LnkCap.WIDTH_MASK),
    },
  };
}

function express(c: Buffer, at: number): ExpressCap {
  const flags = c.readUInt16LE(at + Express.FLAGS);
  const portType = field(flags, Express.TYPE_SHIFT, Express.TYPE_MASK);
  const devCap = c.readUInt32LE(at + Express.DEVCAP);
  const devCtl = c.readUInt16LE(at + Express.DEVCTL);
  // DevCtl bit 15 means "Initiate FLR" only on functions that can do FLR.
  const devCtlFlags = devCap & DevCap.FLR ? DEVCTL_FLAGS : DEVCTL_FLAGS.filter(([token]) => token !== 'FLReset');
  const hasLink = portType !== PortType.RC_INTEGRATED_ENDPOINT && portType !== PortType.RC_EVENT_COLLECTOR;
  return {
    kind: 'express',
    offset: at,
    id: CapabilityId.PCI_EXPRESS,
    version: flags & Express.VERSION_MASK,
    portType,
    portTypeName: portTypeName(portType),
    interruptMessage: field(flags, Express.IRQ_SHIFT, Express.IRQ_MASK),
    deviceCapabilities: {
      ...register(devCap, DEVCAP_FLAGS),
      maxPayload: 128 << (devCap & DevCap.PAYLOAD_MASK),
      phantomFunctions: (1 << field(devCap, DevCap.PHANTOM_SHIFT, DevCap.PHANTOM_MASK)) - 1,
      l0sLatency: l0sLatency(field(devCap, DevCap.L0S_SHIFT, DevCap.LATENCY_MASK)),
      l1Latency: l1Latency(field(devCap, DevCap.L1_SHIFT, DevCap.LATENCY_MASK)),
      slotPowerLimitW: slotPowerLimit(
        field(devCap, DevCap.POWER_VALUE_SHIFT, DevCap.POWER_VALUE_MASK),
        field(devCap, DevCap.POWER_SCALE_SHIFT, DevCap.POWER_SCALE_MASK),
      ),
    },
    deviceControl: {
      ...register(devCtl, devCtlFlags),
      errorReporting: register(devCtl, DEVCTL_ERROR_FLAGS).flags,
      maxPayload: 128 << field(devCtl, DevCtl.PAYLOAD_SHIFT, DevCtl.SIZE_MASK),
      maxReadRequest: 128 << field(devCtl, DevCtl.READ_REQUEST_SHIFT, DevCtl.SIZE_MASK),
    },
    deviceStatus: register(c.readUInt16LE(at + Express.DEVSTA), DEVSTA_FLAGS),
    link: hasLink ? expressLink(c, at) : undefined,
  };
}

/** Decodes the capability at `at` (its header is known to be within `c`). */
export function decodeCapability(c: Buffer, at: number): Capability {
  const id = c[at + Cap.ID];
  try {
    switch (id) {
      case CapabilityId.POWER_MANAGEMENT: return powerManagement(c, at);
      case CapabilityId.MSI: return msi(c, at);
      case CapabilityId.MSIX: return msiX(c, at);
      case CapabilityId.PCI_EXPRESS: return express(c, at);
      case CapabilityId.VENDOR: return { kind: 'vendor', offset: at, id, length: c.readUInt8(at + Vendor.LENGTH) };
      default: return { kind: 'other', offset: at, id, name: capabilityName(id), flags: c.readUInt16LE(at + Cap.FLAGS) };
    }
  } catch (error) {
    // Buffer reads past the end throw RangeError: the body does not fit.
    if (error instanceof RangeError) return { kind: 'truncated', offset: at, id };
    throw error;
  }
}

/**
 * Walks the list from the pointer at 0x34. Every step visits a new offset in
 * 0x40-0xFC, so the walk ends after at most 48 capabilities whatever the
 * device returns.
 */
export function walkCapabilities(c: Buffer): CapabilityChain<Capability> {
  const items: Capability[] = [];
  if (!(c.readUInt16LE(Cfg.STATUS) & Status.CAPABILITIES)) return { items };
  const end = Math.min(c.length, CONFIG_SIZE);
  const seen = new Set<number>();
  for (let at = c[Cfg.CAPABILITIES] & Cap.POINTER_MASK; at !== 0; at = c[at + Cap.NEXT] & Cap.POINTER_MASK) {
    if (at < CONFIG_HEADER_END || at + Cap.HEADER_SIZE > end) return { items, problem: { at, reason: 'out of range' } };
    if (seen.has(at)) return { items, problem: { at, reason: 'looped' } };
    seen.add(at);
    if (c[at + Cap.ID] === CAP_ID_BROKEN) return { items, problem: { at, reason: 'broken' } };
    items.push(decodeCapability(c, at));
  }
  return { items };
}

/**
 * Watts of a Slot Power Limit (value, scale). Since PCIe 4.0, scale 00b with
 * values F0h-F2h means 250, 275 and 300 W; F3h and up mean more than 300 W
 * and are reported as 300.
 */
function slotPowerLimit(value: number, scale: number): number {
  if (scale === 0 && value >= 0xf0) return value >= 0xf2 ? 300 : 250 + 25 * (value - 0xf0);
  return value * SLOT_POWER_SCALES[scale];
}
