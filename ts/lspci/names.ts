/**
 * Human names for what decode.ts finds: class codes, capability IDs, PCIe
 * port types and link encodings. lspci gets class names from pci.ids; we
 * carry the common ones so the tool needs no database, and fall back to
 * numbers (as lspci does without pci.ids) for the rest.
 */

interface ClassEntry {
  name: string;
  subclasses?: Record<number, string | SubclassEntry>;
}

interface SubclassEntry {
  name: string;
  progIfs: Record<number, string>;
}

const CLASSES: Record<number, ClassEntry> = {
  0x00: { name: 'Unclassified device', subclasses: { 0x00: 'Non-VGA unclassified device', 0x01: 'VGA compatible unclassified device' } },
  0x01: {
    name: 'Mass storage controller',
    subclasses: {
      0x00: 'SCSI storage controller', 0x01: 'IDE interface', 0x02: 'Floppy disk controller', 0x03: 'IPI bus controller',
      0x04: 'RAID bus controller', 0x05: 'ATA controller',
      0x06: { name: 'SATA controller', progIfs: { 0x00: 'Vendor specific', 0x01: 'AHCI 1.0', 0x02: 'Serial Storage Bus' } },
      0x07: 'Serial Attached SCSI controller',
      0x08: { name: 'Non-Volatile memory controller', progIfs: { 0x01: 'NVMHCI', 0x02: 'NVM Express' } },
      0x80: 'Mass storage controller',
    },
  },
  0x02: {
    name: 'Network controller',
    subclasses: { 0x00: 'Ethernet controller', 0x01: 'Token ring network controller', 0x02: 'FDDI network controller', 0x03: 'ATM network controller', 0x04: 'ISDN controller', 0x07: 'Infiniband controller', 0x08: 'Fabric controller', 0x80: 'Network controller' },
  },
  0x03: {
    name: 'Display controller',
    subclasses: { 0x00: { name: 'VGA compatible controller', progIfs: { 0x00: 'VGA controller', 0x01: '8514 controller' } }, 0x01: 'XGA compatible controller', 0x02: '3D controller', 0x80: 'Display controller' },
  },
  0x04: { name: 'Multimedia controller', subclasses: { 0x00: 'Multimedia video controller', 0x01: 'Multimedia audio controller', 0x02: 'Computer telephony device', 0x03: 'Audio device', 0x80: 'Multimedia controller' } },
  0x05: { name: 'Memory controller', subclasses: { 0x00: 'RAM memory', 0x01: 'FLASH memory', 0x02: 'CXL', 0x80: 'Memory controller' } },
  0x06: {
    name: 'Bridge',
    subclasses: { 0x00: 'Host bridge', 0x01: 'ISA bridge', 0x02: 'EISA bridge', 0x03: 'MicroChannel bridge', 0x04: 'PCI bridge', 0x05: 'PCMCIA bridge', 0x06: 'NuBus bridge', 0x07: 'CardBus bridge', 0x08: 'RACEway bridge', 0x09: 'Semi-transparent PCI-to-PCI bridge', 0x0a: 'InfiniBand to PCI host bridge', 0x80: 'Bridge' },
  },
  0x07: {
    name: 'Communication controller',
    subclasses: { 0x00: { name: 'Serial controller', progIfs: { 0x00: '8250', 0x01: '16450', 0x02: '16550', 0x03: '16650', 0x04: '16750', 0x05: '16850', 0x06: '16950' } }, 0x01: 'Parallel controller', 0x02: 'Multiport serial controller', 0x03: 'Modem', 0x04: 'GPIB controller', 0x05: 'Smart Card controller', 0x80: 'Communication controller' },
  },
  0x08: { name: 'Generic system peripheral', subclasses: { 0x00: 'PIC', 0x01: 'DMA controller', 0x02: 'Timer', 0x03: 'RTC', 0x04: 'PCI Hot-plug controller', 0x05: 'SD Host controller', 0x06: 'IOMMU', 0x80: 'System peripheral' } },
  0x09: { name: 'Input device controller', subclasses: { 0x00: 'Keyboard controller', 0x01: 'Digitizer Pen', 0x02: 'Mouse controller', 0x03: 'Scanner controller', 0x04: 'Gameport controller', 0x80: 'Input device controller' } },
  0x0a: { name: 'Docking station', subclasses: { 0x00: 'Generic Docking Station', 0x80: 'Docking Station' } },
  0x0b: { name: 'Processor', subclasses: { 0x00: '386', 0x01: '486', 0x02: 'Pentium', 0x10: 'Alpha', 0x20: 'Power PC', 0x30: 'MIPS', 0x40: 'Co-processor' } },
  0x0c: {
    name: 'Serial bus controller',
    subclasses: {
      0x00: 'FireWire (IEEE 1394)', 0x01: 'ACCESS Bus', 0x02: 'SSA',
      0x03: { name: 'USB controller', progIfs: { 0x00: 'UHCI', 0x10: 'OHCI', 0x20: 'EHCI', 0x30: 'XHCI', 0x40: 'USB4 Host Interface', 0xfe: 'USB Device' } },
      0x04: 'Fibre Channel', 0x05: 'SMBus', 0x06: 'InfiniBand', 0x07: 'IPMI Interface', 0x08: 'SERCOS interface', 0x09: 'CANBUS', 0x80: 'Serial bus controller',
    },
  },
  0x0d: { name: 'Wireless controller', subclasses: { 0x00: 'IRDA controller', 0x01: 'Consumer IR controller', 0x10: 'RF controller', 0x11: 'Bluetooth', 0x12: 'Broadband', 0x20: '802.1a controller', 0x21: '802.1b controller', 0x80: 'Wireless controller' } },
  0x0e: { name: 'Intelligent controller', subclasses: { 0x00: 'I2O' } },
  0x0f: { name: 'Satellite communications controller' },
  0x10: { name: 'Encryption controller', subclasses: { 0x00: 'Network and computing encryption device', 0x10: 'Entertainment encryption device', 0x80: 'Encryption controller' } },
  0x11: { name: 'Signal processing controller', subclasses: { 0x00: 'DPIO module', 0x01: 'Performance counters', 0x10: 'Communication synchronizer', 0x20: 'Signal processing management', 0x80: 'Signal processing controller' } },
  0x12: { name: 'Processing accelerators' },
  0x13: { name: 'Non-Essential Instrumentation' },
  0x40: { name: 'Coprocessor' },
  0xff: { name: 'Unassigned class' },
};

