/**
 * Charts for `npm run bench`: SVG documents drawn from the figures a bench
 * has just measured, written to docs/img/ (committed; the docs link them and
 * GitHub shows them). Plain SVG text, a white background, system fonts: no
 * browser or canvas to render it. The same data and caption always give the
 * same bytes (nothing is measured or dated in here but by machineNote).
 *
 *   barChart     panels of horizontal bars, each panel on its own linear axis
 *                from 0 (a panel per workload, a bar per mode or peer), with a
 *                whisker for the range over rounds and a note beside each
 *                bar's value (a ratio)
 *   stackedBars  a bar per row cut into consecutive segments on one linear
 *                axis (the median time of each stage of a command)
 *   histogram    a row of bins per sample set on one shared log axis, each
 *                row's median and 99th percentile marked (stage latencies)
 *   writeChart   writes docs/img/<name>.svg
 *   machineNote  the caption's line on when and where the figures were taken
 *
 * Every chart takes a `caption`: what was measured, and machineNote().
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/** docs/img of the package (the scripts run from dist/bench). */
const DOCS_IMG = path.resolve(__dirname, '..', '..', 'docs', 'img');

const WIDTH = 760;
const FONT = 12;
/** A generous estimate of a character's width at FONT (no font metrics here). */
const CHAR = 0.62 * FONT;
const PAD = 16;
const TITLE = 30;
const AXIS = 40;
const INK = '#222';
const GRID = '#ddd';
const MUTED = '#555';
/** Okabe and Ito's palette: told apart by colour-blind readers, dark enough on white. */
const PALETTE = ['#0072B2', '#E69F00', '#009E73', '#CC79A7', '#56B4E9', '#D55E00', '#999999', '#000000'];
/** The text colour that reads on each colour of PALETTE. */
const ON_PALETTE = ['#fff', INK, '#fff', INK, INK, '#fff', INK, '#fff'];

export interface Bar {
  label: string;
  /** The bar's length (a median, say). */
  value: number;
  /** The lowest and highest of the measurements `value` sums up (rounds of a run), drawn as a whisker over the bar. */
  range?: readonly [number, number];
  /** Printed after the value (e.g. "1.26x trap"). */
  note?: string;
}

export interface BarPanel {
  title: string;
  bars: Bar[];
}

export interface BarChart {
  title: string;
  /** The values' unit, the axes' label (e.g. "IOPS"). */
  unit: string;
  panels: BarPanel[];
  caption: string;
}

/**
 * Panels of horizontal bars, one below the other, each on its own axis from
 * 0 to a round number above its largest value (or range); a label keeps its
 * colour in every panel. A bar's range is a whisker over it.
 */
export function barChart(chart: BarChart): string {
  const labels = distinct(chart.panels.flatMap((p) => p.bars.map((b) => b.label)));
  const texts = chart.panels.flatMap((p) => p.bars.map(barText));
  const left = PAD + textWidth(labels) + 8;
  const right = WIDTH - PAD - textWidth(texts) - 8;
  const row = 20;
  const body: string[] = [];
  let y = TITLE + PAD;
  for (const panel of chart.panels) {
    body.push(text(PAD, y + FONT, panel.title, { 'font-weight': 'bold' }));
    y += FONT + 10;
    const ticks = linearTicks(Math.max(0, ...panel.bars.map((b) => Math.max(finite(b.value), finite(b.range?.[1] ?? 0)))));
    const x = scale(0, ticks[ticks.length - 1], left, right);
    const height = panel.bars.length * row;
    body.push(...verticalGrid(ticks.map(x), y, height));
    panel.bars.forEach((bar, i) => {
      const top = y + i * row;
      const end = x(finite(bar.value));
      const middle = top + row / 2;
      body.push(text(left - 8, middle + FONT / 3, bar.label, { 'text-anchor': 'end' }));
      body.push(el('rect', { x: left, y: top + 3, width: fixed(end - left), height: row - 6, fill: colour(labels, bar.label) }));
      let after = end;
      if (bar.range) {
        const [low, high] = bar.range.map((v) => x(finite(v)));
        body.push(el('path', { d: `M${fixed(low)} ${middle - 4}v8M${fixed(low)} ${middle}H${fixed(high)}M${fixed(high)} ${middle - 4}v8`, stroke: INK, 'stroke-width': 1.5, fill: 'none' }));
        after = Math.max(end, high);
      }
      body.push(text(after + 6, middle + FONT / 3, barText(bar)));
    });
    y += height;
    body.push(...xAxis(ticks.map((t) => ({ at: x(t), label: compact(t) })), left, right, y, chart.unit));
    y += AXIS + 8;
  }
  return svg(chart.title, chart.caption, y, body);
}

