// Why batching 16 clients over 8 tenants gains what it gains on this device: one decode step of the
// serve bench's small model (bench/serve.ts --model small: hidden 512, 4 layers, intermediate 1408,
// vocab 512; 8 MiLoRA tenants, rank 8 on all 7 modules, top_k 2 of 7) at 1, 4, 8 and 16 rows, client i
// on tenant i mod 8, and the base alone at the same rows. Every dispatch of the step is recorded and
// timed alone on the engine's buffers (bin/measure/step-profile.ts), so the table says how each
// kernel's cost grows with its rows. Batching n rows can make at most n * step(1) / step(n) times the
// tokens/s of one at a time: that bound, from the summed kernels and from the measured step, is the
// last line. Where a step is bound by reading the weights (a GPU at these sizes), step(n) stays near
// step(1) and the bound is near n; where it is bound by arithmetic (llvmpipe), step(n) grows with n.
//   node --import tsx bench/batch-profile.ts [--rows 1,4,8,16] [--prompt 16] [--rounds 4] [--json FILE]
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { ROUTER_DEFAULTS } from "../compiler/defaults.ts";
import { readHfConfig } from "../compiler/hf-config.ts";
import { EXPERT_MODULES } from "../compiler/model.ts";
import { peftSpec, randomAdapter } from "../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { Engine } from "../runtime/engine/engine.ts";
import type { GenerateRequest } from "../runtime/engine/requests.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { plannedEngine } from "../bin/engine-plan.ts";
import { benchPrompt, bestOf, measureBatch, type GenerationFigures } from "../bin/measure/generation.ts";
import { RANDOM_SIZES } from "../bin/measure/random-model.ts";
import { COPY_VARIANT, kernelVariant, linearShapes, recordDecodeStep, timeSteps, type Recorded } from "../bin/measure/step-profile.ts";

const { values } = parseArgs({ options: { rows: { type: "string", default: "1,4,8,16" }, prompt: { type: "string", default: "16" }, rounds: { type: "string", default: "4" }, json: { type: "string" } } });
const ROWS = values.rows.split(",").map(Number);
const PROMPT = Number(values.prompt);
const ROUNDS = Number(values.rounds);
const TENANTS = 8;
const DECODE = 16;

const dir = join(".cache", "bench", "serve-small");
writeRandomCheckpoint(dir, { ...RANDOM_SIZES.small, layers: 4, intermediateSize: 1408, vocabSize: 512 });
const base = readHfConfig(dir);
const spec = { ...peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name: "serve" }), router: { ...ROUTER_DEFAULTS, noise: false } };
const gpu = await acquireDevice();
const device = adapterSummary(gpu.report);
console.log(`device: ${device}`);
console.log(`model: hidden ${base.hiddenSize}, ${base.layers} layers, intermediate ${base.intermediateSize}, vocab ${base.vocabSize}, f32; ${TENANTS} MiLoRA tenants (rank 8 on all 7 modules, top_k 2 of 7)`);

