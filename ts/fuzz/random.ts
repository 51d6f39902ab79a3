/**
 * The fuzzer's only source of randomness: a seeded generator (SplitMix32
 * seeding sfc32), so a seed names one sequence of operations on any machine
 * and a failure replays.
 */
export class Random {
  private a: number;
  private b: number;
  private c: number;
  private d = 1;

  constructor(readonly seed: number) {
    let s = seed >>> 0;
    const splitmix = () => {
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = splitmix();
    this.b = splitmix();
    this.c = splitmix();
    // A few rounds so that nearby seeds part ways at once.
    for (let i = 0; i < 12; i++) this.u32();
  }

  /** A uniform 32-bit unsigned integer. */
  u32(): number {
    const t = (((this.a + this.b) >>> 0) + this.d) >>> 0;
    this.d = (this.d + 1) >>> 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) >>> 0;
    this.c = ((this.c << 21) | (this.c >>> 11)) >>> 0;
    this.c = (this.c + t) >>> 0;
    return t;
  }

  /** An integer in [0, n); n up to 2^32. */
  below(n: number): number {
    return Math.floor((this.u32() / 2 ** 32) * n);
  }

  /** An integer in [min, max]. */
  between(min: number, max: number): number {
    return min + this.below(max - min + 1);
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)];
  }

  /** One item, each with its weight. */
  weighted<T>(items: readonly (readonly [T, number])[]): T {
    const total = items.reduce((sum, [, w]) => sum + w, 0);
    let at = this.u32() / 2 ** 32 * total;
    for (const [item, w] of items) {
      if ((at -= w) < 0) return item;
    }
    return items[items.length - 1][0];
  }

  /** A uniform 64-bit unsigned integer. */
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }

  /** `length` random bytes, as a hex string (the form ops carry them in). */
  hexBytes(length: number): string {
    let out = '';
    for (let i = 0; i < length; i++) out += this.below(256).toString(16).padStart(2, '0');
    return out;
  }

  /**
   * A value a register is likely to mind: 0, all ones, one bit, the byte
   * boundaries, or anything, as a `width`-byte unsigned integer.
   */
  edgeValue(width: number): bigint {
    const bits = BigInt(8 * width);
    const ones = (1n << bits) - 1n;
    const any = this.u64() & ones;
    switch (this.below(8)) {
      case 0: return 0n;
      case 1: return ones;
      case 2: return 1n << BigInt(this.below(8 * width));
      case 3: return ones ^ (1n << BigInt(this.below(8 * width)));
      case 4: return ones >> 1n;
      case 5: return BigInt(this.below(256));
      default: return any;
    }
  }
}
