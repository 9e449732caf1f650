// The MiLoRA paper's Table 4 on this machine: decode tokens/s and peak memory of MiLoRA against the
// baselines it names, on one spec and parameter budget, all unmerged, at beam 1 and beam 3, for one
// sequence and for eight tenants' sequences at once; then a profile of one decode step per mode (every
// dispatch it records, counted and timed alone) that says where the differences come from.
//   node --import tsx bench/table4.ts [--hidden 512] [--rank 32] [--tenants 1,8] [--prompt 16] [--decode 8]
//                                     [--repeats 2] [--profile 1x1,8x1] [--json FILE] [--svg FILE]
// Modes (bin/measure/comparison.ts standardModes): MiLoRA (routed once per prompt, top_k 2 of 7), the
// per-token MiLoRA router (`when token`), MOELoRA-style (per_module: each module's rank split into 8
// experts, top 4 per token), MixLoRA-style (per_ffn: attention plain LoRA, 8 MLP experts of rank r/8, top
// 2 per token, a feed-forward pass per kept expert), DoRA and plain LoRA: rank --rank on all 7 modules of
// every layer, the same LoRA parameters in every mode (the per-token baselines' rank rule: moeRank); and
// the base alone, for reference.
// The measuring is `milora bench`'s (runComparison: one engine per plan, rounds interleaving every mode,
// best of --repeats, peak of the row's own engine). --profile TENANTSxBEAMS... chooses the profiled
// batches ("" for none). --json writes the figures, --svg their chart (bench/chart.ts renders one from
// the other). The checkpoint is written once under .cache/bench/.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { ROUTER_DEFAULTS } from "../compiler/defaults.ts";
import { readHfConfig } from "../compiler/hf-config.ts";
import { EXPERT_MODULES, storedRank, type ExpertModule } from "../compiler/model.ts";
import { peftSpec, randomAdapter } from "../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { Engine } from "../runtime/engine/engine.ts";
import type { GenerateRequest } from "../runtime/engine/requests.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { meterBuffers } from "../runtime/gpu/memory-meter.ts";
import { openCheckpoint } from "../runtime/formats/checkpoint.ts";
import { plannedEngine } from "../bin/engine-plan.ts";
import { runComparison, standardModes, type BenchMode, type ComparisonRow, type ModeName } from "../bin/measure/comparison.ts";
import { COPY_VARIANT, kernelVariant, linearShapes, recordDecodeStep, timeSteps, type Recorded } from "../bin/measure/step-profile.ts";
import { benchPrompt } from "../bin/measure/generation.ts";
import { RANDOM_SIZES } from "../bin/measure/random-model.ts";
import { table4Chart, type Table4Result } from "./chart.ts";

const { values } = parseArgs({
  options: {
    hidden: { type: "string", default: "512" },
    rank: { type: "string", default: "32" },
    tenants: { type: "string", default: "1,8" },
    prompt: { type: "string", default: "16" },
    decode: { type: "string", default: "8" },
    repeats: { type: "string", default: "2" },
    profile: { type: "string", default: "1x1,8x1" },
    json: { type: "string" },
    svg: { type: "string" },
  },
});
const hidden = Number(values.hidden);
const RANK = Number(values.rank);
const TENANTS = values.tenants.split(",").map(Number);
const PROMPT = Number(values.prompt);
const DECODE = Number(values.decode);
const REPEATS = Number(values.repeats);
const BEAMS = [1, 3];
const PROFILED = values.profile === "" ? [] : values.profile.split(",").map((p) => p.split("x").map(Number) as [number, number]);

const ORDER: readonly ModeName[] = ["milora", "token", "moelora", "mixlora", "dora", "lora"];
const SHORT: Record<string, string> = { base: "base alone", milora: "MiLoRA", token: "per-token MiLoRA router", moelora: "MOELoRA-style", mixlora: "MixLoRA-style", dora: "DoRA", lora: "plain LoRA" };
// The paper's Table 4 (LLaMA-2 7B, one A40, LoRA unmerged, one request): tokens/s at beam 1 / beam 3.
const PAPER: Record<string, readonly [number, number]> = { milora: [43.7, 33.5], moelora: [35.9, 28.4], dora: [36.5, 29.6] };

