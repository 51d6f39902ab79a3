/** The type-0 config header (§10.1): IDs, command/status semantics, interrupt pin. */
import type { ConfigSpace } from './config.js';
import { checkUint, InvalidDeviceError, type InterruptPin, type PciDeviceDescription } from './description.js';
import { Cfg, Command, Status } from './spec.js';

const PINS: readonly InterruptPin[] = ['A', 'B', 'C', 'D'];

const COMMAND_WRITABLE = Command.IO | Command.MEMORY | Command.BUS_MASTER | Command.PARITY | Command.SERR | Command.INTX_DISABLE;

export function checkIds(d: PciDeviceDescription): void {
  checkUint('vendorId', d.vendorId, 16);
  checkUint('deviceId', d.deviceId, 16);
  checkUint('subsystemVendorId', d.subsystemVendorId, 16);
  checkUint('subsystemId', d.subsystemId, 16);
  checkUint('revision', d.revision, 8);
  checkUint('classCode', d.classCode, 24);
  if (d.intx !== undefined && !PINS.includes(d.intx)) {
    throw new InvalidDeviceError('intx', `${String(d.intx)} is not one of A, B, C, D`);
  }
}

/**
 * Defines the header. `express`: a PCIe function hardwires the latency
 * timer to 0. The capabilities pointer is set by the capability layout.
 */
export function defineHeader(c: ConfigSpace, d: PciDeviceDescription, express: boolean): void {
  c.define(Cfg.VENDOR_ID, 2, d.vendorId);
  c.define(Cfg.DEVICE_ID, 2, d.deviceId);
  c.define(Cfg.COMMAND, 2, 0, COMMAND_WRITABLE);
  c.define(Cfg.STATUS, 2, 0, 0, Status.ERRORS_W1C);
  c.define(Cfg.REVISION, 1, d.revision ?? 0);
  c.define(Cfg.CLASS_PROG_IF, 1, d.classCode & 0xff);
  c.define(Cfg.SUBCLASS, 2, d.classCode >>> 8);
  c.define(Cfg.CACHE_LINE_SIZE, 1, 0, 0xff);
  c.define(Cfg.LATENCY_TIMER, 1, 0, express ? 0 : 0xff);
  c.define(Cfg.SUBSYSTEM_VENDOR_ID, 2, d.subsystemVendorId ?? d.vendorId);
  c.define(Cfg.SUBSYSTEM_ID, 2, d.subsystemId ?? 0);
  c.define(Cfg.INTERRUPT_LINE, 1, 0, 0xff);
  c.define(Cfg.INTERRUPT_PIN, 1, d.intx ? 1 + PINS.indexOf(d.intx) : 0);
}
