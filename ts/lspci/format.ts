/**
 * The text `vfio-user lspci` prints: lspci -vv's layout and tokens
 * (Flag+/Flag-, tab-indented register lines) for the PCI part, then a
 * "vfio-user:" section for what only the protocol shows (regions, IRQs).
 * Also the JSON form, with every bigint as a "0x…" hex string.
 */
import type { Capability, CapabilityChain, ChainProblem, ExpressCap, MsiCap, PowerManagementCap } from './caps.js';
import type { AerCap, ExtendedCapability } from './ext-caps.js';
import type { BarReport, IrqReport, LspciReport, RegionReport, RomReport } from './decode.js';
import type { Flags } from './registers.js';
import { headerLayoutName } from './names.js';

const hex = (value: number | bigint, width: number): string => value.toString(16).padStart(width, '0');

const sign = (set: boolean | undefined): string => (set ? '+' : '-');

/** "Tok+ Tok-" for each flag, in table order. */
function flagTokens(flags: Flags): string[] {
  return Object.entries(flags).map(([token, set]) => `${token}${sign(set)}`);
}
const flagList = (flags: Flags): string => flagTokens(flags).join(' ');
const flag = (flags: Flags, token: string): string => `${token}${sign(flags[token])}`;

/** lspci's size style: the largest unit that divides exactly ("8", "4K", "16M"). */
export function formatSize(size: bigint): string {
  const units = ['', 'K', 'M', 'G', 'T'];
  let unit = 0;
  while (unit < units.length - 1 && size % 1024n === 0n && size !== 0n) {
    size /= 1024n;
    unit++;
  }
  return `${size}${units[unit]}`;
}
const sizeSuffix = (size: bigint): string => (size === 0n ? '' : ` [size=${formatSize(size)}]`);

function titleLine(r: LspciReport): string {
  const cls = `${hex(r.class.base, 2)}${hex(r.class.sub, 2)}`;
  const name = r.class.name ? `${r.class.name} [${cls}]` : `Class [${cls}]`;
  const progIf = r.class.progIf || r.class.progIfName
    ? ` (prog-if ${hex(r.class.progIf, 2)}${r.class.progIfName ? ` [${r.class.progIfName}]` : ''})`
    : '';
  return `${name}: Device [${hex(r.vendorId, 4)}:${hex(r.deviceId, 4)}] (rev ${hex(r.revision, 2)})${progIf}`;
}

function headerLines(r: LspciReport): string[] {
  const lines: string[] = [];
  // As lspci: a subsystem vendor of 0 or ffff means none (QEMU's lsi53c895a has 0000:1000).
  const sub = r.subsystem;
  if (sub && sub.vendorId !== 0 && sub.vendorId !== 0xffff) lines.push(`\tSubsystem: Device [${hex(sub.vendorId, 4)}:${hex(sub.deviceId, 4)}]`);
  const layout = headerLayoutName(r.headerType.layout);
  lines.push(`\tHeader type: ${hex(r.headerType.raw, 2)} (${layout}, ${r.headerType.multifunction ? 'multi' : 'single'}-function)`);
  lines.push(`\tControl: ${flagList(r.command.flags)}`);
  // lspci shows DEVSEL timing between ParErr and >TAbort.
  const status = flagTokens(r.status.flags);
  status.splice(status.findIndex((token) => token.startsWith('>TAbort')), 0, `DEVSEL=${r.status.devsel}`);
  lines.push(`\tStatus: ${status.join(' ')}`);
  lines.push(`\tLatency: ${r.latencyTimer}${r.cacheLineBytes ? `, Cache Line Size: ${r.cacheLineBytes} bytes` : ''}`);
  if (r.interrupt.pinName) lines.push(`\tInterrupt: pin ${r.interrupt.pinName} routed to IRQ ${r.interrupt.line}`);
  else if (r.interrupt.pin) lines.push(`\tInterrupt: pin ?${r.interrupt.pin} routed to IRQ ${r.interrupt.line}`);
  return lines;
}

function barLine(bar: BarReport): string {
  const disabled = bar.enabled ? '' : ' [disabled]';
  if (bar.kind === 'io') {
    const at = bar.address ? hex(bar.address, 4) : '<unassigned>';
    return `\tRegion ${bar.index}: I/O ports at ${at}${disabled}${sizeSuffix(bar.size)}`;
  }
  const at = bar.address ? hex(bar.address, 8) : '<unassigned>';
  const kind = `(${bar.memoryType}, ${bar.prefetchable ? '' : 'non-'}prefetchable)`;
  return `\tRegion ${bar.index}: Memory at ${at} ${kind}${disabled}${sizeSuffix(bar.size)}`;
}

function romLine(rom: RomReport): string {
  const at = rom.address ? hex(rom.address, 8) : '<unassigned>';
  return `\tExpansion ROM at ${at}${rom.enabled ? '' : ' [disabled]'}${sizeSuffix(rom.size)}`;
}

