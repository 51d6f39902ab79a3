/**
 * PCI specification constants (PCI Local Bus 3.0 and PCI Express Base;
 * §10 of the vfio-user protocol digest): config-space sizes, the type-0
 * header, BAR type bits, capability IDs and each capability's register
 * offsets and bit fields. Facts of the spec only, shared by the device model
 * (ts/pci) and the decoder (ts/lspci); what a device chooses (writable masks,
 * power-on values) stays with the model, display names with the decoder.
 */

/** Conventional config space; extended capabilities start where it ends. */
export const CONFIG_SIZE = 0x100;
export const EXTENDED_CONFIG_SIZE = 0x1000;
/** The type-0 header is this long; the capability list lives after it. */
export const CONFIG_HEADER_END = 0x40;

/** Offsets of the type-0 header registers (§10.1). */
export const Cfg = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION: 0x08,
  /** Class code, low byte first: programming interface, subclass, base class. */
  CLASS_PROG_IF: 0x09,
  SUBCLASS: 0x0a,
  BASE_CLASS: 0x0b,
  CACHE_LINE_SIZE: 0x0c,
  LATENCY_TIMER: 0x0d,
  HEADER_TYPE: 0x0e,
  BAR0: 0x10,
  SUBSYSTEM_VENDOR_ID: 0x2c,
  SUBSYSTEM_ID: 0x2e,
  ROM_ADDRESS: 0x30,
  CAPABILITIES: 0x34,
  INTERRUPT_LINE: 0x3c,
  INTERRUPT_PIN: 0x3d,
} as const;

export const HeaderType = { LAYOUT_MASK: 0x7f, MULTIFUNCTION: 0x80, NORMAL: 0 } as const;
export const NUM_BARS = 6;

/** Command register bits. */
export const Command = {
  IO: 1 << 0,
  MEMORY: 1 << 1,
  BUS_MASTER: 1 << 2,
  PARITY: 1 << 6,
  SERR: 1 << 8,
  INTX_DISABLE: 1 << 10,
} as const;

/** Status register bits. */
export const Status = {
  INTX: 1 << 3,
  CAPABILITIES: 1 << 4,
  /** DEVSEL timing, bits 10:9. */
  DEVSEL_SHIFT: 9,
  DEVSEL_MASK: 0x3,
  /** Error bits software clears by writing 1. */
  ERRORS_W1C: 0xf900,
} as const;

/** BAR register type bits (§10.2). */
export const BarBits = {
  IO_SPACE: 0x1,
  IO_ADDRESS_MASK: 0xfffffffc,
  MEM_TYPE_SHIFT: 1,
  MEM_TYPE_MASK: 0x3,
  /** Memory type 2; 0 is 32-bit, 1 the legacy below-1M type, 3 reserved. */
  MEM_TYPE_64: 2,
  MEM_PREFETCHABLE: 0x8,
  MEM_ADDRESS_MASK: 0xfffffff0,
} as const;

/** Expansion ROM BAR: address bits 31:11 and the enable bit. */
export const Rom = { ENABLE: 0x1, ADDRESS_MASK: 0xfffff800 } as const;

/** Standard capability header: ID byte, next-pointer byte (low 2 bits reserved). */
export const Cap = { ID: 0, NEXT: 1, HEADER_SIZE: 2, FLAGS: 2, POINTER_MASK: 0xfc } as const;
/** An ID of 0xff means the read hit nothing (lspci: "<chain broken>"). */
export const CAP_ID_BROKEN = 0xff;

export const CapabilityId = { POWER_MANAGEMENT: 0x01, MSI: 0x05, VENDOR: 0x09, PCI_EXPRESS: 0x10, MSIX: 0x11 } as const;

/** Power Management (ID 0x01), 8 bytes: PMC, then PMCSR. */
export const Pm = {
  SIZE: 8,
  PMC: 2,
  PMCSR: 4,
  VERSION_MASK: 0x7,
  PMC_VERSION_3: 0x3,
  AUX_CURRENT_SHIFT: 6,
  AUX_CURRENT_MASK: 0x7,
  PMC_D1: 1 << 9,
  PMC_D2: 1 << 10,
  /** PMCSR power state, bits 1:0 (D0, D1, D2, D3hot). */
  STATE_MASK: 0x3,
  PMCSR_NO_SOFT_RESET: 1 << 3,
  DATA_SELECT_SHIFT: 9,
  DATA_SELECT_MASK: 0xf,
  DATA_SCALE_SHIFT: 13,
  DATA_SCALE_MASK: 0x3,
} as const;

/** MSI (ID 0x05): message control, then a 32- or 64-bit layout. */
export const Msi = {
  CONTROL: 2,
  ADDRESS_LO: 4,
  /** 64-bit layout: address hi, data, mask, pending. */
  ADDRESS_HI_64: 8,
  DATA_64: 12,
  MASK_64: 16,
  PENDING_64: 20,
  /** 32-bit layout. */
  DATA_32: 8,
  MASK_32: 12,
  PENDING_32: 16,
  ENABLE: 1 << 0,
  /** Multiple Message Capable (3:1) and Enable (6:4), log2 of the vector count. */
  CAPABLE_SHIFT: 1,
  ENABLED_SHIFT: 4,
  LOG2_MASK: 0x7,
  ADDRESS_64: 1 << 7,
  /** Per-vector masking. */
  MASKABLE: 1 << 8,
} as const;

