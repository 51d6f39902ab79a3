/**
 * Display tables for the decoder: each register's one-bit fields in the
 * order lspci prints them, with lspci's own tokens, so the text and the JSON
 * keys agree. Offsets and bit fields of the registers themselves are in
 * ../pci/spec.ts; names for people live in names.ts, decoding in decode.ts
 * and caps.ts.
 */

/** `[token, bit]` pairs, in display order. */
export type FlagTable = readonly (readonly [token: string, bit: number])[];

export const COMMAND_FLAGS: FlagTable = [
  ['I/O', 0], ['Mem', 1], ['BusMaster', 2], ['SpecCycle', 3], ['MemWINV', 4], ['VGASnoop', 5],
  ['ParErr', 6], ['Stepping', 7], ['SERR', 8], ['FastB2B', 9], ['DisINTx', 10],
];

/** lspci prints DEVSEL (bits 10:9) between ParErr and >TAbort. */
export const STATUS_FLAGS: FlagTable = [
  ['Cap', 4], ['66MHz', 5], ['UDF', 6], ['FastB2B', 7], ['ParErr', 8],
  ['>TAbort', 11], ['<TAbort', 12], ['<MAbort', 13], ['>SERR', 14], ['<PERR', 15], ['INTx', 3],
];

export const PMC_FLAGS: FlagTable = [['PMEClk', 3], ['DSI', 5], ['D1', 9], ['D2', 10]];
export const PMC_PME_FLAGS: FlagTable = [['D0', 11], ['D1', 12], ['D2', 13], ['D3hot', 14], ['D3cold', 15]];
export const PMCSR_FLAGS: FlagTable = [['NoSoftRst', 3], ['PME-Enable', 8], ['PME', 15]];

export const DEVCAP_FLAGS: FlagTable = [
  ['ExtTag', 5], ['AttnBtn', 12], ['AttnInd', 13], ['PwrInd', 14], ['RBE', 15], ['FLReset', 28],
];

/** FLReset (bit 15) is "Initiate FLR" on endpoints; lspci shows it only when DevCap has FLR. */
export const DEVCTL_ERROR_FLAGS: FlagTable = [['CorrErr', 0], ['NonFatalErr', 1], ['FatalErr', 2], ['UnsupReq', 3]];
export const DEVCTL_FLAGS: FlagTable = [
  ['RlxdOrd', 4], ['ExtTag', 8], ['PhantFunc', 9], ['AuxPwr', 10], ['NoSnoop', 11], ['FLReset', 15],
];
export const DEVSTA_FLAGS: FlagTable = [
  ['CorrErr', 0], ['NonFatalErr', 1], ['FatalErr', 2], ['UnsupReq', 3], ['AuxPwr', 4], ['TransPend', 5],
];

export const LNKCAP_FLAGS: FlagTable = [
  ['ClockPM', 18], ['Surprise', 19], ['LLActRep', 20], ['BwNot', 21], ['ASPMOptComp', 22],
];
export const LNKCTL_FLAGS: FlagTable = [
  ['Disabled', 4], ['CommClk', 6], ['ExtSynch', 7], ['ClockPM', 8], ['AutWidDis', 9], ['BWInt', 10], ['AutBWInt', 11],
];
export const LNKSTA_FLAGS: FlagTable = [
  ['TrErr', 10], ['Train', 11], ['SlotClk', 12], ['DLActive', 13], ['BWMgmt', 14], ['ABWMgmt', 15],
];

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
