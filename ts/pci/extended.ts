/**
 * PCIe extended capabilities (§10.4): Device Serial Number, Vendor-Specific
 * Extended and Advanced Error Reporting. Their headers (ID, version, next)
 * are written by `chainExtended`; this module defines what follows.
 */
import type { ConfigSpace } from './config.js';
import {
  checkUint,
  InvalidDeviceError,
  type ExtendedCapability,
  type VendorExtendedCapability,
} from './description.js';
import { checkRegisters, defineRegisters } from './registers.js';
import { Aer, Dsn, ExtendedCapabilityId, Vsec } from './spec.js';

export const extendedId: Record<ExtendedCapability['kind'], number> = {
  aer: ExtendedCapabilityId.AER,
  dsn: ExtendedCapabilityId.SERIAL_NUMBER,
  vsec: ExtendedCapabilityId.VENDOR,
};

/** Capability Version field of each header. */
export const extendedVersion: Record<ExtendedCapability['kind'], number> = { aer: 2, dsn: 1, vsec: 1 };

export function extendedSize(c: ExtendedCapability): number {
  switch (c.kind) {
    case 'dsn': return Dsn.SIZE;
    // Version 2 with the TLP prefix log, as QEMU and Linux size it.
    case 'aer': return Aer.SIZE_V2;
    case 'vsec': return Vsec.HEADERS_SIZE + c.data.length;
  }
}

export function checkExtended(c: ExtendedCapability, field: string): void {
  switch (c.kind) {
    case 'dsn':
      if (typeof c.serial !== 'bigint' || BigInt.asUintN(64, c.serial) !== c.serial) {
        throw new InvalidDeviceError(`${field}.serial`, `${String(c.serial)} is not a 64-bit unsigned bigint`);
      }
      return;
    case 'vsec':
      checkUint(`${field}.vsecId`, c.vsecId, 16);
      checkUint(`${field}.vsecRevision`, c.vsecRevision, 4);
      checkRegisters(c, field, Vsec.MAX_LENGTH - Vsec.HEADERS_SIZE);
      return;
    case 'aer':
      return;
    default:
      throw new InvalidDeviceError(`${field}.kind`, `${String((c as { kind: unknown }).kind)} is not one of dsn, vsec, aer`);
  }
}

export function defineExtended(config: ConfigSpace, at: number, c: ExtendedCapability, field: string): void {
  switch (c.kind) {
    case 'dsn':
      config.define(at + Dsn.SERIAL, 4, Number(c.serial & 0xffffffffn));
      config.define(at + Dsn.SERIAL + 4, 4, Number(c.serial >> 32n));
      return;
    case 'vsec':
      defineVsec(config, at, c, field);
      return;
    case 'aer':
      defineAer(config, at);
      return;
  }
}

function defineVsec(config: ConfigSpace, at: number, c: VendorExtendedCapability, field: string): void {
  const length = Vsec.HEADERS_SIZE + c.data.length;
  config.define(at + Vsec.HEADER, 4, (c.vsecId | ((c.vsecRevision ?? 0) << Vsec.REV_SHIFT) | (length << Vsec.LENGTH_SHIFT)) >>> 0);
  defineRegisters(config, at + Vsec.HEADERS_SIZE, c, field);
}

/** Uncorrectable error bits an endpoint may implement (data link protocol ... poisoned TLP egress). */
const AER_UNCORRECTABLE = 0x07fff030;
/** Power-on severity: data link protocol, surprise down, flow control, receiver overflow, malformed TLP are fatal. */
const AER_SEVERITY_DEFAULT = 0x00062030;
const AER_CORRECTABLE = 0xf1c1;
/** Advisory non-fatal errors are masked at power-on. */
const AER_CORRECTABLE_MASK_DEFAULT = 0x2000;

function defineAer(config: ConfigSpace, at: number): void {
  config.define(at + Aer.UE_STATUS, 4, 0, 0, AER_UNCORRECTABLE); // RW1C
  config.define(at + Aer.UE_MASK, 4, 0, AER_UNCORRECTABLE);
  config.define(at + Aer.UE_SEVERITY, 4, AER_SEVERITY_DEFAULT, AER_UNCORRECTABLE);
  config.define(at + Aer.CE_STATUS, 4, 0, 0, AER_CORRECTABLE); // RW1C
  config.define(at + Aer.CE_MASK, 4, AER_CORRECTABLE_MASK_DEFAULT, AER_CORRECTABLE);
  // Status (RW1CS), mask and severity (RWS) are sticky: no reset the model has clears them.
  config.keepOnReset(at + Aer.UE_STATUS, 4, AER_UNCORRECTABLE);
  config.keepOnReset(at + Aer.UE_MASK, 4, AER_UNCORRECTABLE);
  config.keepOnReset(at + Aer.UE_SEVERITY, 4, AER_UNCORRECTABLE);
  config.keepOnReset(at + Aer.CE_STATUS, 4, AER_CORRECTABLE);
  config.keepOnReset(at + Aer.CE_MASK, 4, AER_CORRECTABLE);
  // Capabilities and control (no ECRC), header log and prefix log: read-only, 0.
}