function powerManagement(cap: PowerManagementCap): string[] {
  const pme = flagTokens(cap.pmeFrom).join(',');
  const f = cap.pmc.flags;
  const s = cap.pmcsr.flags;
  return [
    `Power Management version ${cap.version}`,
    `\tFlags: ${flag(f, 'PMEClk')} ${flag(f, 'DSI')} ${flag(f, 'D1')} ${flag(f, 'D2')} AuxCurrent=${cap.auxCurrentMa}mA PME(${pme})`,
    `\tStatus: D${cap.powerState} ${flag(s, 'NoSoftRst')} ${flag(s, 'PME-Enable')} DSel=${cap.dataSelect} DScale=${cap.dataScale} ${flag(s, 'PME')}`,
  ];
}

function msi(cap: MsiCap): string[] {
  const lines = [
    `MSI: Enable${sign(cap.enabled)} Count=${cap.vectorsEnabled}/${cap.vectorsCapable} Maskable${sign(cap.maskable)} 64bit${sign(cap.is64Bit)}`,
    `\tAddress: ${hex(cap.address, cap.is64Bit ? 16 : 8)}  Data: ${hex(cap.data, 4)}`,
  ];
  if (cap.mask !== undefined && cap.pending !== undefined) lines.push(`\tMasking: ${hex(cap.mask, 8)}  Pending: ${hex(cap.pending, 8)}`);
  return lines;
}

function express(cap: ExpressCap): string[] {
  const devCap = cap.deviceCapabilities;
  const devCtl = cap.deviceControl;
  const lines = [
    `Express (v${cap.version}) ${cap.portTypeName}, MSI ${hex(cap.interruptMessage, 2)}`,
    `\tDevCap:\tMaxPayload ${devCap.maxPayload} bytes, PhantFunc ${devCap.phantomFunctions}, Latency L0s ${devCap.l0sLatency}, L1 ${devCap.l1Latency}`,
    `\t\t${flagList(devCap.flags)} SlotPowerLimit ${devCap.slotPowerLimitW}W`,
    `\tDevCtl:\t${flagList(devCtl.errorReporting)}`,
    `\t\t${flagList(devCtl.flags)}`,
    `\t\tMaxPayload ${devCtl.maxPayload} bytes, MaxReadReq ${devCtl.maxReadRequest} bytes`,
    `\tDevSta:\t${flagList(cap.deviceStatus.flags)}`,
  ];
  if (cap.link) {
    const { capability: lc, control: ctl, status: ls } = cap.link;
    const exits = [lc.aspm.includes('L0s') ? `L0s ${lc.l0sExit}` : '', lc.aspm.includes('L1') ? `L1 ${lc.l1Exit}` : ''].filter(Boolean);
    const ctlFlags = flagTokens(ctl.flags);
    lines.push(
      `\tLnkCap:\tPort #${lc.port}, Speed ${lc.speed}, Width x${lc.width}, ASPM ${lc.aspm}${exits.length ? `, Exit Latency ${exits.join(', ')}` : ''}`,
      `\t\t${flagList(lc.flags)}`,
      `\tLnkCtl:\tASPM ${ctl.aspm}; RCB ${ctl.readCompletionBoundary} bytes, ${ctlFlags.slice(0, 2).join(' ')}`,
      `\t\t${ctlFlags.slice(2).join(' ')}`,
      `\tLnkSta:\tSpeed ${ls.speed}, Width x${ls.width}`,
      `\t\t${flagList(ls.flags)}`,
    );
  }
  return lines;
}

/** The first line is the capability's title; later lines are indented under it. */
function capability(cap: Capability): string[] {
  switch (cap.kind) {
    case 'power-management': return powerManagement(cap);
    case 'msi': return msi(cap);
    case 'msi-x': return [
      `MSI-X: Enable${sign(cap.enabled)} Count=${cap.tableSize} Masked${sign(cap.functionMasked)}`,
      `\tVector table: BAR=${cap.table.bar} offset=${hex(cap.table.offset, 8)}`,
      `\tPBA: BAR=${cap.pba.bar} offset=${hex(cap.pba.offset, 8)}`,
    ];
    case 'express': return express(cap);
    case 'vendor': return [`Vendor Specific Information: Len=${hex(cap.length, 2)} <?>`];
    case 'other': return [cap.name ? `${cap.name} <?>` : `Capability ID 0x${hex(cap.id, 2)}`];
    case 'truncated': return [`Capability ID 0x${hex(cap.id, 2)} <truncated: runs past the end of config space>`];
  }
}