const dir = join(".cache", "bench", `milora-${hidden}`);
writeRandomCheckpoint(dir, { ...RANDOM_SIZES.small, hiddenSize: hidden, intermediateSize: Math.round((hidden * 8) / 3 / 64) * 64 });
const base = readHfConfig(dir);
const adapter = { ...peftSpec({ base, modules: EXPERT_MODULES, rank: RANK, alpha: 2 * RANK, seed: 0, name: "table4" }), router: { ...ROUTER_DEFAULTS, noise: false } };
const modes = standardModes(adapter, [...ORDER, "base"]);

const gpu = await acquireDevice();
const meter = meterBuffers(gpu.device);
const started = performance.now();
const device = adapterSummary(gpu.report);
const model = `hidden ${hidden}, ${base.layers} layers, ${base.heads} / ${base.kvHeads} heads, intermediate ${base.intermediateSize}, vocab ${base.vocabSize}, f32 weights`;
console.log(`device: ${device}`);
console.log(`model: ${model}`);
console.log(`adapters: rank ${RANK} (alpha ${2 * RANK}) on all 7 modules of every layer; MiLoRA top_k 2 of 7 per layer; ${modes.filter((m) => m.spec?.moe).map((m) => `${SHORT[m.name]} ${moeText(m)}`).join("; ")}`);
console.log(`requests: ${PROMPT}-token prompts, ${DECODE} decode steps, no stop; ${TENANTS.join(" and ")} tenant(s) at once; best of ${REPEATS} interleaved rounds`);
const rows = await runComparison({ base, checkpointDir: dir, gpu, modes, formats: ["f32"], tenants: TENANTS, beams: BEAMS, prompt: PROMPT, decode: DECODE, repeats: REPEATS, meter, log: (l) => console.error(`table4: ${l}`) });
const row = (mode: string, tenants: number, beams: number) => rows.find((r) => r.mode === mode && r.tenants === tenants && r.beams === beams)!;

console.log("");
const columns = TENANTS.flatMap((t) => BEAMS.map((b) => [t, b] as const));
const head = columns.map(([t, b]) => `${t === 1 ? "1 seq" : `${t} ten.`}, beam ${b}`);
const lines: string[][] = [["mode", ...head.map((h) => `${h} tok/s`), ...TENANTS.map((t) => `peak MiB (${t})`)]];
for (const m of modes) {
  lines.push([SHORT[m.name]!, ...columns.map(([t, b]) => row(m.name, t, b).tokensPerS.toFixed(1)), ...TENANTS.map((t) => (Math.max(...BEAMS.map((b) => row(m.name, t, b).peakBytes)) / 2 ** 20).toFixed(1))]);
}
lines.push([]);
for (const m of modes.filter((x) => x.name !== "milora")) {
  const paper = PAPER[m.name];
  lines.push([`MiLoRA / ${SHORT[m.name]}`, ...columns.map(([t, b]) => `${(row("milora", t, b).tokensPerS / row(m.name, t, b).tokensPerS).toFixed(2)}x`), ...TENANTS.map(() => ""), paper ? `paper ${(PAPER.milora![0] / paper[0]).toFixed(2)}x / ${(PAPER.milora![1] / paper[1]).toFixed(2)}x` : ""]);
}
console.log(table(lines));
console.log("paper (LLaMA-2 7B, A40, one request): MiLoRA 43.7 / 33.5 tok/s, MOELoRA 35.9 / 28.4, DoRA 36.5 / 29.6 (beam 1 / beam 3); peak memory 13.8 / 15.3 GB, about equal");

