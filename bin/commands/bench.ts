// `milora bench [SPEC] (--base DIR | --random SIZE)`: the speed comparison users ask for, on their own
// base, adapter shape and device, in one run (bin/measure/comparison.ts): the base alone, merged and
// unmerged LoRA, MiLoRA, the per-token router, the MOELoRA- and MixLoRA-style per-token baselines
// (`--modes moelora,mixlora`) and DoRA, at each weight storage format, tenant count and beam width,
// printed as a table with ratios or as JSON. `--calibrate` instead measures each storage
// format's matvec/matmul crossover on this device (bin/measure/crossover.ts) and writes it where
// `milora run` and `serve` find it (bin/measure/calibration.ts).
import { SingleBar } from "cli-progress";
import { existsSync, statSync } from "node:fs";
import { aligned } from "../../compiler/budget-table.ts";
import { planBase } from "../../compiler/plan.ts";
import { readHfConfig } from "../../compiler/hf-config.ts";
import { EXPERT_MODULES, FFN_MODULES, type Adapter, type BaseModel, type ExpertModule, type Selection } from "../../compiler/model.ts";
import { acquireDevice, adapterSummary, type GpuContext } from "../../runtime/gpu/device.ts";
import { meterBuffers } from "../../runtime/gpu/memory-meter.ts";
import { userError } from "../../runtime/errors.ts";
import { WEIGHT_FORMATS, type WeightFormat } from "../../runtime/package/format.ts";
import { CALIBRATION_VERSION, defaultCalibrationFile, deviceCalibration, writeCalibration, type Calibration, type FormatCrossover } from "../measure/calibration.ts";
import { defaultBenchAdapter, defaultModeNames, MODE_NAMES, ratiosOf, runComparison, standardModes, type BenchMode, type ComparisonRow, type ModeName } from "../measure/comparison.ts";
import { CALIBRATION_ROWS, measureCrossover } from "../measure/crossover.ts";
import { modelSummary, randomModelDir, randomModelOptions } from "../measure/random-model.ts";
import { modelSource } from "./model-source.ts";
import { requireHealthyDevice } from "./self-test.ts";

export interface BenchOptions {
  readonly base?: string;
  readonly random?: string;
  readonly adapter?: string;
  /** Comma-separated; absent: every mode the adapter has. */
  readonly modes?: string;
  readonly weights: string;
  readonly tenants: string;
  readonly beams: string;
  readonly prompt: string;
  readonly decode: string;
  readonly repeats: string;
  readonly json?: boolean;
  readonly calibrate?: boolean;
  readonly calibration?: string;
  readonly rows?: string;
  readonly backend?: string;
}

/** Runs the comparison or the calibration; a user error is thrown as a MiloraError (bin/cli.ts prints it). */
export async function benchCommand(spec: string | undefined, opts: BenchOptions): Promise<number> {
  // Every flag is checked before the device is touched.
  const { base, checkpointDir, adapter } = model(spec, opts);
  const formats = list("--weights", opts.weights, (w) => (WEIGHT_FORMATS as readonly string[]).includes(w), `one of ${WEIGHT_FORMATS.join(", ")}`) as WeightFormat[];
  const repeats = count("--repeats", opts.repeats, 1);
  const log = (line: string) => process.stderr.write(`milora bench: ${line}\n`);
  if (opts.calibrate) {
    const rows = opts.rows === undefined ? [...CALIBRATION_ROWS] : list("--rows", opts.rows, (r) => wholeNumber(r) >= 1, "a whole number >= 1").map(Number);
    if (rows.some((r, i) => i > 0 && r <= rows[i - 1]!)) throw userError("usage", `--rows must ascend, got ${opts.rows}`);
    return withDevice(opts, (gpu) => calibrate(gpu, base, formats, rows, repeats, opts, log));
  }
  if (opts.rows !== undefined) throw userError("usage", "--rows is for --calibrate");
  const settings = {
    modes: standardModes(
      adapter,
      opts.modes === undefined
        ? defaultModeNames(adapter)
        : (list("--modes", opts.modes, (m) => (MODE_NAMES as readonly string[]).includes(m), `one of ${MODE_NAMES.join(", ")}`) as ModeName[]),
    ),
    tenants: list("--tenants", opts.tenants, (t) => wholeNumber(t) >= 1, "a whole number >= 1").map(Number),
    beams: list("--beams", opts.beams, (b) => wholeNumber(b) >= 1, "a whole number >= 1").map(Number),
    prompt: count("--prompt", opts.prompt, 1),
    decode: count("--decode", opts.decode, 1),
    repeats,
  };
  const positions = settings.prompt + settings.decode + 2;
  if (positions > base.maxPositions) throw userError("usage", `--prompt ${settings.prompt} and --decode ${settings.decode} need ${positions} positions, more than the base's ${base.maxPositions}`);
  return withDevice(opts, async (gpu) => {
    const device = adapterSummary(gpu.report);
    const calibration = deviceCalibration(gpu.report, opts.calibration);
    const meter = meterBuffers(gpu.device);
    log(`${device}; ${modelSummary(base)}`);
    // On a terminal a bar counts the runs; elsewhere (a log) one line per engine loaded says where it is.
    const bar = process.stderr.isTTY ? new SingleBar({ format: "milora bench [{bar}] {value}/{total} runs, {eta_formatted} left", stream: process.stderr, hideCursor: true }) : undefined;
    bar?.start(1, 0);
    let rows;
    try {
      const progress = (done: number, total: number) => {
        bar!.setTotal(total);
        bar!.update(done);
      };
      rows = await runComparison({ base, checkpointDir, gpu, formats, ...settings, ...(calibration ? { calibration } : {}), meter, ...(bar ? { progress } : { log }) });
    } finally {
      bar?.stop();
      meter.stop();
    }
    const about = {
      device,
      model: modelSummary(base),
      adapter: adapterShape(adapter),
      ...baselines(settings.modes),
      run: `${settings.prompt}-token prompts, ${settings.decode} decode steps, greedy, best of ${settings.repeats}`,
      calibration: calibration ? (opts.calibration ?? defaultCalibrationFile(gpu.report)) : "none (matvec row limit MATVEC_MAX_ROWS)",
    };
    if (opts.json) process.stdout.write(JSON.stringify({ ...about, rows: rows.map((r) => ({ ...r, ...ratiosOf(rows, r) })) }, null, 2) + "\n");
    else process.stdout.write(comparisonTable(about, rows));
    return 0;
  });
}

