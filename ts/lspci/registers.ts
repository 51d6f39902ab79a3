/**
 * Config-space layout the decoder reads (PCI Local Bus 3.0 and PCI Express
 * Base; §10 of the vfio-user protocol digest). Offsets and bit positions only:
 * names for people live in names.ts, decoding in decode.ts and caps.ts.
 *
 * Flag tables list a register's one-bit fields in the order lspci prints
 * them, with lspci's own tokens, so the text and the JSON keys agree.
 */

/** `[token, bit]` pairs, in display order. */
export type FlagTable = readonly (readonly [token: string, bit: number])[];

/** Conventional config space; extended capabilities start where it ends. */
export const CONFIG_SIZE = 0x100;
export const EXTENDED_CONFIG_SIZE = 0x1000;
/** Capabilities live after the 64-byte header. */
export const FIRST_CAPABILITY = 0x40;

export const Header = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION: 0x08,
  PROG_IF: 0x09,
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
  /** The type-0 header is this long; config space must hold at least it. */
  SIZE: 0x40,
} as const;

export const HeaderType = { LAYOUT_MASK: 0x7f, MULTIFUNCTION: 0x80, NORMAL: 0 } as const;
export const NUM_BARS = 6;

export const COMMAND_FLAGS: FlagTable = [
  ['I/O', 0], ['Mem', 1], ['BusMaster', 2], ['SpecCycle', 3], ['MemWINV', 4], ['VGASnoop', 5],
  ['ParErr', 6], ['Stepping', 7], ['SERR', 8], ['FastB2B', 9], ['DisINTx', 10],
];
export const Command = { IO: 1 << 0, MEMORY: 1 << 1 } as const;

/** lspci prints DEVSEL (bits 10:9) between ParErr and >TAbort. */
export const STATUS_FLAGS: FlagTable = [
  ['Cap', 4], ['66MHz', 5], ['UDF', 6], ['FastB2B', 7], ['ParErr', 8],
  ['>TAbort', 11], ['<TAbort', 12], ['<MAbort', 13], ['>SERR', 14], ['<PERR', 15], ['INTx', 3],
];
export const Status = { CAPABILITIES: 1 << 4, DEVSEL_SHIFT: 9, DEVSEL_MASK: 0x3 } as const;

export const Bar = {
  IO_SPACE: 0x1,
  IO_ADDRESS_MASK: 0xfffffffc,
  MEM_TYPE_SHIFT: 1,
  MEM_TYPE_MASK: 0x3,
  /** Memory type 2; 0 is 32-bit, 1 the legacy below-1M type, 3 reserved. */
  MEM_TYPE_64: 2,
  MEM_PREFETCHABLE: 0x8,
  MEM_ADDRESS_MASK: 0xfffffff0,
} as const;

export const Rom = { ENABLE: 0x1, ADDRESS_MASK: 0xfffff800 } as const;

/** Standard capability header: ID byte, next-pointer byte (low 2 bits reserved). */
export const Cap = { ID: 0, NEXT: 1, HEADER_SIZE: 2, FLAGS: 2, POINTER_MASK: 0xfc } as const;
export const CapId = { PM: 0x01, MSI: 0x05, VENDOR: 0x09, EXPRESS: 0x10, MSIX: 0x11 } as const;
/** An ID of 0xff means the read hit nothing (lspci: "<chain broken>"). */
export const CAP_ID_BROKEN = 0xff;

export const Pm = {
  PMC: 2,
  PMCSR: 4,
  VERSION_MASK: 0x7,
  AUX_CURRENT_SHIFT: 6,
  AUX_CURRENT_MASK: 0x7,
  STATE_MASK: 0x3,
  DATA_SELECT_SHIFT: 9,
  DATA_SELECT_MASK: 0xf,
  DATA_SCALE_SHIFT: 13,
  DATA_SCALE_MASK: 0x3,
} as const;
export const PMC_FLAGS: FlagTable = [['PMEClk', 3], ['DSI', 5], ['D1', 9], ['D2', 10]];
export const PMC_PME_FLAGS: FlagTable = [['D0', 11], ['D1', 12], ['D2', 13], ['D3hot', 14], ['D3cold', 15]];
export const PMCSR_FLAGS: FlagTable = [['NoSoftRst', 3], ['PME-Enable', 8], ['PME', 15]];

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
  CAPABLE_SHIFT: 1,
  ENABLED_SHIFT: 4,
  LOG2_MASK: 0x7,
  ADDRESS_64: 1 << 7,
  MASKABLE: 1 << 8,
} as const;

export const MsiX = {
  CONTROL: 2,
  TABLE: 4,
  PBA: 8,
  TABLE_SIZE_MASK: 0x7ff,
  FUNCTION_MASK: 1 << 14,
  ENABLE: 1 << 15,
  BIR_MASK: 0x7,
} as const;

export const Vendor = { LENGTH: 2 } as const;

export const Express = {
  FLAGS: 2,
  DEVCAP: 4,
  DEVCTL: 8,
  DEVSTA: 0x0a,
  LNKCAP: 0x0c,
  LNKCTL: 0x10,
  LNKSTA: 0x12,
  VERSION_MASK: 0xf,
  TYPE_SHIFT: 4,
  TYPE_MASK: 0xf,
  IRQ_SHIFT: 9,
  IRQ_MASK: 0x1f,
} as const;

/** Device/port types (Express flags bits 7:4) that have no link registers. */
export const PortType = { RC_INTEGRATED_ENDPOINT: 9, RC_EVENT_COLLECTOR: 10 } as const;

