// Line and grouped-bar charts as plain SVG, for the benchmarks' comparisons and training curves. Scales,
// ticks and line paths come from d3 (d3-scale, d3-shape), which need no DOM; the layout is ours. Series
// are told apart by the Okabe-Ito palette (distinct with every common colour-vision deficiency) and,
// for lines, by dash pattern and marker too. Every bar and point carries its series and value in data
// attributes, so that tests and tools read the chart's numbers.
import { scaleBand, scaleLinear, scaleLog, type ScaleContinuousNumeric } from "d3-scale";
import { line } from "d3-shape";
import { document, el, label, text, textWidth } from "./svg.ts";

/** Okabe & Ito's colour-blind-safe qualitative palette (yellow last: weakest on white). */
export const SERIES_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000"] as const;
const DASHES = [undefined, "6 3", "2 3", "8 3 2 3"] as const;
const MARKERS = ["circle", "square", "diamond", "triangle"] as const;

export interface LineSeries {
  readonly name: string;
  readonly points: readonly (readonly [x: number, y: number])[];
}

export interface LineChart {
  readonly title: string;
  readonly subtitle?: string;
  readonly xLabel: string;
  readonly yLabel: string;
  readonly series: readonly LineSeries[];
  readonly width?: number;
  readonly height?: number;
  /** A log y axis (losses spanning decades); every y must then be > 0. */
  readonly logY?: boolean;
  /** A log (base 2) x axis: client counts 1, 4, 16 evenly apart. */
  readonly logX?: boolean;
  /** Start the y axis at 0 (default: true for linear axes). */
  readonly zeroY?: boolean;
  /** Label x ticks with these values only (e.g. client counts). */
  readonly xTicks?: readonly number[];
}

export interface BarChart {
  readonly title: string;
  readonly subtitle?: string;
  readonly yLabel: string;
  /** Groups along x (e.g. "beam 1", "beam 3"), each with one bar per series. */
  readonly groups: readonly { readonly label: string; readonly values: Readonly<Record<string, number>> }[];
  /** Series in legend order (e.g. MiLoRA, per-token, plain LoRA). */
  readonly series: readonly string[];
  readonly width?: number;
  readonly height?: number;
}

const MARGIN = { top: 52, right: 16, bottom: 48, left: 72 };

function frame(title: string, subtitle: string | undefined): string[] {
  const parts = [el("text", { x: 12, y: 20, "font-size": 15, "font-weight": 600, fill: "#1a1a1a", class: "chart-title" }, text(title))];
  if (subtitle !== undefined) parts.push(el("text", { x: 12, y: 37, "font-size": 11, fill: "#555555" }, text(subtitle)));
  return parts;
}

function yAxis(y: ScaleContinuousNumeric<number, number>, x0: number, x1: number, yLabel: string, plotTop: number, plotBottom: number, log: boolean): string[] {
  const parts: string[] = [];
  const ticks = log ? y.ticks(5).filter((t) => /^[125]/.test(t.toExponential())) : y.ticks(6);
  const small = Math.max(...y.domain().map(Math.abs)) < 0.01;
  const d3format = y.tickFormat(6, small ? "~e" : undefined);
  const format = log ? label : (t: number) => (t === 0 ? "0" : d3format(t));
  for (const t of ticks) {
    const ty = y(t);
    parts.push(el("line", { x1: x0, x2: x1, y1: ty, y2: ty, stroke: "#e3e3e3", class: "grid" }));
    parts.push(el("text", { x: x0 - 6, y: ty + 4, "font-size": 11, fill: "#333333", "text-anchor": "end", class: "y-tick" }, text(format(t))));
  }
  parts.push(el("line", { x1: x0, x2: x0, y1: plotTop, y2: plotBottom, stroke: "#666666" }));
  const cy = (plotTop + plotBottom) / 2;
  parts.push(el("text", { x: 16, y: cy, "font-size": 12, fill: "#1a1a1a", "text-anchor": "middle", transform: `rotate(-90 16 ${cy})`, class: "y-label" }, text(yLabel)));
  return parts;
}

const LEGEND_ROW = 16;

/** Where each legend item goes, wrapping onto more rows past maxX; and how many rows that takes. */
function legendLayout(names: readonly string[], x: number, maxX: number): { at: [number, number][]; rows: number } {
  let cx = x;
  let row = 0;
  const at = names.map((name) => {
    const w = 26 + textWidth(name, 11) + 18;
    if (cx > x && cx + w > maxX) [cx, row] = [x, row + 1];
    const place: [number, number] = [cx, row * LEGEND_ROW];
    cx += w;
    return place;
  });
  return { at, rows: row + 1 };
}

