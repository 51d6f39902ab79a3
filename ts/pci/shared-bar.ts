/**
 * Checks for shareable BARs: the memory a client may mmap and the sparse
 * areas it may map. Mappable areas are whole pages because the client maps
 * them with mmap, and never overlap because QEMU maps each one separately.
 */
import { MMAP_PAGE_SIZE, SharedMemory } from '../dma/shared-memory.js';
import { InvalidDeviceError, type BarArea, type BarDescription } from './description.js';

/** Validates `shared` and `mmap`; returns the areas the client may map (none for an unshared BAR). */
export function checkSharing(bar: BarDescription, field: string): BarArea[] {
  const { shared, mmap } = bar as { shared?: unknown; mmap?: unknown };
  if (shared === undefined) {
    if (mmap !== undefined) throw new InvalidDeviceError(`${field}.mmap`, 'needs `shared`: only shared memory can be mapped');
    return [];
  }
  if (bar.kind !== 'memory') throw new InvalidDeviceError(`${field}.shared`, 'I/O BARs cannot be mapped');
  if (shared !== true && !(shared instanceof SharedMemory)) throw new InvalidDeviceError(`${field}.shared`, 'must be true or a SharedMemory');
  if (bar.size < MMAP_PAGE_SIZE) throw new InvalidDeviceError(`${field}.size`, `a shared BAR is at least ${MMAP_PAGE_SIZE} bytes (mmaps are whole pages)`);
  if (shared instanceof SharedMemory) {
    if (shared.closed) throw new InvalidDeviceError(`${field}.shared`, 'the SharedMemory is closed');
    if (shared.size !== bar.size) throw new InvalidDeviceError(`${field}.shared`, `a SharedMemory of ${shared.size} bytes for a ${bar.size}-byte BAR`);
  }
  if (mmap === undefined) return [{ offset: 0, size: bar.size }];
  if (!Array.isArray(mmap) || mmap.length === 0) {
    throw new InvalidDeviceError(`${field}.mmap`, 'must be a non-empty array (omit `shared` for a BAR the client cannot map)');
  }
  const areas = mmap as BarArea[];
  areas.forEach((a, i) => {
    const whole = (n: number) => Number.isInteger(n) && n >= 0 && n % MMAP_PAGE_SIZE === 0;
    if (!whole(a.offset) || !whole(a.size) || a.size === 0 || a.offset + a.size > bar.size) {
      throw new InvalidDeviceError(`${field}.mmap[${i}]`, `${a.size} bytes at ${a.offset} are not whole ${MMAP_PAGE_SIZE}-byte pages inside the ${bar.size}-byte BAR`);
    }
    const other = areas.findIndex((b, j) => j < i && a.offset < b.offset + b.size && b.offset < a.offset + a.size);
    if (other >= 0) throw new InvalidDeviceError(`${field}.mmap[${i}]`, `overlaps mmap[${other}]`);
  });
  return areas.map(({ offset, size }) => ({ offset, size }));
}