export interface ClassNames {
  /** The most specific name known: subclass, else base class, else undefined. */
  name?: string;
  progIf?: string;
}

export function className(base: number, sub: number, progIf: number): ClassNames {
  const entry = CLASSES[base];
  const subEntry = entry?.subclasses?.[sub];
  if (subEntry === undefined) return { name: entry?.name };
  if (typeof subEntry === 'string') return { name: subEntry };
  return { name: subEntry.name, progIf: subEntry.progIfs[progIf] };
}

/** Standard capabilities we recognise but do not decode (the decoded ones name themselves). */
const CAPABILITY_NAMES: Record<number, string> = {
  0x02: 'AGP', 0x03: 'Vital Product Data', 0x04: 'Slot ID', 0x06: 'CompactPCI hot-swap', 0x07: 'PCI-X',
  0x08: 'HyperTransport', 0x0a: 'Debug port', 0x0b: 'CompactPCI central resource control', 0x0c: 'Hot-plug capable',
  0x0d: 'Subsystem', 0x0e: 'AGP3', 0x0f: 'Secure device', 0x12: 'SATA HBA', 0x13: 'PCI Advanced Features',
  0x14: 'Enhanced Allocation', 0x15: 'Flattening Portal Bridge',
};

const EXTENDED_CAPABILITY_NAMES: Record<number, string> = {
  0x0002: 'Virtual Channel', 0x0004: 'Power Budgeting', 0x0005: 'Root Complex Link', 0x0006: 'Root Complex Internal Link',
  0x0007: 'Root Complex Event Collector', 0x0008: 'Multi-Function VC', 0x0009: 'Virtual Channel', 0x000a: 'Root Complex Register Block',
  0x000d: 'Access Control Services', 0x000e: 'Alternative Routing-ID Interpretation (ARI)', 0x000f: 'Address Translation Service (ATS)',
  0x0010: 'Single Root I/O Virtualization (SR-IOV)', 0x0011: 'Multi-Root I/O Virtualization (MR-IOV)', 0x0012: 'Multicast',
  0x0013: 'Page Request Interface (PRI)', 0x0015: 'Physical Resizable BAR', 0x0016: 'Dynamic Power Allocation',
  0x0017: 'TPH Requester', 0x0018: 'Latency Tolerance Reporting', 0x0019: 'Secondary PCI Express', 0x001b: 'Process Address Space ID (PASID)',
  0x001d: 'Downstream Port Containment', 0x001e: 'L1 PM Substates', 0x001f: 'Precision Time Measurement',
  0x0023: 'Designated Vendor-Specific', 0x0025: 'Data Link Feature', 0x0026: 'Physical Layer 16.0 GT/s', 0x0027: 'Lane Margining at the Receiver',
};

