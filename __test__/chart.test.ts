/**
 * The bench's charts (bench/chart.ts): what they draw follows the data: bars
 * in proportion to their values on an axis that holds them, every sample in
 * some bin, the marks where the percentiles are, text escaped, and the same
 * bytes for the same data.
 */
import { describe, expect, test } from 'vitest';
import { barChart, binCounts, escape, format, histogram, linearTicks, logEdges, percentile, stackedBars } from '../bench/chart.js';

interface Rect { x: number; y: number; width: number; height: number; fill: string }

/** The filled rectangles of a chart, but its white background. */
function rects(svg: string): Rect[] {
  return [...svg.matchAll(/<rect ([^>]*)\/>/g)]
    .map((m) => Object.fromEntries([...m[1].matchAll(/([\w-]+)="([^"]*)"/g)].map((a) => [a[1], a[2]])))
    .filter((a) => a.fill !== '#fff')
    .map((a) => ({ x: Number(a.x), y: Number(a.y), width: Number(a.width), height: Number(a.height), fill: a.fill }));
}

/** The text of a chart's <text> elements, entities decoded. */
function texts(svg: string): string[] {
  const decode: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };
  return [...svg.matchAll(/<text[^>]*>([^<]*)<\/text>/g)].map((m) => m[1].replace(/&(\w+);/g, (_, e: string) => decode[e]));
}

/** Every tag closed or self-closed and no markup character loose in text or attributes. */
function wellFormed(svg: string): boolean {
  const stack: string[] = [];
  for (const m of svg.matchAll(/<(\/?)([\w]+)((?:\s+[\w-]+="[^"<>]*")*)\s*(\/?)>/g)) {
    if (m[1]) {
      if (stack.pop() !== m[2]) return false;
    } else if (!m[4]) stack.push(m[2]);
  }
  const outside = svg.replace(/<\/?[\w]+(?:\s+[\w-]+="[^"<>]*")*\s*\/?>/g, '');
  return stack.length === 0 && !/[<>]/.test(outside) && !/&(?!(amp|lt|gt|quot|apos);)/.test(svg);
}

const caption = '2026-12-06 10:00 UTC, test CPU, 2 CPUs, load 0.1';

describe('barChart', () => {
  const chart = {
    title: 'IOPS',
    unit: 'IOPS',
    caption,
    panels: [
      { title: 'randread 4 KiB, QD 1', bars: [{ label: 'trap', value: 1000, note: '1.00x' }, { label: 'mmap', value: 2500, note: '2.50x' }, { label: 'none', value: 0 }] },
      { title: 'randread 4 KiB, QD 32', bars: [{ label: 'mmap', value: 90_000 }, { label: 'trap', value: 30_000 }] },
    ],
  };
  const svg = barChart(chart);
  const bars = rects(svg);

  test('a bar per value, widths in proportion to the values within a panel, all starting at the same axis', () => {
    expect(bars).toHaveLength(5);
    expect(bars[1].width / bars[0].width).toBeCloseTo(2.5, 2);
    expect(bars[2].width).toBe(0);
    expect(bars[3].width / bars[4].width).toBeCloseTo(3, 2);
    expect(new Set(bars.map((b) => b.x)).size).toBe(1);
    // Each panel has its own axis, to a round number at or above its largest value (2.5k, 100k).
    expect(bars[1].width / bars[3].width).toBeCloseTo(2500 / 2500 / (90_000 / 100_000), 2);
  });

  test('a label keeps its colour across panels; values, notes, units and caption are printed', () => {
    expect(bars[0].fill).toBe(bars[4].fill);
    expect(bars[1].fill).toBe(bars[3].fill);
    expect(bars[0].fill).not.toBe(bars[1].fill);
    const t = texts(svg);
    expect(t).toContain('2 500 (2.50x)');
    expect(t).toContain('90 000');
    expect(t).toContain('IOPS');
    expect(t.join(' ')).toContain(caption);
  });

  test('the axis ends at a round number that holds the largest value', () => {
    const t = texts(svg);
    expect(t).toContain('100k');
    expect(t).toContain('2.5k');
  });

  test('text is escaped: labels, titles and captions with markup characters stay text', () => {
    const hostile = '<script>&"x\'</script>';
    const s = barChart({ title: hostile, unit: hostile, caption: hostile, panels: [{ title: hostile, bars: [{ label: hostile, value: 1, note: hostile }] }] });
    expect(s).not.toContain('<script>');
    expect(wellFormed(s)).toBe(true);
    expect(texts(s).filter((t) => t.includes(hostile)).length).toBeGreaterThanOrEqual(4);
    expect(escape('a<b>&"\'')).toBe('a&lt;b&gt;&amp;&quot;&apos;');
  });

  test('a range is a whisker from its low to its high value on the bar\'s axis, and the axis holds it', () => {
    const ranged = barChart({ title: 't', unit: 'IOPS', caption, panels: [{ title: 'p', bars: [{ label: 'a', value: 100, range: [50, 400] }, { label: 'b', value: 200 }] }] });
    const [a, b] = rects(ranged);
    const whisker = [...ranged.matchAll(/<path d="M([\d.]+) [\d.]+v8M[\d.]+ [\d.]+H([\d.]+)M/g)].map((m) => [Number(m[1]), Number(m[2])]);
    expect(whisker).toHaveLength(1);
    const [low, high] = whisker[0];
    const perUnit = a.width / 100;
    expect(b.width / a.width).toBeCloseTo(2, 2);
    expect(low - a.x).toBeCloseTo(50 * perUnit, 0);
    expect(high - a.x).toBeCloseTo(400 * perUnit, 0);
    expect(texts(ranged)).toContain('400'); // the axis's last tick
  });

  test('the same data draws the same bytes', () => {
    expect(barChart(structuredClone(chart))).toBe(svg);
    expect(wellFormed(svg)).toBe(true);
  });
});

describe('stackedBars', () => {
  test('segments end to end in proportion to their values, and totals printed', () => {
    const svg = stackedBars({ title: 't', unit: 'µs', caption, segments: ['a', 'b', 'c'], rows: [{ label: 'one', values: [1, 2, 3] }, { label: 'two', values: [4, 0, 8] }] });
    const segments = rects(svg).filter((r) => r.width !== 10); // the legend's squares are 10 wide
    expect(segments).toHaveLength(6);
    const [a, b, c, d] = segments;
    expect(b.x).toBeCloseTo(a.x + a.width, 1);
    expect(c.x).toBeCloseTo(b.x + b.width, 1);
    expect(b.width / a.width).toBeCloseTo(2, 2);
    expect(d.width / a.width).toBeCloseTo(4, 2);
    expect(a.fill).toBe(d.fill);
    expect(texts(svg)).toEqual(expect.arrayContaining(['6', '12', 'a', 'b', 'c']));
    expect(wellFormed(svg)).toBe(true);
  });
});

describe('histogram', () => {
  // 1000 samples: most near 10, a tail to 400, one below and NaNs (stages not reached).
  const samples = Array.from({ length: 1000 }, (_, i) => (i < 900 ? 8 + (i % 10) * 0.5 : 40 + (i - 900) * 3.6));
  samples.push(0.3, NaN, NaN);
  const svg = histogram({ title: 'stages', unit: 'µs', caption, rows: [{ label: 'fetched', samples }, { label: 'posted', samples: samples.map((v) => v * 2) }] });

  test('the bins count every sample, those outside the edges in the end bins', () => {
    const edges = logEdges(1, 100, 12);
    expect(edges).toHaveLength(25);
    expect(edges[12]).toBe(10);
    const finite = samples.filter(Number.isFinite);
    const counts = binCounts(finite, edges);
    expect(counts.reduce((a, b) => a + b, 0)).toBe(finite.length);
    expect(counts[0]).toBe(1); // 0.3, below the first edge
    expect(counts[counts.length - 1]).toBeGreaterThan(0); // the tail past 100
    expect(binCounts([1, 10, 99.9, 100, 1e9], [1, 10, 100])).toEqual([1, 4]);
  });

  test('a row\'s bars follow its samples and its fullest bin is drawn full height', () => {
    const bars = rects(svg);
    const rows = [bars.filter((b) => b.fill === bars[0].fill), bars.filter((b) => b.fill !== bars[0].fill)];
    const tallest = rows.map((row) => Math.max(...row.map((b) => b.height)));
    expect(tallest[0]).toBeGreaterThan(20);
    expect(tallest[1]).toBe(tallest[0]);
    // Bins in proportion: the 900 samples from 8 to 12.5 outweigh the 100 of the tail.
    const heights = (row: Rect[], from: number, to: number) => row.filter((b) => b.x >= from && b.x < to).reduce((sum, b) => sum + b.height, 0);
    const body = heights(rows[0], 0, rows[0].find((b) => b.height === tallest[0])!.x + 40);
    expect(body).toBeGreaterThan(3 * heights(rows[0], rows[0].find((b) => b.height === tallest[0])!.x + 40, Infinity));
    // The second row's samples are twice the first's: on a log axis its bars sit log10(2) of a decade further right.
    const shift = rows[1][0].x - rows[0][0].x;
    expect(shift).toBeGreaterThan(0);
    expect(texts(svg)).toEqual(expect.arrayContaining(['n 1 001 (+2 unmeasured)', 'fetched', 'posted']));
  });

  test('the median and p99 are marked where the samples put them', () => {
    const finite = samples.filter(Number.isFinite);
    const median = percentile(finite, 0.5);
    const p99 = percentile(finite, 0.99);
    expect(median).toBeGreaterThanOrEqual(8);
    expect(median).toBeLessThan(13);
    expect(p99).toBeGreaterThan(300);
    const t = texts(svg);
    expect(t).toContain(`median ${format(median)}`);
    expect(t).toContain(`p99 ${format(p99)}`);
    expect(t).toContain(`p99 ${format(2 * p99)}`);
    expect(t).toContain('µs (log scale)');
  });

  test('a row with nothing measured keeps its place and colour, and says so', () => {
    const withEmpty = histogram({ title: 't', unit: 'µs', caption, rows: [{ label: 'seen', samples: [NaN, NaN] }, { label: 'fetched', samples: [1, 2, 3] }] });
    const alone = histogram({ title: 't', unit: 'µs', caption, rows: [{ label: 'seen', samples: [4] }, { label: 'fetched', samples: [1, 2, 3] }] });
    expect(texts(withEmpty)).toEqual(expect.arrayContaining(['not measured', 'n 0 (+2 unmeasured)', 'n 3']));
    // 'fetched' is drawn in the second colour whether or not 'seen' has samples.
    const seen = rects(alone)[0].fill;
    const fetched = rects(alone).at(-1)!.fill;
    expect(fetched).not.toBe(seen);
    expect(new Set(rects(withEmpty).map((r) => r.fill))).toEqual(new Set([fetched]));
  });

  test('the same data draws the same bytes', () => {
    expect(histogram({ title: 'stages', unit: 'µs', caption, rows: [{ label: 'fetched', samples: [...samples] }, { label: 'posted', samples: samples.map((v) => v * 2) }] })).toBe(svg);
    expect(wellFormed(svg)).toBe(true);
  });
});

test('axis ticks hold the maximum in about five round steps', () => {
  for (const max of [0.7, 1, 9, 12, 99, 101, 2500, 19_349, 837_009]) {
    const ticks = linearTicks(max);
    expect(ticks[0]).toBe(0);
    expect(ticks[ticks.length - 1]).toBeGreaterThanOrEqual(max);
    expect(ticks.length).toBeGreaterThanOrEqual(3);
    expect(ticks.length).toBeLessThanOrEqual(11);
    expect(ticks[ticks.length - 2]).toBeLessThan(max);
  }
  expect(linearTicks(0.3)).toEqual([0, 0.1, 0.2, 0.3]);
});

test('figures are printed as the docs write them', () => {
  expect([format(19_349.4), format(837_009), format(123.4), format(12.34), format(3.6), format(0.8), format(5), format(0), format(NaN)])
    .toEqual(['19 349', '837 009', '123', '12.3', '3.6', '0.8', '5', '0', 'n/a']);
});
