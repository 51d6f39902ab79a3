/**
 * Capability lists: placing each capability (at its fixed `at`, or the
 * lowest free dword-aligned slot) and chaining them, for the standard list
 * (0x40-0xFF, §10.3) and the extended one (0x100-0xFFF, §10.4).
 */
import type { ConfigSpace } from './config.js';
import { InvalidDeviceError } from './description.js';
import { Cap, Cfg, CONFIG_HEADER_END, CONFIG_SIZE, EXTENDED_CONFIG_SIZE, ExtCap, Status } from './spec.js';

/** One capability to place: `field` names it in errors. */
export interface Slot {
  field: string;
  size: number;
  at?: number;
}

interface Space {
  start: number;
  end: number;
}

export const STANDARD_SPACE: Space = { start: CONFIG_HEADER_END, end: CONFIG_SIZE };
export const EXTENDED_SPACE: Space = { start: CONFIG_SIZE, end: EXTENDED_CONFIG_SIZE };

const hex = (n: number) => `0x${n.toString(16)}`;
const dwords = (size: number) => (size + 3) & ~3;

/** Offsets for `slots` in `space`: fixed ones checked, the others first-fit in order. */
export function place(slots: readonly Slot[], space: Space): number[] {
  const taken: { start: number; end: number; field: string }[] = [];
  const claim = (slot: Slot, start: number) => {
    const end = start + dwords(slot.size);
    const clash = taken.find((t) => t.start < end && start < t.end);
    if (clash) {
      throw new InvalidDeviceError(`${slot.field}.at`, `${hex(start)}-${hex(start + slot.size - 1)} overlaps ${clash.field} at ${hex(clash.start)}-${hex(clash.end - 1)}`);
    }
    taken.push({ start, end, field: slot.field });
  };
  const offsets: number[] = new Array(slots.length);
  slots.forEach((slot, i) => {
    if (slot.at === undefined) return;
    const field = `${slot.field}.at`;
    if (!Number.isInteger(slot.at) || slot.at % 4 !== 0) throw new InvalidDeviceError(field, `${slot.at} is not dword aligned`);
    if (slot.at < space.start) throw new InvalidDeviceError(field, `${hex(slot.at)} is below ${hex(space.start)}`);
    if (slot.at + slot.size > space.end) {
      throw new InvalidDeviceError(field, `${slot.size} bytes at ${hex(slot.at)} run past the end of config space (${hex(space.end)})`);
    }
    claim(slot, slot.at);
    offsets[i] = slot.at;
  });
  slots.forEach((slot, i) => {
    if (slot.at !== undefined) return;
    let start = space.start;
    for (const t of [...taken].sort((a, b) => a.start - b.start)) {
      if (start + dwords(slot.size) <= t.start) break;
      start = Math.max(start, t.end);
    }
    if (start + slot.size > space.end) throw new InvalidDeviceError(slot.field, `no room left for its ${slot.size} bytes`);
    claim(slot, start);
    offsets[i] = start;
  });
  return offsets;
}

/** Links standard capabilities (ID at +0, next at +1) in ascending offset order. */
export function chainStandard(config: ConfigSpace, caps: readonly { at: number; id: number }[]): void {
  if (caps.length === 0) return;
  const sorted = [...caps].sort((a, b) => a.at - b.at);
  sorted.forEach((cap, i) => {
    config.define(cap.at + Cap.ID, 1, cap.id);
    config.define(cap.at + Cap.NEXT, 1, sorted[i + 1]?.at ?? 0);
  });
  config.define(Cfg.CAPABILITIES, 1, sorted[0].at);
  config.setBits16(Cfg.STATUS, Status.CAPABILITIES, true);
}

/** Links extended capabilities (header: ID 15:0, version 19:16, next 31:20); the first must be at 0x100. */
export function chainExtended(
  config: ConfigSpace,
  caps: readonly { at: number; id: number; version: number; field: string }[],
): void {
  if (caps.length === 0) return;
  const sorted = [...caps].sort((a, b) => a.at - b.at);
  if (sorted[0].at !== EXTENDED_SPACE.start) {
    throw new InvalidDeviceError(`${sorted[0].field}.at`, `the extended list must start at ${hex(EXTENDED_SPACE.start)}; the lowest is at ${hex(sorted[0].at)}`);
  }
  sorted.forEach((cap, i) => {
    const next = sorted[i + 1]?.at ?? 0;
    config.define(cap.at, 4, (cap.id | (cap.version << ExtCap.VERSION_SHIFT) | (next << ExtCap.NEXT_SHIFT)) >>> 0);
  });
}