export const capabilityName = (id: number): string | undefined => CAPABILITY_NAMES[id];
export const extendedCapabilityName = (id: number): string | undefined => EXTENDED_CAPABILITY_NAMES[id];

const PORT_TYPES: Record<number, string> = {
  0: 'Endpoint', 1: 'Legacy Endpoint', 4: 'Root Port', 5: 'Upstream Port', 6: 'Downstream Port',
  7: 'PCI-Express to PCI/PCI-X Bridge', 8: 'PCI/PCI-X to PCI-Express Bridge', 9: 'Root Complex Integrated Endpoint',
  10: 'Root Complex Event Collector',
};

export const portTypeName = (type: number): string => PORT_TYPES[type] ?? `Unknown type ${type}`;

/** Header type bits 6:0. */
const HEADER_LAYOUTS = ['normal', 'bridge', 'cardbus'];
export const headerLayoutName = (layout: number): string => HEADER_LAYOUTS[layout] ?? 'unknown';

/** Link speed encodings (LnkCap/LnkSta bits 3:0). */
const LINK_SPEEDS: Record<number, string> = { 1: '2.5GT/s', 2: '5GT/s', 3: '8GT/s', 4: '16GT/s', 5: '32GT/s', 6: '64GT/s' };
export const linkSpeed = (code: number): string => LINK_SPEEDS[code] ?? 'unknown';

const L0S_LATENCIES = ['<64ns', '<128ns', '<256ns', '<512ns', '<1us', '<2us', '<4us', 'unlimited'];
const L1_LATENCIES = ['<1us', '<2us', '<4us', '<8us', '<16us', '<32us', '<64us', 'unlimited'];
/** Codes are 3-bit fields, so every index exists. */
export const l0sLatency = (code: number): string => L0S_LATENCIES[code & 7];
export const l1Latency = (code: number): string => L1_LATENCIES[code & 7];

const ASPM_SUPPORT = ['not supported', 'L0s', 'L1', 'L0s L1'];
const ASPM_CONTROL = ['Disabled', 'L0s Enabled', 'L1 Enabled', 'L0s L1 Enabled'];
export const aspmSupport = (code: number): string => ASPM_SUPPORT[code & 3];
export const aspmControl = (code: number): string => ASPM_CONTROL[code & 3];

/** Status bits 10:9. */
const DEVSEL_TIMING = ['fast', 'medium', 'slow', '??'];
export const devselTiming = (code: number): string => DEVSEL_TIMING[code & 3];

/** PMC bits 8:6, in mA. */
export const PM_AUX_CURRENT_MA = [0, 55, 100, 160, 220, 270, 320, 375] as const;

/** DevCap slot power limit scale (bits 27:26): watts per unit. */
export const SLOT_POWER_SCALES = [1, 0.1, 0.01, 0.001] as const;

/** The vfio-user names of the fixed PCI region and IRQ indexes (§8). */
export const REGION_NAMES = ['BAR0', 'BAR1', 'BAR2', 'BAR3', 'BAR4', 'BAR5', 'ROM', 'config', 'VGA'] as const;
export const IRQ_NAMES = ['INTx', 'MSI', 'MSI-X', 'ERR', 'REQ'] as const;
