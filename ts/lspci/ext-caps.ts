/**
 * The PCI Express extended capability list (0x100-0xFFF): a bounded walk and
 * decoders for AER, Device Serial Number and Vendor-Specific Extended; other
 * IDs are named when known. Like caps.ts, bad device data ends the walk with
 * a `problem` rather than an exception.
 */
import { Aer, CONFIG_SIZE, Dsn, ExtCap, ExtendedCapabilityId, Vsec } from '../pci/spec.js';
import { AER_CAP_FLAGS, AER_CE_FLAGS, AER_UE_FLAGS, field, register, type Register } from './registers.js';
import { extendedCapabilityName } from './names.js';
import type { CapabilityChain } from './caps.js';

interface ExtendedBase {
  offset: number;
  id: number;
  version: number;
}

export interface AerCap extends ExtendedBase {
  kind: 'aer';
  uncorrectableStatus: Register;
  uncorrectableMask: Register;
  uncorrectableSeverity: Register;
  correctableStatus: Register;
  correctableMask: Register;
  control: Register & { firstErrorPointer: number };
  headerLog: number[];
}

export interface SerialNumberCap extends ExtendedBase {
  kind: 'serial-number';
  serial: bigint;
}

export interface VendorExtendedCap extends ExtendedBase {
  kind: 'vendor';
  vsecId: number;
  vsecRevision: number;
  vsecLength: number;
}

export interface OtherExtendedCap extends ExtendedBase {
  kind: 'other';
  name?: string;
}

/** The capability's registers run past the end of config space. */
export interface TruncatedExtendedCap extends ExtendedBase {
  kind: 'truncated';
}

export type ExtendedCapability = AerCap | SerialNumberCap | VendorExtendedCap | OtherExtendedCap | TruncatedExtendedCap;

function aer(c: Buffer, base: ExtendedBase): AerCap {
  const at = base.offset;
  const control = c.readUInt32LE(at + Aer.CAP_CONTROL);
  const headerLog: number[] = [];
  for (let i = 0; i < Aer.HEADER_LOG_DWORDS; i++) headerLog.push(c.readUInt32LE(at + Aer.HEADER_LOG + 4 * i));
  return {
    ...base,
    kind: 'aer',
    uncorrectableStatus: register(c.readUInt32LE(at + Aer.UE_STATUS), AER_UE_FLAGS),
    uncorrectableMask: register(c.readUInt32LE(at + Aer.UE_MASK), AER_UE_FLAGS),
    uncorrectableSeverity: register(c.readUInt32LE(at + Aer.UE_SEVERITY), AER_UE_FLAGS),
    correctableStatus: register(c.readUInt32LE(at + Aer.CE_STATUS), AER_CE_FLAGS),
    correctableMask: register(c.readUInt32LE(at + Aer.CE_MASK), AER_CE_FLAGS),
    control: { ...register(control, AER_CAP_FLAGS), firstErrorPointer: control & Aer.FIRST_ERROR_MASK },
    headerLog,
  };
}

function vendor(c: Buffer, base: ExtendedBase): VendorExtendedCap {
  const header = c.readUInt32LE(base.offset + Vsec.HEADER);
  return {
    ...base,
    kind: 'vendor',
    vsecId: header & Vsec.ID_MASK,
    vsecRevision: field(header, Vsec.REV_SHIFT, Vsec.REV_MASK),
    vsecLength: header >>> Vsec.LENGTH_SHIFT,
  };
}

export function decodeExtendedCapability(c: Buffer, at: number): ExtendedCapability {
  const header = c.readUInt32LE(at);
  const base: ExtendedBase = { offset: at, id: header & ExtCap.ID_MASK, version: field(header, ExtCap.VERSION_SHIFT, ExtCap.VERSION_MASK) };
  try {
    switch (base.id) {
      case ExtendedCapabilityId.AER: return aer(c, base);
      case ExtendedCapabilityId.SERIAL_NUMBER: return { ...base, kind: 'serial-number', serial: c.readBigUInt64LE(at + Dsn.SERIAL) };
      case ExtendedCapabilityId.VENDOR: return vendor(c, base);
      default: return { ...base, kind: 'other', name: extendedCapabilityName(base.id) };
    }
  } catch (error) {
    if (error instanceof RangeError) return { ...base, kind: 'truncated' };
    throw error;
  }
}

/**
 * Walks the list from 0x100. Each step visits a new dword-aligned offset in
 * 0x100-0xFFC, so the walk ends after at most 960 capabilities. A header of 0
 * at 0x100 means "no extended capabilities".
 */
export function walkExtendedCapabilities(c: Buffer): CapabilityChain<ExtendedCapability> {
  const items: ExtendedCapability[] = [];
  const seen = new Set<number>();
  for (let at = CONFIG_SIZE; at !== 0; ) {
    if (at < CONFIG_SIZE || at + 4 > c.length) return { items, problem: { at, reason: 'out of range' } };
    if (seen.has(at)) return { items, problem: { at, reason: 'looped' } };
    seen.add(at);
    const header = c.readUInt32LE(at);
    if (header === ExtCap.BROKEN) return { items, problem: { at, reason: 'broken' } };
    if (header === 0 && at === CONFIG_SIZE) return { items };
    items.push(decodeExtendedCapability(c, at));
    // The low two bits of the pointer are reserved.
    at = (header >>> ExtCap.NEXT_SHIFT) & ~3;
  }
  return { items };
}
