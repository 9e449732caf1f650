// Renders a benchmark's --json output as an SVG chart (runtime/pictures/charts.ts), the pictures that
// docs/performance.md shows next to its tables:
//   node --import tsx bench/chart.ts RESULT.json [--out CHART.svg]     (default: RESULT.svg)
// bench/beam.ts: tokens/s at beam 1 and 3 for MiLoRA, the per-token baseline and plain LoRA (bars);
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

export function beamChart(r: BeamResult): string {
  const labels = [...new Set(r.results.map((x) => x.label))];
  const beams = [...new Set(r.results.map((x) => x.beams))].sort((a, b) => a - b);
  return barChartSvg({
    title: "Decode tokens/s at beam 1 and 3: MiLoRA vs the per-token baseline vs plain LoRA",
    subtitle: `${r.model}; ${r.device}`,
    yLabel: "tokens/s (one request)",
    series: labels,
    groups: beams.map((b) => ({ label: `beam ${b}`, values: Object.fromEntries(r.results.filter((x) => x.beams === b).map((x) => [x.label, x.tokensPerSecond])) })),
    width: 680,
  });
}

export function serveChart(r: ServeResult): string {
  const batched = r.rows.filter((x) => x.load === "batched");
  const popularities = [...new Set(batched.map((x) => x.popularity))];
  const clients = [...new Set(r.rows.map((x) => x.clients))].sort((a, b) => a - b);
  const sequential = r.rows.filter((x) => x.load === "one at a time");
  const mean = sequential.reduce((n, x) => n + x.tokensPerSecond, 0) / Math.max(1, sequential.length);
  return lineChartSvg({
    title: `Serving throughput against concurrent clients (${r.tenants === "milora" ? "MiLoRA" : "plain LoRA"} tenants)`,
    subtitle: `${r.model}; ${r.requests} streamed requests of ${r.tokens} tokens per point; ${r.device}`,
    xLabel: "concurrent clients",
    yLabel: "generated tokens/s",
    xTicks: clients,
    series: [
      ...popularities.map((p) => ({ name: p === "base" ? "base model alone" : `batched, ${p} tenants`, points: batched.filter((x) => x.popularity === p).map((x) => [x.clients, x.tokensPerSecond] as [number, number]) })),
      ...(sequential.length > 0 ? [{ name: "one at a time (1 KV slot, 16 clients)", points: clients.map((c) => [c, mean] as [number, number]) }] : []),
    ],
    width: 680,
  });
}

export function chartOf(result: BeamResult | ServeResult): string {
  if (result.bench === "beam") return beamChart(result);
  if (result.bench === "serve") return serveChart(result);
  throw new Error(`no chart for bench ${(result as { bench?: unknown }).bench}`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const { values, positionals } = parseArgs({ allowPositionals: true, options: { out: { type: "string" } } });
  const input = positionals[0];
  if (input === undefined) throw new Error("usage: bench/chart.ts RESULT.json [--out CHART.svg]");
  const out = values.out ?? input.replace(/\.json$/, "") + ".svg";
  writeFileSync(out, chartOf(JSON.parse(readFileSync(input, "utf8")) as BeamResult | ServeResult));
  console.log(`wrote ${out}`);
}