const engine = await Engine.load(plannedEngine({ base, checkpointDir: dir, gpu, weights: "f32", ctx: PROMPT + DECODE + 4, maxSequences: Math.max(...ROWS), maxAdapters: TENANTS, maxLoraRank: 8 }));
const MODES = ["base", "milora"] as const;
type Mode = (typeof MODES)[number];
interface Case {
  readonly mode: Mode;
  readonly rows: number;
}
const cases: Case[] = MODES.flatMap((mode) => ROWS.map((rows) => ({ mode, rows })));
const steps: Recorded[][] = [];
const measured = new Map<Case, GenerationFigures>();
try {
  const tenants = Array.from({ length: TENANTS }, (_, i) => randomAdapter({ spec, seed: 100 + i, name: `t${i}` }));
  for (const t of tenants) engine.loadAdapter(t.name, t);
  const requests = (c: Case) => (maxTokens: number): GenerateRequest[] =>
    Array.from({ length: c.rows }, (_, i) => ({ prompt: benchPrompt(PROMPT, i, base.vocabSize), maxTokens, stop: [], ...(c.mode === "milora" ? { adapter: tenants[i % TENANTS]!.name } : {}) }));
  for (const c of cases) steps.push(await recordDecodeStep(engine, requests(c)));
  // The measured step: best of two 16-token runs per case, cases interleaved.
  for (let round = 0; round < 2; round++) for (const c of cases) measured.set(c, bestOf(measured.get(c), await measureBatch(engine, requests(c)(DECODE + 1))));
  const shapes = linearShapes(base);
  const best = await timeSteps(gpu.device, steps, (k) => kernelVariant(k, shapes), { rounds: ROUNDS });

  const variants = steps.map((step) => step.map((r) => (r.kind === "copy" ? COPY_VARIANT : kernelVariant(r.kernel, shapes))));
  const cost = (s: number, v: string) => variants[s]!.reduce((n, x, i) => (x === v ? { count: n.count + 1, us: n.us + best[s]![i]! } : n), { count: 0, us: 0 });
  const sum = (s: number) => best[s]!.reduce((n, us) => n + us, 0) / 1000;
  const all = [...new Set(variants.flat())].sort((a, b) => Math.max(...cases.map((_, s) => cost(s, b).us)) - Math.max(...cases.map((_, s) => cost(s, a).us)));
  const pad = (rows: string[][]) => {
    const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? "").length)));
    return rows.map((r) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join("  ")).join("\n");
  };
  for (const mode of MODES) {
    const at = cases.flatMap((c, s) => (c.mode === mode ? [s] : []));
    const one = at.find((s) => cases[s]!.rows === 1);
    console.log(`\n${mode === "base" ? "base alone" : "MiLoRA tenants"}: one decode step, dispatches / us each kernel (timed alone, best of ${ROUNDS} rounds of 4), and its cost against one row`);
    const lines: string[][] = [["kernel", ...at.map((s) => `${cases[s]!.rows} row${cases[s]!.rows === 1 ? "" : "s"}`)]];
    for (const v of all) {
      if (at.every((s) => cost(s, v).count === 0)) continue;
      lines.push([v, ...at.map((s) => { const c = cost(s, v); const x = one === undefined || c.count === 0 || cost(one, v).count === 0 ? "" : ` (${(c.us / cost(one, v).us).toFixed(1)}x)`; return c.count === 0 ? "-" : `${c.count} / ${c.us.toFixed(0)}${x}`; })]);
    }
    const matvecs = (s: number) => variants[s]!.reduce((n, v, i) => (v.startsWith("matvec ") ? n + best[s]![i]! : n), 0) / 1000;
    const against = (f: (s: number) => number, s: number) => `${f(s).toFixed(1)}${one === undefined ? "" : ` (${(f(s) / f(one)).toFixed(1)}x)`}`;
    lines.push(["every matvec (ms)", ...at.map((s) => against(matvecs, s))]);
    lines.push(["kernels summed (ms)", ...at.map((s) => against(sum, s))]);
    lines.push(["measured decode ms/step", ...at.map((s) => measured.get(cases[s]!)!.decodeMsPerToken.toFixed(1))]);
    if (one !== undefined) {
      lines.push(["batching bound, summed kernels", ...at.map((s) => `${((cases[s]!.rows * sum(one)) / sum(s)).toFixed(2)}x`)]);
      lines.push(["batching bound, measured steps", ...at.map((s) => `${((cases[s]!.rows * measured.get(cases[one]!)!.decodeMsPerToken) / measured.get(cases[s]!)!.decodeMsPerToken).toFixed(2)}x`)]);
    }
    console.log(pad(lines));
  }
  if (values.json) {
    const result = { bench: "batch-profile", device, cases: cases.map((c, s) => ({ ...c, kernelMs: sum(s), measuredMs: measured.get(c)!.decodeMsPerToken, kernels: all.map((v) => ({ kernel: v, ...cost(s, v) })).filter((k) => k.count > 0) })) };
    writeFileSync(values.json, JSON.stringify(result, null, 2) + "\n");
  }
} finally {
  engine.destroy();
  gpu.destroy();
}