/** Runs `work` on the device (`--backend`), once it has passed milora's kernel self-test. */
async function withDevice(opts: BenchOptions, work: (gpu: GpuContext) => Promise<number>): Promise<number> {
  const gpu = await acquireDevice(opts.backend === undefined ? {} : { backend: opts.backend });
  try {
    await requireHealthyDevice(gpu);
    return await work(gpu);
  } finally {
    gpu.destroy();
  }
}

/** The base, its checkpoint, and the adapter shape the tenants take (the spec's, else rank 8 on all modules). */
function model(spec: string | undefined, opts: BenchOptions): { base: BaseModel; checkpointDir: string; adapter: Adapter } {
  if ((opts.base === undefined) === (opts.random === undefined)) throw userError("usage", "give the model: --base DIR (a Hugging Face directory) or --random SIZE (tiny, small)");
  let checkpointDir: string;
  if (opts.random !== undefined) checkpointDir = randomModelDir(randomModelOptions(opts.random));
  else {
    checkpointDir = opts.base!;
    if (!existsSync(checkpointDir) || !statSync(checkpointDir).isDirectory()) throw userError("usage", `no model directory ${checkpointDir}`);
  }
  if (spec === undefined) {
    if (opts.adapter !== undefined) throw userError("usage", "--adapter names an adapter of the spec: give the spec too");
    const base = readHfConfig(checkpointDir);
    return { base, checkpointDir, adapter: defaultBenchAdapter(base) };
  }
  const source = modelSource(spec, checkpointDir);
  if (source.package) throw userError("usage", `${spec} is a compiled package, whose plan fixes the weight format and kernels: bench its spec instead`);
  const { adapters } = source;
  const named = opts.adapter === undefined ? undefined : adapters.find((a) => a.name === opts.adapter);
  if (opts.adapter !== undefined && !named) throw userError("spec", `${spec} has no adapter ${opts.adapter} (adapters: ${adapters.map((a) => a.name).join(", ") || "none"})`);
  if (!named && adapters.length > 1) throw userError("usage", `${spec} declares ${adapters.length} adapters (${adapters.map((a) => a.name).join(", ")}): say which with --adapter NAME`);
  return { base: source.base, checkpointDir, adapter: named ?? adapters[0] ?? defaultBenchAdapter(source.base) };
}

async function calibrate(gpu: GpuContext, base: BaseModel, formats: readonly WeightFormat[], rows: readonly number[], repeats: number, opts: BenchOptions, log: (line: string) => void): Promise<number> {
  const file = opts.calibration ?? defaultCalibrationFile(gpu.report);
  const measured: FormatCrossover[] = [];
  for (const weights of formats) {
    log(`${weights}: timing one layer's linears and the lm_head at ${rows.join(", ")} rows`);
    // One layer and the head is what the crossover depends on; no LoRA, a short context.
    const plan = planBase(base, { ctx: 1, maxLoraRank: 0, weights });
    measured.push(await measureCrossover(gpu, plan, rows, { repeats, rounds: 3 }));
  }
  const calibration: Calibration = { version: CALIBRATION_VERSION, device: adapterSummary(gpu.report), measuredAt: new Date().toISOString(), model: modelSummary(base), formats: measured };
  writeCalibration(file, calibration);
  if (opts.json) {
    process.stdout.write(JSON.stringify({ file, ...calibration }, null, 2) + "\n");
    return 0;
  }
  const out = [`device: ${calibration.device}`, `model: ${calibration.model}; us per layer (its linears) + lm_head, best of ${repeats} submits of 3 rounds`, ""];
  const header = ["rows", ...measured.flatMap((m) => [`${m.weights} matvec us`, "matmul us", "matvec/matmul"])];
  const table = rows.map((r, i) => [String(r), ...measured.flatMap((m) => { const t = m.timings[i]!; return [t.matvecUs.toFixed(0), t.matmulUs.toFixed(0), `${(t.matvecUs / t.matmulUs).toFixed(2)}x`]; })]);
  out.push(...aligned([header, ...table], "  "), "");
  for (const m of measured) out.push(`${m.weights}: matvec up to ${m.matvecMaxRows} rows${m.bounded ? "" : ` (it still won at ${m.matvecMaxRows}: the crossover is at least that)`}`);
  out.push(`written to ${file}; milora run and serve use it on this device`);
  process.stdout.write(out.join("\n") + "\n");
  return 0;
}