export interface StackedRow {
  label: string;
  /** Consecutive segments, one per name of the chart's `segments`, in order. */
  values: number[];
  /** Printed after the row's total (e.g. "of 625 µs a command"). */
  note?: string;
}

export interface StackedBars {
  title: string;
  unit: string;
  /** The segments' names, in the order they are stacked (the legend). */
  segments: readonly string[];
  rows: StackedRow[];
  caption: string;
}

/** A bar per row, cut into its segments end to end on one axis from 0; a segment wide enough carries its value, the row its total and note. */
export function stackedBars(chart: StackedBars): string {
  const left = PAD + textWidth(chart.rows.map((r) => r.label)) + 8;
  const totals = chart.rows.map((r) => r.values.reduce((sum, v) => sum + finite(v), 0));
  const totalTexts = totals.map((t, i) => format(t) + (chart.rows[i].note ? ` ${chart.rows[i].note}` : ''));
  const right = WIDTH - PAD - textWidth(totalTexts) - 8;
  const row = 26;
  const body: string[] = [];
  let y = TITLE + PAD;
  y = legend(body, chart.segments, y);
  const ticks = linearTicks(Math.max(0, ...totals));
  const x = scale(0, ticks[ticks.length - 1], left, right);
  const height = chart.rows.length * row;
  body.push(...verticalGrid(ticks.map(x), y, height));
  chart.rows.forEach((r, i) => {
    const top = y + i * row;
    body.push(text(left - 8, top + row / 2 + FONT / 3, r.label, { 'text-anchor': 'end' }));
    let sum = 0;
    r.values.forEach((v, j) => {
      const from = x(sum);
      sum += finite(v);
      const to = x(sum);
      body.push(el('rect', { x: fixed(from), y: top + 3, width: fixed(to - from), height: row - 6, fill: PALETTE[j % PALETTE.length] }));
      const label = format(v);
      if (to - from > label.length * CHAR + 4) {
        body.push(text((from + to) / 2, top + row / 2 + FONT / 3, label, { 'text-anchor': 'middle', fill: ON_PALETTE[j % PALETTE.length], 'font-size': FONT - 1 }));
      }
    });
    body.push(text(x(sum) + 6, top + row / 2 + FONT / 3, totalTexts[i]));
  });
  y += height;
  body.push(...xAxis(ticks.map((t) => ({ at: x(t), label: compact(t) })), left, right, y, chart.unit));
  return svg(chart.title, chart.caption, y + AXIS + 8, body);
}

export interface SampleRow {
  label: string;
  /** Non-finite samples (a stage not measured for that command) are left out, and counted apart. */
  samples: readonly number[];
}

export interface Histogram {
  title: string;
  /** The samples' unit and what they measure, the axis label (e.g. "µs since the doorbell was seen"). */
  unit: string;
  rows: SampleRow[];
  caption: string;
}

/** Bins a decade is cut into on a histogram's log axis. */
const BINS_PER_DECADE = 16;

/**
 * A histogram per row on one log axis (latencies spread over decades and a
 * tail), bins of equal width on it, each row's bars scaled to its fullest
 * bin (a bin with any sample shows); the median (solid) and 99th
 * percentile (dashed) of each row marked and labelled, and its sample count.
 * A row with nothing measured stays, low and saying so, so that rows keep
 * their places and colours from chart to chart.
 */