// The profile: one decode step of each mode (bin/measure/step-profile.ts: recorded, each dispatch replayed
// alone on the engine's own buffers; same adapters, routing and rows: each mode has an engine of its
// own, held until the timing ends). The base alone's step is timed in full; a mode's kernel variant that
// it dispatches as often as the base does is the base's work and keeps the base's time, the others are
// timed in the mode's own step.
interface KernelCost {
  readonly kernel: string;
  readonly count: number;
  readonly us: number;
}
interface ModeProfile {
  readonly mode: string;
  readonly tenants: number;
  readonly beams: number;
  readonly dispatches: number;
  readonly copies: number;
  /** The step's dispatches and copies, each timed alone, summed. */
  readonly kernelMs: number;
  readonly measuredMs: number;
  readonly kernels: readonly KernelCost[];
}
const profiles: ModeProfile[] = [];
const profiled: readonly BenchMode[] = [{ name: "base", label: "base alone" }, ...modes.filter((m) => m.spec)];
const TIMING_ROUNDS = 4;
const shapes = linearShapes(base);
for (const [tenants, beams] of PROFILED) {
  const engines: Engine[] = [];
  try {
    const steps: { readonly mode: BenchMode; readonly step: readonly Recorded[] }[] = [];
    for (const mode of profiled) {
      const engine = await Engine.load(
        plannedEngine({
          base,
          checkpointDir: dir,
          gpu,
          weights: "f32",
          ctx: PROMPT + 4,
          maxSequences: tenants * beams,
          maxAdapters: tenants,
          maxLoraRank: Math.max(1, ...(mode.spec?.experts.map((e) => storedRank(mode.spec!, e)) ?? [])),
          ...(mode.spec?.moe ? { adapter: mode.spec } : {}),
        }),
      );
      engines.push(engine);
      const loaded = mode.spec ? Array.from({ length: tenants }, (_, i) => randomAdapter({ spec: mode.spec!, seed: 100 + i, name: `${mode.name}-${i}`, baseWeight: baseWeight(engine.plan) })) : [];
      for (const a of loaded) engine.loadAdapter(a.name, a);
      const requests = (maxTokens: number): GenerateRequest[] =>
        Array.from({ length: tenants }, (_, i) => ({ prompt: benchPrompt(PROMPT, i, base.vocabSize), maxTokens, stop: [], ...(loaded[i] ? { adapter: loaded[i].name } : {}), ...(beams > 1 ? { beam: { beams } } : {}) }));
      steps.push({ mode, step: await recordDecodeStep(engine, requests) });
    }
    // Which dispatches to time: all of the base's, and each mode's variants it dispatches otherwise than the base.
    const variants = steps.map(({ step }) => step.map((r) => (r.kind === "copy" ? COPY_VARIANT : kernelVariant(r.kernel, shapes))));
    const count = (names: readonly string[], v: string) => names.filter((n) => n === v).length;
    const timed = steps.map((_, m) => variants[m]!.map((v) => m === 0 || count(variants[m]!, v) !== count(variants[0]!, v)));
    const best = await timeSteps(gpu.device, steps.map((s) => s.step), (k) => kernelVariant(k, shapes), { rounds: TIMING_ROUNDS, timed: (m, i) => timed[m]![i]! });
    const baseCosts = new Map<string, number>();
    variants[0]!.forEach((v, i) => baseCosts.set(v, (baseCosts.get(v) ?? 0) + best[0]![i]!));
    steps.forEach(({ mode, step }, m) => {
      const costs = new Map<string, KernelCost>();
      variants[m]!.forEach((v, i) => {
        const c = costs.get(v) ?? { kernel: v, count: 0, us: 0 };
        costs.set(v, { kernel: v, count: c.count + 1, us: c.us + (timed[m]![i] ? best[m]![i]! : 0) });
      });
      // a variant the mode runs as the base does: the base's figure
      const kernels = [...costs.values()].map((c) => (timed[m]!.some((t, i) => t && variants[m]![i] === c.kernel) ? c : { ...c, us: baseCosts.get(c.kernel)! })).sort((a, b) => b.us - a.us);
      profiles.push({
        mode: mode.name,
        tenants,
        beams,
        dispatches: step.filter((r) => r.kind === "dispatch").length,
        copies: step.filter((r) => r.kind === "copy").length,
        kernelMs: kernels.reduce((n, c) => n + c.us, 0) / 1000,
        measuredMs: rows.find((r) => r.mode === mode.name && r.tenants === tenants && r.beams === beams)?.decodeMsPerToken ?? NaN,
        kernels,
      });
    });
  } finally {
    for (const e of engines) e.destroy();
  }
}

