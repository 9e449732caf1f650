// Decode with the LoRA expand in the matvec's epilogue (the plan's `lora.matvec`, what the engine runs)
// against the same plan with those kernels taken out (the shrink, the plain matvec and a separate
// expand per module, as before the fusion), in one run: the base alone, one LoRA tenant and eight, on
// the small random model (hidden 512, 8 layers), rank 8 on all 7 modules. Prints decode ms per token,
// each mode's ratio to the base, fused / unfused, and the dispatches of one decode step.
//   node --import tsx bench/lora-fusion.ts [--decode 16] [--prompt 16] [--repeats 3]
import { parseArgs } from "node:util";
import { readHfConfig } from "../compiler/hf-config.ts";
import { EXPERT_MODULES, type ExpertModule } from "../compiler/model.ts";
import { peftSpec, randomAdapter } from "../examples/random-adapter.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { Engine } from "../runtime/engine/engine.ts";
import type { Plan } from "../runtime/package/format.ts";
import { enginePlan } from "../bin/engine-plan.ts";
import { benchPrompt, bestOf, measureBatch, type GenerationFigures } from "../bin/measure/generation.ts";
import { RANDOM_SIZES, modelSummary, randomModelDir } from "../bin/measure/random-model.ts";

const { values } = parseArgs({ options: { decode: { type: "string", default: "16" }, prompt: { type: "string", default: "16" }, repeats: { type: "string", default: "3" } } });
const DECODE = Number(values.decode);
const PROMPT = Number(values.prompt);
const REPEATS = Number(values.repeats);
const TENANTS = [1, 8] as const;

const dir = randomModelDir(RANDOM_SIZES.small);
const base = readHfConfig(dir);
const gpu = await acquireDevice();
console.log(`device: ${adapterSummary(gpu.report)}\nmodel: ${modelSummary(base)}`);

/** The plan without the epilogue matvecs: every module's LoRA runs as shrink, matvec, expand. */
function unfused(plan: Plan<ExpertModule>): Plan<ExpertModule> {
  const strip = (ops: Plan<ExpertModule>["layer"]): Plan<ExpertModule>["layer"] => ops.map((op) => (op.op === "linear" && op.lora?.matvec ? { ...op, lora: (({ matvec: _m, ...rest }) => rest)(op.lora) } : op));
  return { ...plan, layer: strip(plan.layer), head: strip(plan.head) };
}

/** Dispatches a decode step records per layer: the plan's ops as the engine runs them for one LoRA row. */
function dispatchesPerLayer(plan: Plan): number {
  return plan.layer.reduce((n, op) => n + (op.op === "linear" ? (op.lora ? (op.lora.matvec ? 2 : 3) : 1) : 1), 0);
}

const spec = peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name: "bench" });
const planned = enginePlan({ base, checkpointDir: dir, ctx: PROMPT + DECODE + 2, maxAdapters: 8, maxLoraRank: 8 });
const variants = [
  { name: "fused", plan: planned.plan },
  { name: "unfused", plan: unfused(planned.plan) },
];
const results = new Map<string, GenerationFigures>();
// Both engines stay loaded and every round runs every case on each, so load from other jobs falls on both alike.
const engines = await Promise.all(variants.map((v) => Engine.load({ base, checkpointDir: dir, gpu, ...planned, plan: v.plan, maxSequences: 8, maxAdapters: 8 })));
try {
  const tenants = Array.from({ length: 8 }, (_, i) => randomAdapter({ spec, seed: 50 + i, name: `t${i}` }));
  for (const engine of engines) for (const t of tenants) engine.loadAdapter(t.name, t);
  for (let round = 0; round < REPEATS; round++) {
    for (const n of TENANTS) {
      for (const mode of ["base", "lora"] as const) {
        const requests = Array.from({ length: n }, (_, i) => ({ prompt: benchPrompt(PROMPT, i, base.vocabSize), maxTokens: DECODE + 1, stop: [], ...(mode === "lora" ? { adapter: tenants[i]!.name } : {}) }));
        for (const [v, engine] of variants.map((v, i) => [v, engines[i]!] as const)) {
          if (round === 0) await engine.generateBatch(requests.map((r) => ({ ...r, maxTokens: 2 })));
          const key = `${v.name} ${mode} ${n}`;
          results.set(key, bestOf(results.get(key), await measureBatch(engine, requests)));
        }
      }
    }
  }
} finally {
  for (const engine of engines) engine.destroy();
}
gpu.destroy();

console.log(`decode ms/token, best of ${REPEATS}; dispatches per layer of a LoRA decode step: fused ${dispatchesPerLayer(variants[0]!.plan)}, unfused ${dispatchesPerLayer(variants[1]!.plan)}`);
console.log("tenants  plan      base    LoRA  LoRA/base");
for (const n of TENANTS) {
  for (const v of variants) {
    const b = results.get(`${v.name} base ${n}`)!.decodeMsPerToken;
    const l = results.get(`${v.name} lora ${n}`)!.decodeMsPerToken;
    console.log(`${String(n).padStart(7)}  ${v.name.padEnd(8)} ${b.toFixed(2).padStart(6)}  ${l.toFixed(2).padStart(6)}  ${(l / b).toFixed(3)}x`);
  }
  const f = results.get(`fused lora ${n}`)!.decodeMsPerToken;
  const u = results.get(`unfused lora ${n}`)!.decodeMsPerToken;
  console.log(`${String(n).padStart(7)}  fused LoRA / unfused LoRA: ${(f / u).toFixed(3)}x`);
}