function aer(cap: AerCap): string[] {
  const ctl = flagTokens(cap.control.flags);
  return [
    'Advanced Error Reporting',
    `\tUESta:\t${flagList(cap.uncorrectableStatus.flags)}`,
    `\tUEMsk:\t${flagList(cap.uncorrectableMask.flags)}`,
    `\tUESvrt:\t${flagList(cap.uncorrectableSeverity.flags)}`,
    `\tCESta:\t${flagList(cap.correctableStatus.flags)}`,
    `\tCEMsk:\t${flagList(cap.correctableMask.flags)}`,
    `\tAERCap:\tFirst Error Pointer: ${hex(cap.control.firstErrorPointer, 2)}, ${ctl.slice(0, 4).join(' ')}`,
    `\t\t${ctl.slice(4).join(' ')}`,
    `\tHeaderLog: ${cap.headerLog.map((dword) => hex(dword, 8)).join(' ')}`,
  ];
}

function extendedCapability(cap: ExtendedCapability): string[] {
  switch (cap.kind) {
    case 'aer': return aer(cap);
    case 'serial-number': {
      // Most significant byte first, as lspci prints it.
      const bytes = hex(cap.serial, 16).match(/../g) ?? [];
      return [`Device Serial Number ${bytes.join('-')}`];
    }
    case 'vendor': return [`Vendor Specific Information: ID=${hex(cap.vsecId, 4)} Rev=${cap.vsecRevision} Len=${hex(cap.vsecLength, 3)} <?>`];
    case 'other': return [cap.name ? `${cap.name} <?>` : `Extended Capability ID 0x${hex(cap.id, 2)}`];
    case 'truncated': return [`Extended Capability ID 0x${hex(cap.id, 2)} <truncated: runs past the end of config space>`];
  }
}

const PROBLEMS: Record<ChainProblem['reason'], string> = {
  looped: '<chain looped>',
  broken: '<chain broken>',
  'out of range': '<chain broken: pointer out of range>',
};

function chain<C extends { offset: number }>(list: CapabilityChain<C>, label: (c: C) => string, lines: (c: C) => string[], width: number): string[] {
  const out: string[] = [];
  for (const cap of list.items) {
    const [title, ...rest] = lines(cap);
    out.push(`\tCapabilities: [${label(cap)}] ${title}`, ...rest.map((line) => `\t${line}`));
  }
  if (list.problem) out.push(`\tCapabilities: [${hex(list.problem.at, width)}] ${PROBLEMS[list.problem.reason]}`);
  return out;
}

function regionLines(region: RegionReport): string[] {
  const name = region.name ? ` (${region.name})` : '';
  const head = `\t\tRegion ${region.index}${name}:`;
  if (region.error !== undefined) return [`${head} <error: ${region.error}>`];
  if (!region.size) return [`${head} empty`];
  const mmap = region.flags?.MMAP ? ` offset=0x${hex(region.offset ?? 0n, 1)}` : '';
  const lines = [`${head} size=${formatSize(region.size)}${mmap} ${flagList(region.flags ?? {})}`];
  for (const cap of region.caps ?? []) {
    lines.push(cap.kind === 'type'
      ? `\t\t\tType: 0x${hex(cap.type, 1)} subtype 0x${hex(cap.subtype, 1)}`
      : `\t\t\tSparse mmap: ${cap.areas.map((a) => `0x${hex(a.offset, 1)}+0x${hex(a.size, 1)}`).join(' ') || '<none>'}`);
  }
  for (const id of region.unknownCapIds ?? []) lines.push(`\t\t\tCapability ID ${id} <?>`);
  return lines;
}

function irqLine(irq: IrqReport): string {
  const head = `\t\tIRQ ${irq.index}${irq.name ? ` (${irq.name})` : ''}:`;
  return irq.error !== undefined ? `${head} <error: ${irq.error}>` : `${head} count=${irq.count} ${flagList(irq.flags ?? {})}`;
}

export function formatText(r: LspciReport): string {
  const v = r.vfioUser;
  const lines = [
    titleLine(r),
    ...headerLines(r),
    ...r.bars.map(barLine),
    ...(r.rom ? [romLine(r.rom)] : []),
    ...chain(r.capabilities, (c) => hex(c.offset, 2), capability, 2),
    ...(r.extendedCapabilities ? chain(r.extendedCapabilities, (c) => `${hex(c.offset, 3)} v${c.version}`, extendedCapability, 3) : []),
    `\tvfio-user: ${flagList(v.flags)}, ${v.numRegions} regions, ${v.numIrqs} IRQ types`,
    ...v.regions.flatMap(regionLines),
    ...v.irqs.map(irqLine),
    ...r.warnings.map((w) => `\tWarning: ${w}`),
  ];
  return `${lines.join('\n')}\n`;
}

/** One JSON object; bigints (sizes, offsets, addresses, serial numbers) become "0x…" strings. */
export function formatJson(r: LspciReport): string {
  return `${JSON.stringify(r, (_key, value: unknown) => (typeof value === 'bigint' ? `0x${value.toString(16)}` : value), 2)}\n`;
}