/** The rows grouped by format, tenants and beam width, each group with the ratios in its own run. */
function comparisonTable(about: Record<string, string>, rows: readonly ComparisonRow[]): string {
  const x = (v: number | undefined) => (v === undefined ? "-" : `${v.toFixed(2)}x`);
  const out = Object.entries(about).map(([k, v]) => `${k}: ${v}`);
  const groups = [...new Set(rows.map((r) => `${r.weights} ${r.tenants} ${r.beams}`))];
  for (const g of groups) {
    const members = rows.filter((r) => `${r.weights} ${r.tenants} ${r.beams}` === g);
    const { weights, tenants, beams, matvecMaxRows } = members[0]!;
    out.push("", `${weights} weights, ${tenants} tenant${tenants === 1 ? "" : "s"}, beam ${beams} (matvec up to ${matvecMaxRows} rows)`);
    const table = members.map((r) => {
      const q = ratiosOf(rows, r);
      const load = Number.isNaN(r.adapterLoadMs) ? "-" : r.adapterLoadMs.toFixed(0);
      return [r.label, r.decodeMsPerToken.toFixed(2), x(q.decodeVsBase), r.tokensPerS.toFixed(1), x(q.tokensPerSVsOneTenant), r.prefillTokensPerS.toFixed(1), (r.peakBytes / 2 ** 20).toFixed(1), load, x(q.decodeVsF32)];
    });
    out.push(...aligned([["mode", "decode ms/token", "vs base", "tokens/s", "vs 1 tenant", "prefill tok/s", "peak MiB", "load ms", "decode vs f32"], ...table], "  "));
  }
  return out.join("\n") + "\n";
}

function adapterShape(a: Adapter): string {
  const ranks = [...new Set(a.experts.map((e) => e.rank))].join("/");
  const modules = new Set(a.experts.map((e) => e.module)).size;
  const routing = a.moe ? `, ${moeShape(a)}` : a.router ? `, router ${selectionText(a.router.selection)}` : " (routers: the defaults)";
  return `${a.name}: rank ${ranks} on ${modules} modules of ${a.layers.length} layers${routing}`;
}

/** The per-token baselines' shapes where they run (comparison.ts moeRank's rule): `{ moelora: ..., mixlora: ... }`. */
function baselines(modes: readonly BenchMode[]): Record<string, string> {
  return Object.fromEntries(modes.filter((m) => m.spec?.moe).map((m) => [m.name, moeShape(m.spec!)]));
}

/** "per_module: rank 8 split into 8 experts of rank 1, top_k 4 renormalize" and the like. */
function moeShape(a: Adapter): string {
  const moe = a.moe!;
  const rank = (modules: readonly ExpertModule[]) => [...new Set(a.experts.filter((e) => modules.includes(e.module)).map((e) => e.rank))].join("/");
  const attention = EXPERT_MODULES.filter((m) => !FFN_MODULES.includes(m) && a.experts.some((e) => e.module === m));
  const split =
    moe.placement === "per_module"
      ? `rank ${rank(EXPERT_MODULES)} split into ${moe.experts} experts of rank ${[...new Set(a.experts.map((e) => e.rank / moe.experts))].join("/")} per module`
      : `${attention.length > 0 ? `attention plain LoRA rank ${rank(attention)}, ` : ""}MLP ${moe.experts} experts of rank ${rank(FFN_MODULES)} per layer`;
  return `${moe.placement}: ${split}, ${selectionText(moe.selection)} per token`;
}

function selectionText(s: Selection): string {
  return s.rule === "top_k" ? `top_k ${s.k}${s.renormalize ? " renormalize" : ""}` : s.rule === "threshold" ? `threshold ${s.threshold}` : "dense";
}

function list(flag: string, text: string, ok: (item: string) => boolean, what: string): string[] {
  const items = text.split(",").map((s) => s.trim());
  const bad = items.find((i) => !ok(i));
  if (bad !== undefined) throw userError("usage", `${flag}: "${bad}" must be ${what} (a comma-separated list)`);
  if (new Set(items).size !== items.length) throw userError("usage", `${flag}: ${text} names an item twice`);
  return items;
}

function wholeNumber(text: string): number {
  return text.trim() !== "" && Number.isInteger(Number(text)) ? Number(text) : NaN;
}

function count(flag: string, text: string, min: number): number {
  const n = wholeNumber(text);
  if (!(n >= min)) throw userError("usage", `${flag} must be a whole number >= ${min}, got "${text}"`);
  return n;
}