function legend(names: readonly string[], x: number, y: number, maxX: number, swatch: (i: number) => string): string {
  const { at } = legendLayout(names, x, maxX);
  const items = names.map((name, i) =>
    el("g", { transform: `translate(${at[i]![0]} ${y + at[i]![1]})`, class: "legend-item", "data-series": name }, swatch(i), el("text", { x: 26, y: 4, "font-size": 11, fill: "#1a1a1a" }, text(name))),
  );
  return el("g", { class: "legend" }, ...items);
}

function marker(kind: (typeof MARKERS)[number], x: number, y: number, colour: string, attributes: Record<string, string | number>): string {
  const common = { fill: colour, stroke: "#ffffff", "stroke-width": 1, ...attributes };
  switch (kind) {
    case "circle":
      return el("circle", { cx: x, cy: y, r: 3.5, ...common });
    case "square":
      return el("rect", { x: x - 3.2, y: y - 3.2, width: 6.4, height: 6.4, ...common });
    case "diamond":
      return el("path", { d: `M${x} ${y - 4.5}L${x + 4.5} ${y}L${x} ${y + 4.5}L${x - 4.5} ${y}Z`, ...common });
    case "triangle":
      return el("path", { d: `M${x} ${y - 4.5}L${x + 4.5} ${y + 3.5}L${x - 4.5} ${y + 3.5}Z`, ...common });
  }
}

export function lineChartSvg(c: LineChart): string {
  const width = c.width ?? 640;
  const height = c.height ?? 360;
  const legendRows = legendLayout(c.series.map((s) => s.name), MARGIN.left, width - MARGIN.right).rows;
  const plot = { left: MARGIN.left, right: width - MARGIN.right, top: MARGIN.top + 24 + (legendRows - 1) * LEGEND_ROW, bottom: height - MARGIN.bottom };
  const all = c.series.flatMap((s) => s.points);
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]).filter((v) => Number.isFinite(v));
  const xMin = Math.min(...xs, ...(c.xTicks ?? []));
  const xMax = Math.max(...xs, ...(c.xTicks ?? []));
  const x: ScaleContinuousNumeric<number, number> = (c.logX ? scaleLog().base(2) : scaleLinear())
    .domain(all.length === 0 ? [1, 2] : xMin === xMax ? [xMin / 2, xMax * 2] : [xMin, xMax])
    .range([plot.left, plot.right]);
  const log = c.logY === true;
  const yLo = ys.length === 0 ? 0 : Math.min(...ys);
  const yHi = ys.length === 0 ? 1 : Math.max(...ys);
  const y: ScaleContinuousNumeric<number, number> = log
    ? scaleLog().domain([yLo, yHi === yLo ? yLo * 10 : yHi]).range([plot.bottom, plot.top]).nice()
    : scaleLinear()
        .domain([(c.zeroY ?? true) ? Math.min(0, yLo) : yLo, yHi === yLo ? yHi + 1 : yHi])
        .range([plot.bottom, plot.top])
        .nice();
  const parts = frame(c.title, c.subtitle);
  parts.push(...yAxis(y, plot.left, plot.right, c.yLabel, plot.top, plot.bottom, log));
  // Whole-number data (steps, clients) gets whole-number ticks only.
  const whole = xs.every(Number.isInteger);
  const xTicks = c.xTicks ?? (whole ? x.ticks(8).filter(Number.isInteger) : x.ticks(8));
  const xFormat = c.xTicks || whole ? label : x.tickFormat(8);
  parts.push(el("line", { x1: plot.left, x2: plot.right, y1: plot.bottom, y2: plot.bottom, stroke: "#666666" }));
  for (const t of xTicks) {
    parts.push(el("line", { x1: x(t), x2: x(t), y1: plot.bottom, y2: plot.bottom + 4, stroke: "#666666" }));
    parts.push(el("text", { x: x(t), y: plot.bottom + 16, "font-size": 11, fill: "#333333", "text-anchor": "middle", class: "x-tick" }, text(xFormat(t))));
  }
  parts.push(el("text", { x: (plot.left + plot.right) / 2, y: height - 10, "font-size": 12, fill: "#1a1a1a", "text-anchor": "middle", class: "x-label" }, text(c.xLabel)));
  const path = line<readonly [number, number]>()
    .defined((p) => Number.isFinite(p[1]))
    .x((p) => x(p[0]))
    .y((p) => y(p[1]));
  c.series.forEach((s, i) => {
    const colour = SERIES_COLOURS[i % SERIES_COLOURS.length]!;
    const kind = MARKERS[i % MARKERS.length]!;
    const points = s.points
      .filter((p) => Number.isFinite(p[1]))
      .map((p) => marker(kind, x(p[0]), y(p[1]), colour, { class: "point", "data-series": s.name, "data-x": String(p[0]), "data-y": String(p[1]) }));
    parts.push(
      el(
        "g",
        { class: "series", "data-series": s.name },
        el("path", { d: path(s.points) ?? "", fill: "none", stroke: colour, "stroke-width": 2, "stroke-dasharray": DASHES[i % DASHES.length], class: "line" }),
        ...(s.points.length <= 60 ? points : []),
      ),
    );
  });
  parts.push(
    legend(c.series.map((s) => s.name), plot.left, MARGIN.top, plot.right, (i) => {
      const colour = SERIES_COLOURS[i % SERIES_COLOURS.length]!;
      return (
        el("line", { x1: 0, x2: 22, y1: 0, y2: 0, stroke: colour, "stroke-width": 2, "stroke-dasharray": DASHES[i % DASHES.length] }) +
        marker(MARKERS[i % MARKERS.length]!, 11, 0, colour, {})
      );
    }),
  );
  return document(width, height, c.title, parts, { class: "milora-chart milora-line-chart" });
}

