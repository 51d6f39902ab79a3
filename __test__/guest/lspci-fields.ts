/**
 * The fields of one device's `lspci -vv` text that must agree between two views of the same
 * device (a guest's lspci and ours): IDs, class, revision, subsystem, BAR kinds and sizes, the
 * expansion ROM's size, and the capability list (offsets, versions, names, MSI-X table and PBA
 * placement). Addresses, enable bits and other live state are left out.
 */
export interface LspciFields {
  ids: string;
  subsystem?: string;
  regions: string[];
  rom?: string;
  capabilities: string[];
}

export function lspciFields(text: string): LspciFields {
  const lines = text.split('\n');
  const head = /\[([0-9a-f]{4})\]: .*?\[([0-9a-f]{4}):([0-9a-f]{4})\](?: \(rev ([0-9a-f]{2})\))?(?: \(prog-if ([0-9a-f]{2}))?/.exec(lines[0]);
  if (!head) throw new Error(`not an lspci -vv -nn device header: ${lines[0]}`);
  const [, cls, vendor, device, rev = '00', progIf = '00'] = head;
  const fields: LspciFields = { ids: `class ${cls}${progIf} ${vendor}:${device} rev ${rev}`, regions: [], capabilities: [] };
  for (const line of lines.slice(1)) {
    const subsystem = /^\tSubsystem: .*\[([0-9a-f]{4}:[0-9a-f]{4})\]/.exec(line);
    if (subsystem) fields.subsystem = subsystem[1];
    const region = /^\tRegion (\d): (Memory|I\/O ports) at .*?(?:\((\d+)-bit, (non-prefetchable|prefetchable)\))?.*\[size=(\w+)\]/.exec(line);
    if (region) {
      const [, n, kind, width, prefetch, size] = region;
      fields.regions.push(`${n}: ${kind}${width ? ` ${width}-bit ${prefetch}` : ''} size=${size}`);
    }
    const rom = /^\tExpansion ROM at .*\[size=(\w+)\]/.exec(line);
    if (rom) fields.rom = `size=${rom[1]}`;
    const cap = /^\tCapabilities: \[([0-9a-f]+)(?: (v\d+))?\] ([^:]*)/.exec(line);
    if (cap) fields.capabilities.push(`[${cap[1]}${cap[2] ? ` ${cap[2]}` : ''}] ${cap[3].trim()}`);
    const msix = /^\t\t(Vector table|PBA): (BAR=\d+ offset=[0-9a-f]+)/.exec(line);
    if (msix) fields.capabilities.push(`  ${msix[1]} ${msix[2]}`);
  }
  return fields;
}

/** The section of a multi-device `lspci -vv -nn` listing for the device at `slot` (e.g. 00:03.0). */
export function deviceSection(listing: string, slot: string): string {
  const blocks = listing.split(/\n(?=\S)/);
  const block = blocks.find((b) => b.startsWith(`${slot} `));
  if (!block) throw new Error(`no device ${slot} in:\n${listing}`);
  return block.slice(slot.length + 1);
}
