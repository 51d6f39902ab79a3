/** The virtio driver's buffer area: ranges carved first fit and given back in any order. */
import { describe, expect, test } from 'vitest';
import { BufferArea } from '../ts/virtio/buffer-area.js';
import { UsageError } from '../ts/index.js';

describe('BufferArea', () => {
  test('takes 16-byte-aligned ranges first fit and says when none fits', () => {
    const area = new BufferArea(256);
    expect(area.take(1)).toBe(0);
    expect(area.take(17)).toBe(16);
    expect(area.take(0)).toBe(48);
    expect(area.used).toBe(64);
    expect(area.take(193)).toBeUndefined();
    expect(area.take(192)).toBe(64);
    expect(area.take(1)).toBeUndefined();
  });

  test('ranges given back in any order merge with their free neighbours', () => {
    const area = new BufferArea(64);
    const [a, b, c, d] = [area.take(16)!, area.take(16)!, area.take(16)!, area.take(16)!];
    area.give(b, 16);
    area.give(d, 16);
    expect(area.take(32)).toBeUndefined();
    area.give(c, 16);
    expect(area.take(48)).toBe(b);
    area.give(b, 48);
    area.give(a, 16);
    expect(area.used).toBe(0);
    expect(area.take(64)).toBe(0);
  });

  test('a range given back twice, or never taken, throws', () => {
    const area = new BufferArea(64);
    const a = area.take(16)!;
    area.give(a, 16);
    expect(() => area.give(a, 16)).toThrow(/not taken/);
    expect(() => area.give(48, 32)).toThrow(/not taken/);
    expect(() => new BufferArea(10)).toThrow(UsageError);
  });
});
