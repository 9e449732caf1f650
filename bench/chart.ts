// Renders a benchmark's --json output as an SVG chart (runtime/pictures/charts.ts), the pictures that
// docs/performance.md shows next to its tables:
//   node --import tsx bench/chart.ts RESULT.json [--out CHART.svg]     (default: RESULT.svg)
//   node --import tsx bench/chart.ts RESULT.json --table               (the chart's figures as a markdown table)
// bench/beam.ts: tokens/s at beam 1 and 3 for MiLoRA, the per-token baseline and plain LoRA (bars);
// bench/table4.ts: tokens/s of MiLoRA and the paper's baselines at beam 1 and 3, one sequence and
// several tenants (bars);
// bench/serve.ts: batched tokens/s against concurrent clients per tenant popularity, with the same load
// served one request at a time (lines).
import { readFileSync, writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";
import { barChartSvg, lineChartSvg } from "../runtime/pictures/charts.ts";

export interface BeamResult {
  readonly bench: "beam";
  readonly device: string;
  readonly model: string;
  readonly results: readonly { readonly mode: string; readonly label: string; readonly beams: number; readonly tokensPerSecond: number }[];
}

export interface Table4Result {
  readonly bench: "table4";
  readonly device: string;
  readonly model: string;
  readonly results: readonly {
    readonly mode: string;
    readonly label: string;
    readonly tenants: number;
    readonly beams: number;
    readonly tokensPerSecond: number;
    readonly decodeMsPerToken: number;
    readonly peakBytes: number;
  }[];
  /** One decode step per mode and batch: dispatches by kernel, each timed alone (bench/table4.ts). */
  readonly profiles?: readonly unknown[];
}

export interface ServeRow {
  readonly load: "one at a time" | "batched";
  readonly clients: number;
  readonly popularity: string;
  readonly tokensPerSecond: number;
  readonly ttftMs: { readonly p50: number; readonly p99: number };
  readonly tpotMs: { readonly p50: number; readonly p99: number };
}

export interface ServeResult {
  readonly bench: "serve";
  readonly device: string;
  readonly model: string;
  readonly tenants: "lora" | "milora";
  readonly requests: number;
  readonly tokens: number;
  readonly rows: readonly ServeRow[];
}

/** The device in a few words: "software, Mesa 22.3.6" for llvmpipe, else the first part of its summary. */
function shortDevice(device: string): string {
  const mesa = /Mesa [\d.]+/.exec(device)?.[0];
  return mesa ? `llvmpipe (${mesa})` : device.slice(0, 40);
}

export function beamChart(r: BeamResult): string {
  const labels = [...new Set(r.results.map((x) => x.label))];
  const beams = [...new Set(r.results.map((x) => x.beams))].sort((a, b) => a - b);
  return barChartSvg({
    title: "Decode tokens/s: MiLoRA vs per-token routing vs plain LoRA",
    subtitle: `${r.model}; ${shortDevice(r.device)}`,
    yLabel: "tokens/s (one request)",
    series: labels,
    groups: beams.map((b) => ({ label: `beam ${b}`, values: Object.fromEntries(r.results.filter((x) => x.beams === b).map((x) => [x.label, x.tokensPerSecond])) })),
    width: 760,
  });
}

/** The (tenants, beams) groups of a Table 4 run, one tenant first, then by beams. */
function table4Groups(r: Table4Result): { readonly tenants: number; readonly beams: number; readonly label: string }[] {
  const keys = [...new Set(r.results.map((x) => `${x.tenants} ${x.beams}`))].map((k) => k.split(" ").map(Number) as [number, number]);
  return keys.sort((a, b) => a[0] - b[0] || a[1] - b[1]).map(([tenants, beams]) => ({ tenants, beams, label: `${tenants === 1 ? "1 sequence" : `${tenants} tenants`}, beam ${beams}` }));
}

export function table4Chart(r: Table4Result): string {
  const labels = [...new Set(r.results.map((x) => x.label))];
  return barChartSvg({
    title: "Table 4 shape: decode tokens/s of MiLoRA and the per-token baselines, DoRA and plain LoRA",
    subtitle: `${r.model}; ${shortDevice(r.device)}`,
    yLabel: "tokens/s",
    series: labels,
    groups: table4Groups(r).map((g) => ({ label: g.label, values: Object.fromEntries(r.results.filter((x) => x.tenants === g.tenants && x.beams === g.beams).map((x) => [x.label, x.tokensPerSecond])) })),
    width: 900,
  });
}

export function serveChart(r: ServeResult): string {
  const batched = r.rows.filter((x) => x.load === "batched");
  const popularities = [...new Set(batched.map((x) => x.popularity))];
  const clients = [...new Set(r.rows.map((x) => x.clients))].sort((a, b) => a - b);
  const sequential = r.rows.filter((x) => x.load === "one at a time");
  const mean = sequential.reduce((n, x) => n + x.tokensPerSecond, 0) / Math.max(1, sequential.length);
  return lineChartSvg({
    title: `Serving tokens/s against concurrent clients (${r.tenants === "milora" ? "MiLoRA" : "plain LoRA"} tenants)`,
    subtitle: `${r.model}; ${r.requests} requests of ${r.tokens} tokens a point; ${shortDevice(r.device)}`,
    xLabel: "concurrent clients",
    yLabel: "generated tokens/s",
    xTicks: clients,
    logX: true,
    series: [
      ...popularities.map((p) => ({ name: p === "base" ? "base model alone" : `batched, ${p} tenants`, points: batched.filter((x) => x.popularity === p).map((x) => [x.clients, x.tokensPerSecond] as [number, number]) })),
      ...(sequential.length > 0 ? [{ name: "one at a time (1 KV slot, 16 clients)", points: clients.map((c) => [c, mean] as [number, number]) }] : []),
    ],
    width: 760,
  });
}

/** The figures a chart draws, as a markdown table. */
export function tableOf(result: BeamResult | ServeResult | Table4Result): string {
  if (result.bench === "table4") {
    const labels = [...new Set(result.results.map((x) => x.label))];
    const groups = table4Groups(result);
    const get = (l: string, g: { tenants: number; beams: number }) => result.results.find((x) => x.label === l && x.tenants === g.tenants && x.beams === g.beams);
    const tenants = [...new Set(groups.map((g) => g.tenants))];
    const peak = (l: string, t: number) => Math.max(...result.results.filter((x) => x.label === l && x.tenants === t).map((x) => x.peakBytes)) / 2 ** 20;
    return [
      `| mode | ${groups.map((g) => `${g.label} tok/s`).join(" | ")} | ${tenants.map((t) => `peak MiB, ${t}`).join(" | ")} |`,
      `| --- | ${groups.map(() => "---:").join(" | ")} | ${tenants.map(() => "---:").join(" | ")} |`,
      ...labels.map((l) => `| ${l} | ${groups.map((g) => get(l, g)?.tokensPerSecond.toFixed(1) ?? "").join(" | ")} | ${tenants.map((t) => peak(l, t).toFixed(1)).join(" | ")} |`),
    ].join("\n");
  }
  if (result.bench === "beam") {
    const labels = [...new Set(result.results.map((x) => x.label))];
    const beams = [...new Set(result.results.map((x) => x.beams))].sort((a, b) => a - b);
    const get = (l: string, b: number) => result.results.find((x) => x.label === l && x.beams === b)?.tokensPerSecond ?? NaN;
    return [
      `| mode | ${beams.map((b) => `beam ${b} tok/s`).join(" | ")} |`,
      `| --- | ${beams.map(() => "---:").join(" | ")} |`,
      ...labels.map((l) => `| ${l} | ${beams.map((b) => get(l, b).toFixed(1)).join(" | ")} |`),
    ].join("\n");
  }
  const popularities = [...new Set(result.rows.map((x) => x.popularity))];
  const rows = [...result.rows].sort((a, b) => (a.load === b.load ? a.clients - b.clients : a.load === "one at a time" ? -1 : 1));
  const keys = [...new Set(rows.map((r) => `${r.load}|${r.clients}`))];
  return [
    `| load | clients | ${popularities.join(" | ")} |`,
    `| --- | ---: | ${popularities.map(() => "---:").join(" | ")} |`,
    ...keys.map((k) => {
      const [load, clients] = k.split("|");
      const cells = popularities.map((p) => rows.find((r) => r.load === load && String(r.clients) === clients && r.popularity === p)?.tokensPerSecond.toFixed(0) ?? "");
      return `| ${load} | ${clients} | ${cells.join(" | ")} |`;
    }),
  ].join("\n");
}

export function chartOf(result: BeamResult | ServeResult | Table4Result): string {
  if (result.bench === "beam") return beamChart(result);
  if (result.bench === "table4") return table4Chart(result);
  if (result.bench === "serve") return serveChart(result);
  throw new Error(`no chart for bench ${(result as { bench?: unknown }).bench}`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const { values, positionals } = parseArgs({ allowPositionals: true, options: { out: { type: "string" }, table: { type: "boolean" } } });
  const input = positionals[0];
  if (input === undefined) throw new Error("usage: bench/chart.ts RESULT.json [--out CHART.svg | --table]");
  if (values.table) {
    console.log(tableOf(JSON.parse(readFileSync(input, "utf8")) as BeamResult | ServeResult | Table4Result));
    process.exit(0);
  }
  const out = values.out ?? input.replace(/\.json$/, "") + ".svg";
  writeFileSync(out, chartOf(JSON.parse(readFileSync(input, "utf8")) as BeamResult | ServeResult | Table4Result));
  console.log(`wrote ${out}`);
}
