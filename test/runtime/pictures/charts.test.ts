// Charts by structure: one bar per (group, series) holding its value, bars' heights in proportion,
// one point per data point, legends and axis labels present, colours from the colour-blind-safe set.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { SERIES_COLOURS, barChartSvg, lineChartSvg } from "../../../runtime/pictures/charts.ts";
import { elements, parseSvg, texts } from "./svg-dom.ts";

test("a grouped bar chart: a bar per group and series, heights in proportion to the values", () => {
  const values = { "beam 1": { MiLoRA: 40, "per-token": 20, "plain LoRA": 38 }, "beam 3": { MiLoRA: 90, "per-token": 45, "plain LoRA": 85 } };
  const svg = barChartSvg({ title: "Decode", yLabel: "tokens/s", series: ["MiLoRA", "per-token", "plain LoRA"], groups: Object.entries(values).map(([label, v]) => ({ label, values: v })) });
  const root = parseSvg(svg);
  const bars = elements(root, "rect", "bar");
  assert.is(bars.length, 6);
  const height = (g: string, s: string) => {
    const bar = bars.find((b) => b.getAttribute("data-group") === g && b.getAttribute("data-series") === s)!;
    assert.is(Number(bar.getAttribute("data-value")), (values as Record<string, Record<string, number>>)[g]![s]);
    return Number(bar.getAttribute("height"));
  };
  assert.ok(Math.abs(height("beam 3", "MiLoRA") / height("beam 1", "per-token") - 90 / 20) < 0.01);
  assert.equal(
    elements(root, "rect", "bar").filter((b) => b.getAttribute("data-group") === "beam 1").map((b) => b.getAttribute("fill")),
    SERIES_COLOURS.slice(0, 3),
  );
  assert.equal(texts(root, "text", "x-tick"), ["beam 1", "beam 3"]);
  assert.equal(elements(root, "g", "legend-item").map((e) => e.getAttribute("data-series")), ["MiLoRA", "per-token", "plain LoRA"]);
  assert.equal(texts(root, "text", "y-label"), ["tokens/s"]);
  assert.equal(texts(root, "text", "chart-title"), ["Decode"]);
  assert.ok(texts(root, "text", "y-tick").includes("0"));
});

test("a line chart: one point per data point at its value, a path per series, given x ticks", () => {
  const series = [
    { name: "MiLoRA", points: [[1, 10], [2, 19], [4, 33], [8, 50]] as [number, number][] },
    { name: "plain LoRA", points: [[1, 11], [2, 20], [4, 36], [8, 55]] as [number, number][] },
  ];
  const root = parseSvg(lineChartSvg({ title: "Serving", xLabel: "concurrent clients", yLabel: "tokens/s", xTicks: [1, 2, 4, 8], series }));
  assert.equal(texts(root, "text", "x-tick"), ["1", "2", "4", "8"]);
  assert.is(elements(root, "path", "line").length, 2);
  const points = elements(root, "circle", "point").concat(elements(root, "rect", "point"));
  assert.is(points.length, 8);
  for (const s of series) {
    for (const [x, y] of s.points) assert.ok(points.some((p) => p.getAttribute("data-series") === s.name && p.getAttribute("data-x") === String(x) && p.getAttribute("data-y") === String(y)));
  }
  // Higher values sit higher (smaller SVG y).
  const cy = (name: string, x: number) => {
    const p = points.find((q) => q.getAttribute("data-series") === name && q.getAttribute("data-x") === String(x))!;
    return Number(p.getAttribute("cy") ?? Number(p.getAttribute("y")) + 3.2);
  };
  assert.ok(cy("MiLoRA", 8) < cy("MiLoRA", 1));
  assert.equal(texts(root, "text", "x-label"), ["concurrent clients"]);
});

test("a log-scale line chart (losses) keeps positive values and labels its ticks", () => {
  const root = parseSvg(lineChartSvg({ title: "Loss", xLabel: "step", yLabel: "loss", logY: true, series: [{ name: "train", points: [[1, 6], [2, 3], [3, 0.5], [4, 0.2]] }] }));
  assert.is(elements(root, "circle", "point").length, 4);
  assert.ok(texts(root, "text", "y-tick").length >= 2);
});

test.run();