export const DevCap = {
  PAYLOAD_MASK: 0x7,
  PHANTOM_SHIFT: 3,
  PHANTOM_MASK: 0x3,
  L0S_SHIFT: 6,
  L1_SHIFT: 9,
  LATENCY_MASK: 0x7,
  POWER_VALUE_SHIFT: 18,
  POWER_VALUE_MASK: 0xff,
  POWER_SCALE_SHIFT: 26,
  POWER_SCALE_MASK: 0x3,
  FLR: 1 << 28,
} as const;
export const DEVCAP_FLAGS: FlagTable = [
  ['ExtTag', 5], ['AttnBtn', 12], ['AttnInd', 13], ['PwrInd', 14], ['RBE', 15], ['FLReset', 28],
];

export const DevCtl = { PAYLOAD_SHIFT: 5, READ_REQUEST_SHIFT: 12, SIZE_MASK: 0x7 } as const;
/** FLReset (bit 15) is "Initiate FLR" on endpoints; lspci shows it only when DevCap has FLR. */
export const DEVCTL_ERROR_FLAGS: FlagTable = [['CorrErr', 0], ['NonFatalErr', 1], ['FatalErr', 2], ['UnsupReq', 3]];
export const DEVCTL_FLAGS: FlagTable = [
  ['RlxdOrd', 4], ['ExtTag', 8], ['PhantFunc', 9], ['AuxPwr', 10], ['NoSnoop', 11], ['FLReset', 15],
];
export const DEVSTA_FLAGS: FlagTable = [
  ['CorrErr', 0], ['NonFatalErr', 1], ['FatalErr', 2], ['UnsupReq', 3], ['AuxPwr', 4], ['TransPend', 5],
];

export const LnkCap = {
  SPEED_MASK: 0xf,
  WIDTH_SHIFT: 4,
  WIDTH_MASK: 0x3f,
  ASPM_SHIFT: 10,
  ASPM_MASK: 0x3,
  L0S_SHIFT: 12,
  L1_SHIFT: 15,
  LATENCY_MASK: 0x7,
  PORT_SHIFT: 24,
} as const;
export const LNKCAP_FLAGS: FlagTable = [
  ['ClockPM', 18], ['Surprise', 19], ['LLActRep', 20], ['BwNot', 21], ['ASPMOptComp', 22],
];
export const LnkCtl = { ASPM_MASK: 0x3, RCB_128: 1 << 3 } as const;
export const LNKCTL_FLAGS: FlagTable = [
  ['Disabled', 4], ['CommClk', 6], ['ExtSynch', 7], ['ClockPM', 8], ['AutWidDis', 9], ['BWInt', 10], ['AutBWInt', 11],
];
export const LNKSTA_FLAGS: FlagTable = [
  ['TrErr', 10], ['Train', 11], ['SlotClk', 12], ['DLActive', 13], ['BWMgmt', 14], ['ABWMgmt', 15],
];

/** Extended capability header: ID 15:0, version 19:16, next 31:20. */
export const ExtCap = {
  ID_MASK: 0xffff,
  VERSION_SHIFT: 16,
  VERSION_MASK: 0xf,
  NEXT_SHIFT: 20,
  /** A read of nothing (no device / unimplemented). */
  BROKEN: 0xffffffff,
} as const;
export const ExtCapId = { AER: 0x0001, DSN: 0x0003, VSEC: 0x000b } as const;

export const Aer = {
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
export const AER_UE_FLAGS: FlagTable = [
  ['DLP', 4], ['SDES', 5], ['TLP', 12], ['FCP', 13], ['CmpltTO', 14], ['CmpltAbrt', 15],
  ['UnxCmplt', 16], ['RxOF', 17], ['MalfTLP', 18], ['ECRC', 19], ['UnsupReq', 20], ['ACSViol', 21],
];
export const AER_CE_FLAGS: FlagTable = [
  ['RxErr', 0], ['BadTLP', 6], ['BadDLLP', 7], ['Rollover', 8], ['Timeout', 12], ['AdvNonFatalErr', 13],
];
export const AER_CAP_FLAGS: FlagTable = [
  ['ECRCGenCap', 5], ['ECRCGenEn', 6], ['ECRCChkCap', 7], ['ECRCChkEn', 8],
  ['MultHdrRecCap', 9], ['MultHdrRecEn', 10], ['TLPPfxPres', 11], ['HdrLogCap', 12],
];

export const Dsn = { SERIAL: 4 } as const;

/** The VSEC header after the extended header: ID 15:0, rev 19:16, length 31:20. */
export const Vsec = { HEADER: 4, ID_MASK: 0xffff, REV_SHIFT: 16, REV_MASK: 0xf, LENGTH_SHIFT: 20 } as const;

/** A register's one-bit fields by lspci token, in display order. */
export type Flags = Record<string, boolean>;

/** A register as read, with its one-bit fields decoded. */
export interface Register {
  raw: number;
  flags: Flags;
}

export function decodeFlags(value: number, table: FlagTable): Flags {
  const flags: Flags = {};
  for (const [token, bit] of table) flags[token] = ((value >>> bit) & 1) === 1;
  return flags;
}

export function register(value: number, table: FlagTable): Register {
  return { raw: value, flags: decodeFlags(value, table) };
}

/** The field of `value` starting at bit `shift`; `mask` applies after the shift. */
export const field = (value: number, shift: number, mask: number): number => (value >>> shift) & mask;