for (const [tenants, beams] of PROFILED) {
  const group = ["base", ...ORDER].map((m) => profiles.find((p) => p.mode === m && p.tenants === tenants && p.beams === beams)).filter((p) => p !== undefined);
  const alone = group[0]!;
  const cost = (p: ModeProfile, k: string) => p.kernels.find((c) => c.kernel === k);
  const kernels = [...new Set(group.flatMap((p) => p.kernels.map((k) => k.kernel)))];
  const alike = kernels.filter((k) => group.every((p) => cost(p, k)?.count === cost(alone, k)?.count));
  const differing = kernels.filter((k) => !alike.includes(k)).sort((a, b) => Math.max(...group.map((p) => cost(p, b)?.us ?? 0)) - Math.max(...group.map((p) => cost(p, a)?.us ?? 0)));
  const rest = (p: ModeProfile) => alike.reduce((n, k) => ({ count: n.count + cost(p, k)!.count, us: n.us + cost(p, k)!.us }), { count: 0, us: 0 });
  const milora = group.find((p) => p.mode === "milora");
  const ms = (x: number) => (x / 1000).toFixed(1);
  console.log(`\nprofile of one decode step, ${tenants} tenant${tenants === 1 ? "" : "s"} at beam ${beams} (${tenants * beams} row${tenants * beams === 1 ? "" : "s"}): dispatches / us, each timed alone on the engine's buffers (best of ${TIMING_ROUNDS} rounds of 4, interleaving the modes)`);
  const profileLines = [
    ["kernel", ...group.map((p) => SHORT[p.mode]!)],
    ...differing.map((k) => [k, ...group.map((p) => { const c = cost(p, k); return c ? `${c.count} / ${c.us.toFixed(0)}` : "-"; })]),
    [`the base's other ${alike.length} kernels`, ...group.map((p) => `${rest(p).count} / ${rest(p).us.toFixed(0)}`)],
    ["dispatches / copies", ...group.map((p) => `${p.dispatches} / ${p.copies}`)],
    ["all kernels summed (ms)", ...group.map((p) => p.kernelMs.toFixed(1))],
    ["  over the base's (ms)", ...group.map((p) => ms((p.kernelMs - alone.kernelMs) * 1000))],
    ["  over MiLoRA's (ms)", ...group.map((p) => (milora ? ms((p.kernelMs - milora.kernelMs) * 1000) : "-"))],
    ["measured decode ms/step", ...group.map((p) => p.measuredMs.toFixed(1))],
  ];
  console.log(table(profileLines));
}
console.log(`\n${((performance.now() - started) / 1000).toFixed(0)} s`);

const result: Table4Result = {
  bench: "table4",
  device,
  model: `${model}; rank ${RANK} on all 7 modules; ${PROMPT}-token prompts, ${DECODE} decode steps, best of ${REPEATS}`,
  results: rows.map((r: ComparisonRow) => ({ mode: r.mode, label: SHORT[r.mode]!, tenants: r.tenants, beams: r.beams, tokensPerSecond: r.tokensPerS, decodeMsPerToken: r.decodeMsPerToken, peakBytes: r.peakBytes })),
  profiles,
};
if (values.json) writeFileSync(values.json, JSON.stringify(result, null, 2) + "\n");
if (values.svg) writeFileSync(values.svg, table4Chart(result));
meter.stop();
gpu.destroy();

/** A kernel's name with what tells its variants apart: the LoRA shrink's MoE form, a linear's shape. */

function moeText(m: BenchMode): string {
  const a = m.spec!;
  const moe = a.moe!;
  const k = moe.selection.rule === "top_k" ? moe.selection.k : moe.experts;
  if (moe.placement === "per_module") return `(rank ${a.experts[0]!.rank} split into ${moe.experts} experts of rank ${a.experts[0]!.rank / moe.experts} per module, top ${k} per token)`;
  const mlp = a.experts.find((e) => e.module === "down_proj") ?? a.experts.find((e) => storedRank(a, e) !== e.rank)!;
  return `(attention rank ${RANK}, ${moe.experts} MLP experts of rank ${mlp.rank}, top ${k} per token, ${k} feed-forward passes)`;
}

function baseWeight(plan: Engine["plan"]): (layer: number, module: ExpertModule) => Float32Array {
  return (layer, module) => {
    const t = plan.tensors.find((x) => x.role === "linear" && x.layer === layer && x.module === module)!;
    const checkpoint = openCheckpoint(dir);
    try {
      return checkpoint.readF32(t.name, t.shape);
    } finally {
      checkpoint.close();
    }
  };
}

function table(lines: readonly (readonly string[])[]): string {
  const widths = lines.reduce<number[]>((w, l) => l.map((c, i) => Math.max(w[i] ?? 0, c.length)), []);
  return lines.map((l) => l.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ").trimEnd()).join("\n");
}