export function histogram(chart: Histogram): string {
  const rows = chart.rows.map((r) => ({ label: r.label, samples: r.samples.filter(Number.isFinite), left: r.samples.length }));
  for (const r of rows) r.left -= r.samples.length;
  // From the power of ten below the smallest sample to the quarter decade above the largest
  // (a reduce: a spread of a long run's samples overflows the call stack).
  const positive = rows.flatMap((r) => r.samples).filter((v) => v > 0);
  const least = positive.reduce((a, b) => Math.min(a, b), Infinity);
  const most = positive.reduce((a, b) => Math.max(a, b), 0);
  const lo = positive.length ? 10 ** Math.floor(Math.log10(least)) : 1;
  const hi = Math.max(lo * 10, positive.length ? 10 ** (Math.ceil(Math.log10(most) * 4) / 4) : 0);
  const edges = logEdges(lo, hi, BINS_PER_DECADE);
  const counts = rows.map((r) => `n ${format(r.samples.length)}` + (r.left ? ` (+${format(r.left)} unmeasured)` : ''));
  const left = PAD + textWidth([...counts, ...rows.map((r) => r.label)]) + 8;
  const right = WIDTH - PAD - 8;
  const x = logScale(lo, hi, left, right);
  const body: string[] = [];
  let y = TITLE + PAD + FONT;
  const top = y;
  rows.forEach((r, i) => {
    const bins = binCounts(r.samples, edges);
    const fullest = Math.max(1, ...bins);
    const height = r.samples.length ? 64 : 36;
    const base = y + height;
    body.push(text(left - 8, base - height / 2, r.label, { 'text-anchor': 'end', 'font-weight': 'bold' }));
    body.push(text(left - 8, base - height / 2 + FONT + 2, counts[i], { 'text-anchor': 'end', fill: MUTED }));
    if (!r.samples.length) body.push(text(left + 8, base - height / 2 + FONT / 2, 'not measured', { fill: MUTED }));
    bins.forEach((n, b) => {
      if (n === 0) return;
      // At least a sliver: a bin of a few tail samples next to thousands still shows.
      const h = Math.max(1.5, ((height - FONT - 8) * n) / fullest);
      const from = x(edges[b]);
      body.push(el('rect', { x: fixed(from), y: fixed(base - h), width: fixed(x(edges[b + 1]) - from - 0.5), height: fixed(h), fill: PALETTE[i % PALETTE.length] }));
    });
    body.push(el('line', { x1: left, x2: right, y1: base, y2: base, stroke: INK }));
    if (r.samples.length) {
      const median = percentile(r.samples, 0.5);
      const p99 = percentile(r.samples, 0.99);
      body.push(marker(x(Math.max(lo, median)), base, height, `median ${format(median)}`, 'end', ''));
      body.push(marker(x(Math.max(lo, p99)), base, height, `p99 ${format(p99)}`, 'start', '4 3'));
    }
    y = base + 8;
  });
  const ticks = logTicks(lo, hi);
  body.unshift(...verticalGrid(ticks.map(x), top, y - top - 8));
  body.push(...xAxis(ticks.map((t) => ({ at: x(t), label: compact(t) })), left, right, y - 8, `${chart.unit} (log scale)`));
  return svg(chart.title, chart.caption, y - 8 + AXIS + 8, body);
}

/** Writes `svg` to docs/img/<name>.svg; returns the path written. */
export function writeChart(name: string, svgText: string): string {
  if (!/^[a-z0-9][a-z0-9-]*$/.test(name)) throw new Error(`chart name ${JSON.stringify(name)}: expected lower-case letters, digits and dashes`);
  fs.mkdirSync(DOCS_IMG, { recursive: true });
  const file = path.join(DOCS_IMG, `${name}.svg`);
  fs.writeFileSync(file, svgText);
  return file;
}

/** When and on what the figures were taken: the date, the CPU, its load (a loaded machine gives noisy figures), Node and the kernel. */
export function machineNote(now = new Date()): string {
  const cpus = os.cpus();
  const load = os.loadavg()[0];
  const busy = load >= cpus.length / 2 ? ', a busy machine: figures are noisy' : '';
  return `${now.toISOString().slice(0, 16).replace('T', ' ')} UTC, ${cpus[0]?.model.trim() ?? 'unknown CPU'}, ${cpus.length} CPUs, load ${load.toFixed(1)}${busy}; Node ${process.versions.node}, Linux ${os.release()}`;
}