/** MSI-X (ID 0x11), 12 bytes, and its table entries. */
export const MsiX = {
  SIZE: 12,
  CONTROL: 2,
  TABLE: 4,
  PBA: 8,
  /** Table size minus one, bits 10:0. */
  TABLE_SIZE_MASK: 0x7ff,
  FUNCTION_MASK: 1 << 14,
  ENABLE: 1 << 15,
  /** BAR indicator in the low bits of the table and PBA registers. */
  BIR_MASK: 0x7,
  /** Table entries: address lo, address hi, data, vector control (bit 0 = masked). */
  ENTRY_SIZE: 16,
  ENTRY_VECTOR_CONTROL: 12,
  ENTRY_MASKED: 0x1,
} as const;

/** Vendor-specific (ID 0x09): ID, next, length, then the vendor's registers. */
export const Vendor = { LENGTH: 2, HEADER_SIZE: 3 } as const;

/** PCI Express (ID 0x10); version 2 is 60 bytes. */
export const Express = {
  SIZE_V2: 60,
  FLAGS: 2,
  DEVCAP: 4,
  DEVCTL: 8,
  DEVSTA: 0x0a,
  LNKCAP: 0x0c,
  LNKCTL: 0x10,
  LNKSTA: 0x12,
  LNKCAP2: 0x2c,
  LNKCTL2: 0x30,
  VERSION_MASK: 0xf,
  VERSION_2: 0x2,
  TYPE_SHIFT: 4,
  TYPE_MASK: 0xf,
  IRQ_SHIFT: 9,
  IRQ_MASK: 0x1f,
} as const;

/** Device/port types (Express flags bits 7:4). */
export const PortType = { ENDPOINT: 0, LEGACY_ENDPOINT: 1, RC_INTEGRATED_ENDPOINT: 9, RC_EVENT_COLLECTOR: 10 } as const;

export const DevCap = {
  PAYLOAD_MASK: 0x7,
  PHANTOM_SHIFT: 3,
  PHANTOM_MASK: 0x3,
  L0S_SHIFT: 6,
  L1_SHIFT: 9,
  LATENCY_MASK: 0x7,
  /** Role-based error reporting: mandatory since PCIe 1.1. */
  ROLE_BASED_ERRORS: 1 << 15,
  POWER_VALUE_SHIFT: 18,
  POWER_VALUE_MASK: 0xff,
  POWER_SCALE_SHIFT: 26,
  POWER_SCALE_MASK: 0x3,
  FLR: 1 << 28,
} as const;

/** Max_Payload_Size (7:5) and Max_Read_Request_Size (14:12) count 128 << n bytes. */
export const DevCtl = {
  RELAXED_ORDERING: 1 << 4,
  PAYLOAD_SHIFT: 5,
  NO_SNOOP: 1 << 11,
  READ_REQUEST_SHIFT: 12,
  SIZE_MASK: 0x7,
  INITIATE_FLR: 1 << 15,
} as const;

/** Link Capabilities and Link Status share the speed (3:0) and width (9:4) fields. */
export const LnkCap = {
  SPEED_MASK: 0xf,
  /** Speed code 1. */
  SPEED_2_5GT: 0x1,
  WIDTH_SHIFT: 4,
  WIDTH_MASK: 0x3f,
  ASPM_SHIFT: 10,
  ASPM_MASK: 0x3,
  L0S_SHIFT: 12,
  L1_SHIFT: 15,
  LATENCY_MASK: 0x7,
  PORT_SHIFT: 24,
} as const;
export const LnkCtl = { ASPM_MASK: 0x3, RCB_128: 1 << 3 } as const;
/** Link Capabilities 2: supported speeds vector. */
export const LnkCap2 = { SPEED_2_5GT: 1 << 1 } as const;

/** Extended capability header: ID 15:0, version 19:16, next 31:20. */
export const ExtCap = {
  ID_MASK: 0xffff,
  VERSION_SHIFT: 16,
  VERSION_MASK: 0xf,
  NEXT_SHIFT: 20,
  /** A read of nothing (no device / unimplemented). */
  BROKEN: 0xffffffff,
} as const;

export const ExtendedCapabilityId = { AER: 0x0001, SERIAL_NUMBER: 0x0003, VENDOR: 0x000b } as const;

/** Advanced Error Reporting; version 2 with the TLP prefix log is 0x48 bytes. */
export const Aer = {
  SIZE_V2: 0x48,
  UE_STATUS: 0x04,
  UE_MASK: 0x08,
  UE_SEVERITY: 0x0c,
  CE_STATUS: 0x10,
  CE_MASK: 0x14,
  CAP_CONTROL: 0x18,
  HEADER_LOG: 0x1c,
  HEADER_LOG_DWORDS: 4,
  FIRST_ERROR_MASK: 0x1f,
} as const;

/** Device Serial Number: the 64-bit serial after the header, 12 bytes in all. */
export const Dsn = { SIZE: 12, SERIAL: 4 } as const;

/**
 * Vendor-Specific Extended: the VSEC header after the extended header (ID
 * 15:0, rev 19:16, length 31:20); the length is 12 bits and counts both headers.
 */
export const Vsec = { HEADER: 4, HEADERS_SIZE: 8, ID_MASK: 0xffff, REV_SHIFT: 16, REV_MASK: 0xf, LENGTH_SHIFT: 20, MAX_LENGTH: 0xfff } as const;