export function barChartSvg(c: BarChart): string {
  const width = c.width ?? 640;
  const height = c.height ?? 360;
  const legendRows = legendLayout(c.series, MARGIN.left, width - MARGIN.right).rows;
  const plot = { left: MARGIN.left, right: width - MARGIN.right, top: MARGIN.top + 24 + (legendRows - 1) * LEGEND_ROW, bottom: height - MARGIN.bottom };
  const x = scaleBand<string>()
    .domain(c.groups.map((g) => g.label))
    .range([plot.left, plot.right])
    .paddingInner(0.25)
    .paddingOuter(0.15);
  const inner = scaleBand<string>().domain(c.series).range([0, x.bandwidth()]).padding(0.08);
  const values = c.groups.flatMap((g) => c.series.map((s) => g.values[s] ?? NaN)).filter((v) => Number.isFinite(v));
  const y = scaleLinear()
    .domain([0, Math.max(1e-9, ...values)])
    .range([plot.bottom, plot.top])
    .nice();
  const parts = frame(c.title, c.subtitle);
  parts.push(...yAxis(y, plot.left, plot.right, c.yLabel, plot.top, plot.bottom, false));
  parts.push(el("line", { x1: plot.left, x2: plot.right, y1: plot.bottom, y2: plot.bottom, stroke: "#666666" }));
  for (const g of c.groups) {
    const gx = x(g.label)!;
    parts.push(el("text", { x: gx + x.bandwidth() / 2, y: plot.bottom + 18, "font-size": 12, fill: "#1a1a1a", "text-anchor": "middle", class: "x-tick" }, text(g.label)));
    c.series.forEach((s, i) => {
      const v = g.values[s];
      if (v === undefined || !Number.isFinite(v)) return;
      const bx = gx + inner(s)!;
      const top = y(v);
      parts.push(
        el(
          "rect",
          { x: bx, y: top, width: inner.bandwidth(), height: plot.bottom - top, fill: SERIES_COLOURS[i % SERIES_COLOURS.length], class: "bar", "data-series": s, "data-group": g.label, "data-value": String(v) },
          el("title", {}, text(`${s}, ${g.label}: ${label(v)}`)),
        ),
      );
      parts.push(el("text", { x: bx + inner.bandwidth() / 2, y: top - 4, "font-size": 10, fill: "#333333", "text-anchor": "middle", class: "bar-value" }, text(label(v))));
    });
  }
  parts.push(legend(c.series, plot.left, MARGIN.top, plot.right, (i) => el("rect", { x: 0, y: -6, width: 22, height: 12, fill: SERIES_COLOURS[i % SERIES_COLOURS.length] })));
  return document(width, height, c.title, parts, { class: "milora-chart milora-bar-chart" });
}