/** The value below which a share `p` (0 to 1) of `values` lie: the nearest rank, no interpolation. */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

/** How many of `samples` fall in each bin [edges[i], edges[i + 1]); those below the first or from the last edge on count in the first or last bin. */
export function binCounts(samples: readonly number[], edges: readonly number[]): number[] {
  const counts = new Array<number>(edges.length - 1).fill(0);
  for (const v of samples) {
    let b = 0;
    while (b < counts.length - 1 && v >= edges[b + 1]) b++;
    counts[b]++;
  }
  return counts;
}

/** Bin edges from `lo` to `hi`, `perDecade` to each power of ten, evenly spaced on a log axis. */
export function logEdges(lo: number, hi: number, perDecade: number): number[] {
  const steps = Math.ceil(Math.log10(hi / lo) * perDecade - 1e-9);
  return Array.from({ length: steps + 1 }, (_, i) => round(lo * 10 ** (i / perDecade)));
}

/** Axis ticks from 0 to a round number at or above `max`: steps of 1, 2 or 5 times a power of ten, about five of them. */
export function linearTicks(max: number): number[] {
  if (!(max > 0)) return [0, 1];
  const rough = max / 5;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough)!;
  const count = Math.ceil(max / step - 1e-9);
  return Array.from({ length: count + 1 }, (_, i) => round(i * step));
}

/** Powers of ten from `lo` to `hi`, with 2 and 5 times each between when there are few decades. */
function logTicks(lo: number, hi: number): number[] {
  const decades = Math.log10(hi / lo);
  const steps = decades <= 3 ? [1, 2, 5] : [1];
  const ticks: number[] = [];
  for (let p = lo; p <= hi * (1 + 1e-9); p *= 10) for (const m of steps) if (p * m <= hi * (1 + 1e-9)) ticks.push(round(p * m));
  return ticks;
}

function scale(from: number, to: number, left: number, right: number): (v: number) => number {
  return (v) => left + ((right - left) * (v - from)) / (to - from);
}

function logScale(lo: number, hi: number, left: number, right: number): (v: number) => number {
  const span = Math.log10(hi / lo);
  return (v) => left + ((right - left) * Math.log10(Math.max(v, lo) / lo)) / span;
}

function legend(body: string[], names: readonly string[], y: number): number {
  let x = PAD;
  for (const [i, name] of names.entries()) {
    const width = 14 + name.length * CHAR + 16;
    if (x + width > WIDTH - PAD) {
      x = PAD;
      y += FONT + 8;
    }
    body.push(el('rect', { x, y: y + 1, width: 10, height: 10, fill: PALETTE[i % PALETTE.length] }));
    body.push(text(x + 14, y + 10, name));
    x += width;
  }
  return y + FONT + 12;
}

function verticalGrid(xs: number[], y: number, height: number): string[] {
  return xs.map((x) => el('line', { x1: fixed(x), x2: fixed(x), y1: y, y2: fixed(y + height), stroke: GRID }));
}

function xAxis(ticks: { at: number; label: string }[], left: number, right: number, y: number, label: string): string[] {
  return [
    el('line', { x1: left, x2: right, y1: y, y2: y, stroke: INK }),
    ...ticks.flatMap((t) => [
      el('line', { x1: fixed(t.at), x2: fixed(t.at), y1: y, y2: y + 4, stroke: INK }),
      text(t.at, y + 4 + FONT, t.label, { 'text-anchor': 'middle' }),
    ]),
    text((left + right) / 2, y + 4 + 2 * FONT + 6, label, { 'text-anchor': 'middle', fill: MUTED }),
  ];
}

