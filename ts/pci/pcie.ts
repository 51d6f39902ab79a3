/**
 * PCI Express capability (ID 0x10), version 2: 60 bytes (§10.3). Device
 * Control's Initiate FLR resets the function; Device Status error bits are
 * RW1C; the link reports one 2.5 GT/s lane, which is what a virtual link is.
 * Slot and root registers are reserved for endpoints and read 0.
 */
import type { ConfigSpace } from './config.js';
import { InvalidDeviceError, type MaxPayload, type PciExpressCapability, type PcieDeviceType } from './description.js';
import { DevCap, DevCtl, Express, LnkCap, LnkCap2, PortType } from './spec.js';

const DEVICE_TYPE: Record<PcieDeviceType, number> = {
  'endpoint': PortType.ENDPOINT,
  'legacy-endpoint': PortType.LEGACY_ENDPOINT,
  'integrated-endpoint': PortType.RC_INTEGRATED_ENDPOINT,
};
const PAYLOADS: readonly MaxPayload[] = [128, 256, 512, 1024, 2048, 4096];

/**
 * Device Control: error reporting enables (3:0), relaxed ordering (4),
 * Max_Payload_Size (7:5), extended tags (8), phantom functions (9), aux
 * power (10), no snoop (11), Max_Read_Request_Size (14:12); 15 Initiate FLR
 * is acted on and always reads 0.
 */
const DEVCTL_WRITABLE = 0x7fff;
/** Power-on: relaxed ordering and no snoop enabled, 512-byte read requests. */
const DEVCTL_DEFAULT = DevCtl.RELAXED_ORDERING | DevCtl.NO_SNOOP | (2 << DevCtl.READ_REQUEST_SHIFT);
/**
 * Device Control bits an FLR does not modify (PCIe §6.6.2): Max_Payload_Size
 * controls the link's behavior. (Captured Slot Power Limit, also listed, is
 * read-only 0 here.)
 */
const DEVCTL_KEPT_ON_FLR = DevCtl.SIZE_MASK << DevCtl.PAYLOAD_SHIFT;
/** Device Status: correctable, non-fatal, fatal, unsupported request detected. */
const DEVSTA_ERRORS_W1C = 0xf;

/** One 2.5 GT/s lane, in Link Capabilities and Link Status. */
const LINK_X1_2_5GT = LnkCap.SPEED_2_5GT | (1 << LnkCap.WIDTH_SHIFT);
/** Link Control: ASPM (1:0), RCB (3), common clock (6), extended synch (7), clock PM (8), HW autonomous width disable (9), bandwidth interrupts (11:10). */
const LNKCTL_WRITABLE = 0x0fcb;
/**
 * Link Control fields an FLR does not modify (PCIe §6.6.2): ASPM Control,
 * RCB, Common Clock Configuration, Extended Synch, Enable Clock PM and
 * Hardware Autonomous Width Disable. (Link Control 2, with Hardware
 * Autonomous Speed Disable, is read-only here.)
 */
const LNKCTL_KEPT_ON_FLR = 0x03cb;

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
  config.define(at + Express.FLAGS, 2, Express.VERSION_2 | (DEVICE_TYPE[type] << Express.TYPE_SHIFT));
  config.define(at + Express.DEVCAP, 4,
    PAYLOADS.indexOf(description.maxPayload ?? 128) | DevCap.ROLE_BASED_ERRORS | (flr ? DevCap.FLR : 0));
  config.define(at + Express.DEVCTL, 2, DEVCTL_DEFAULT, DEVCTL_WRITABLE);
  config.keepOnReset(at + Express.DEVCTL, 2, DEVCTL_KEPT_ON_FLR);
  config.define(at + Express.DEVSTA, 2, 0, 0, DEVSTA_ERRORS_W1C);
  // Root-complex integrated endpoints have no link: its registers are reserved.
  if (type !== 'integrated-endpoint') {
    config.define(at + Express.LNKCAP, 4, LINK_X1_2_5GT);
    config.define(at + Express.LNKCTL, 2, 0, LNKCTL_WRITABLE);
    config.keepOnReset(at + Express.LNKCTL, 2, LNKCTL_KEPT_ON_FLR);
    config.define(at + Express.LNKSTA, 2, LINK_X1_2_5GT);
    config.define(at + Express.LNKCAP2, 4, LnkCap2.SPEED_2_5GT);
    // Target Link Speed (3:0) uses the LnkCap speed codes.
    config.define(at + Express.LNKCTL2, 2, LnkCap.SPEED_2_5GT);
  }
  if (flr) {
    config.onWrite({
      start: at + Express.DEVCTL,
      end: at + Express.DEVCTL + 2,
      apply: (write) => {
        if (write.written(at + Express.DEVCTL, 2) & DevCtl.INITIATE_FLR) requestReset();
      },
    });
  }
}
