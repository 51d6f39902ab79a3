/**
 * PCI Express capability (ID 0x10), version 2: 60 bytes (§10.3). Device
 * Control's Initiate FLR resets the function; Device Status error bits are
 * RW1C; the link reports one 2.5 GT/s lane, which is what a virtual link is.
 * Slot and root registers are reserved for endpoints and read 0.
 */
import type { ConfigSpace } from './config.js';
import { InvalidDeviceError, type MaxPayload, type PciExpressCapability, type PcieDeviceType } from './description.js';

export const PCIE_SIZE = 60;

const CAPABILITIES = 0x02;
const DEVICE_CAPABILITIES = 0x04;
const DEVICE_CONTROL = 0x08;
const DEVICE_STATUS = 0x0a;
const LINK_CAPABILITIES = 0x0c;
const LINK_CONTROL = 0x10;
const LINK_STATUS = 0x12;
const LINK_CAPABILITIES_2 = 0x2c;
const LINK_CONTROL_2 = 0x30;

const VERSION_2 = 0x2;
const DEVICE_TYPE: Record<PcieDeviceType, number> = { 'endpoint': 0x0, 'legacy-endpoint': 0x1, 'integrated-endpoint': 0x9 };
const PAYLOADS: readonly MaxPayload[] = [128, 256, 512, 1024, 2048, 4096];

/** Device Capabilities: role-based error reporting is mandatory since PCIe 1.1. */
const DEVCAP_ROLE_BASED_ERRORS = 1 << 15;
const DEVCAP_FLR = 1 << 28;

/**
 * Device Control: error reporting enables (3:0), relaxed ordering (4),
 * Max_Payload_Size (7:5), extended tags (8), phantom functions (9), aux
 * power (10), no snoop (11), Max_Read_Request_Size (14:12); 15 Initiate FLR
 * is acted on and always reads 0.
 */
const DEVCTL_WRITABLE = 0x7fff;
const DEVCTL_INITIATE_FLR = 1 << 15;
/** Power-on: relaxed ordering and no snoop enabled, 512-byte read requests. */
const DEVCTL_DEFAULT = (1 << 4) | (1 << 11) | (2 << 12);
/** Device Status: correctable, non-fatal, fatal, unsupported request detected. */
const DEVSTA_ERRORS_W1C = 0xf;

const SPEED_2_5GT = 0x1;
const WIDTH_X1 = 0x1 << 4;
/** Link Control: ASPM (1:0), RCB (3), common clock (6), extended synch (7), clock PM (8), HW autonomous width disable (9), bandwidth interrupts (11:10). */
const LNKCTL_WRITABLE = 0x0fcb;
/** Link Capabilities 2: supported speeds vector, bit 1 = 2.5 GT/s. */
const LNKCAP2_2_5GT = 1 << 1;

export function checkPcie(d: PciExpressCapability, field: string): void {
  if (d.type !== undefined && !(d.type in DEVICE_TYPE)) {
    throw new InvalidDeviceError(`${field}.type`, `${String(d.type)} is not one of ${Object.keys(DEVICE_TYPE).join(', ')}`);
  }
  if (d.maxPayload !== undefined && !PAYLOADS.includes(d.maxPayload)) {
    throw new InvalidDeviceError(`${field}.maxPayload`, `${d.maxPayload} is not one of ${PAYLOADS.join(', ')}`);
  }
}

/** Defines the registers; Initiate FLR calls `requestReset` (the reset runs once the write completes). */
export function definePciExpress(config: ConfigSpace, at: number, description: PciExpressCapability, requestReset: () => void): void {
  const type = description.type ?? 'endpoint';
  const flr = description.flr ?? true;
  config.define(at + CAPABILITIES, 2, VERSION_2 | (DEVICE_TYPE[type] << 4));
  config.define(at + DEVICE_CAPABILITIES, 4,
    PAYLOADS.indexOf(description.maxPayload ?? 128) | DEVCAP_ROLE_BASED_ERRORS | (flr ? DEVCAP_FLR : 0));
  config.define(at + DEVICE_CONTROL, 2, DEVCTL_DEFAULT, DEVCTL_WRITABLE);
  config.define(at + DEVICE_STATUS, 2, 0, 0, DEVSTA_ERRORS_W1C);
  // Root-complex integrated endpoints have no link: its registers are reserved.
  if (type !== 'integrated-endpoint') {
    config.define(at + LINK_CAPABILITIES, 4, SPEED_2_5GT | WIDTH_X1);
    config.define(at + LINK_CONTROL, 2, 0, LNKCTL_WRITABLE);
    config.define(at + LINK_STATUS, 2, SPEED_2_5GT | WIDTH_X1);
    config.define(at + LINK_CAPABILITIES_2, 4, LNKCAP2_2_5GT);
    config.define(at + LINK_CONTROL_2, 2, SPEED_2_5GT);
  }
  if (flr) {
    config.onWrite({
      start: at + DEVICE_CONTROL,
      end: at + DEVICE_CONTROL + 2,
      apply: (write) => {
        if (write.written(at + DEVICE_CONTROL, 2) & DEVCTL_INITIATE_FLR) requestReset();
      },
    });
  }
}