/** A vertical line over a histogram row at `x`, labelled at its top on the `side` it reads from. */
function marker(x: number, base: number, height: number, label: string, side: 'start' | 'end', dash: string): string {
  const top = base - height + FONT;
  return [
    el('line', { x1: fixed(x), x2: fixed(x), y1: top, y2: base, stroke: INK, 'stroke-width': 1.5, ...(dash ? { 'stroke-dasharray': dash } : {}) }),
    text(x + (side === 'start' ? 4 : -4), top, label, { 'text-anchor': side, 'font-size': FONT - 1 }),
  ].join('');
}

/** The whole document: white background, the title, the body, the caption wrapped below it. */
function svg(title: string, caption: string, bodyEnd: number, body: string[]): string {
  const lines = wrap(caption, Math.floor((WIDTH - 2 * PAD) / (0.58 * (FONT - 1))));
  const height = Math.ceil(bodyEnd + 4 + lines.length * (FONT + 3) + PAD);
  const captionText = lines.map((line, i) => text(PAD, bodyEnd + 4 + (i + 1) * (FONT + 3) - 3, line, { fill: MUTED, 'font-size': FONT - 1 }));
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${height}" viewBox="0 0 ${WIDTH} ${height}" font-family="Helvetica, Arial, sans-serif" font-size="${FONT}" fill="${INK}">`,
    `<title>${escape(title)}</title>`,
    el('rect', { width: WIDTH, height, fill: '#fff' }),
    text(PAD, PAD + FONT + 2, title, { 'font-size': FONT + 3, 'font-weight': 'bold' }),
    ...body,
    ...captionText,
    '</svg>',
    '',
  ].join('\n');
}

function el(tag: string, attrs: Record<string, string | number>): string {
  return `<${tag}${attributes(attrs)}/>`;
}

function text(x: number, y: number, content: string, attrs: Record<string, string | number> = {}): string {
  return `<text${attributes({ x: fixed(x), y: fixed(y), ...attrs })}>${escape(content)}</text>`;
}

function attributes(attrs: Record<string, string | number>): string {
  return Object.entries(attrs).map(([k, v]) => ` ${k}="${escape(String(v))}"`).join('');
}

/** Text as SVG (XML) character data or an attribute value. */
export function escape(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&${{ '&': 'amp', '<': 'lt', '>': 'gt', '"': 'quot', "'": 'apos' }[c]};`);
}

/** Lines of at most `width` characters, broken at spaces. */
function wrap(s: string, width: number): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of s.split(/\s+/).filter(Boolean)) {
    if (line && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) lines.push(line);
  return lines;
}

function barText(bar: Bar): string {
  return format(bar.value) + (bar.note ? ` (${bar.note})` : '');
}

/** A figure as the docs write it: thousands apart from 1000 on ("19 349"), at most three significant digits below, no trailing zeros. */
export function format(v: number): string {
  if (!Number.isFinite(v)) return 'n/a';
  if (Math.abs(v) >= 1000) return Math.round(v).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ' ');
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(1).replace(/\.0$/, '');
  return v === 0 ? '0' : v.toPrecision(2).replace(/^(\d+\.\d*?)0+$/, '$1').replace(/\.$/, '');
}

/** A tick label: 5k, 1.5M. */
function compact(v: number): string {
  if (v >= 1e6) return `${round(v / 1e6)}M`;
  if (v >= 1e3) return `${round(v / 1e3)}k`;
  return String(round(v));
}

function textWidth(texts: string[]): number {
  return Math.max(0, ...texts.map((t) => t.length)) * CHAR;
}

function distinct(labels: string[]): string[] {
  return [...new Set(labels)];
}

function colour(labels: string[], label: string): string {
  return PALETTE[labels.indexOf(label) % PALETTE.length];
}

/** A value a bar can be drawn at: a missing or negative figure draws as nothing. */
function finite(v: number): number {
  return Number.isFinite(v) && v > 0 ? v : 0;
}

/** Coordinates with two decimals: enough for a screen, and the same text for the same data. */
function fixed(v: number): string {
  return String(Math.round(v * 100) / 100);
}

/** Rounds off the binary noise of repeated multiplication (0.30000000000000004). */
function round(v: number): number {
  return Number(v.toPrecision(12));
}
