// Decode with the LoRA fusions against the plans without them, in one run, on the small random model
// (hidden 512, 8 layers), rank 8 on all 7 modules, the base alone, one LoRA tenant and eight:
// - grouped: the engine's plan: one shrink for q/k/v and one for gate/up (the plan's lora_shrink ops,
//   a shrink kernel with `modules`), each module's expand in its matvec's epilogue (`lora.matvec`);
// - per module: the same plan with a shrink per module (planBase groupLoraShrinks false), epilogue kept;
// - unfused: per module, with the epilogue matvecs taken out (shrink, plain matvec, separate expand).
// All three engines stay loaded and every round runs every case on each, so load from other jobs falls
// on all alike. Prints decode ms per token, each plan's LoRA / base, the plans' ratios, and the
// dispatches of one LoRA decode layer. Then the shrinks alone, where the grouping acts: the q/k/v and
// gate/up group shrink against its modules' shrinks one by one on the same buffers (regions bound as
// ranges, as the engine binds them), 1 row and 8 rows of 8 tenants, interleaved, best of rounds.
//   node --import tsx bench/lora-fusion.ts [--decode 16] [--prompt 16] [--repeats 3] [--rounds 7]
import { parseArgs } from "node:util";
import { readHfConfig } from "../compiler/hf-config.ts";
import { EXPERT_MODULES, type ExpertModule } from "../compiler/model.ts";
import { kernelSources, planBase } from "../compiler/plan.ts";
import { loraShrinkKernel, packLoraSlots } from "../compiler/kernels/lora.ts";
import { loraARows, loraSlotStride, loraTWords } from "../runtime/gpu/layouts.ts";
import { PipelineCache, StepEncoder, createStorage } from "../runtime/gpu/kernel-runner.ts";
import { bestMicros } from "../bin/measure/kernel-timing.ts";
import { peftSpec, randomAdapter } from "../examples/random-adapter.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { Engine } from "../runtime/engine/engine.ts";
import type { Plan } from "../runtime/package/format.ts";
import { enginePlan, weightsFor } from "../bin/engine-plan.ts";
import { benchPrompt, bestOf, measureBatch, type GenerationFigures } from "../bin/measure/generation.ts";
import { RANDOM_SIZES, modelSummary, randomModelDir } from "../bin/measure/random-model.ts";

const { values } = parseArgs({
  options: { decode: { type: "string", default: "16" }, prompt: { type: "string", default: "16" }, repeats: { type: "string", default: "3" }, rounds: { type: "string", default: "7" } },
});
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

/** Dispatches a decode step records per layer with every module's LoRA on: the plan's ops as the engine runs them. */
function dispatchesPerLayer(plan: Plan): number {
  return plan.layer.reduce((n, op) => n + (op.op === "copy" ? 0 : op.op === "linear" && op.lora && op.lora.matvec === undefined ? 2 : 1), 0);
}

const spec = peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name: "bench" });
const ctx = PROMPT + DECODE + 2;
const planned = enginePlan({ base, checkpointDir: dir, ctx, maxAdapters: 8, maxLoraRank: 8 });
const perModule = planBase(base, { ctx, maxLoraRank: 8, weights: weightsFor(base, dir), groupLoraShrinks: false });
const perModuleKernels = kernelSources(perModule);
const variants = [
  { name: "grouped", plan: planned.plan, kernels: planned.kernels },
  { name: "per module", plan: perModule, kernels: perModuleKernels },
  { name: "unfused", plan: unfused(perModule), kernels: perModuleKernels },
];
const results = new Map<string, GenerationFigures>();
const engines = await Promise.all(variants.map((v) => Engine.load({ base, checkpointDir: dir, gpu, ...planned, plan: v.plan, kernels: v.kernels, maxSequences: 8, maxAdapters: 8 })));
try {
  const tenants = Array.from({ length: 8 }, (_, i) => randomAdapter({ spec, seed: 50 + i, name: `t${i}` }));
  for (const engine of engines) for (const t of tenants) engine.loadAdapter(t.name, t);
  for (let round = 0; round < REPEATS; round++) {
    for (const n of TENANTS) {
      for (const mode of ["base", "lora"] as const) {
        const requests = Array.from({ length: n }, (_, i) => ({ prompt: benchPrompt(PROMPT, i, base.vocabSize), maxTokens: DECODE + 1, stop: [], ...(mode === "lora" ? { adapter: tenants[i]!.name } : {}) }));
        // alternate rounds run the plans in reverse order
        const order = variants.map((v, i) => [v, engines[i]!] as const);
        for (const [v, engine] of round % 2 === 0 ? order : order.reverse()) {
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
const shrinks = await timeShrinks(Number(values.rounds));
gpu.destroy();

const ms = (name: string, mode: string, n: number) => results.get(`${name} ${mode} ${n}`)!.decodeMsPerToken;
console.log(`decode ms/token, best of ${REPEATS}; dispatches per layer of a LoRA decode step: ${variants.map((v) => `${v.name} ${dispatchesPerLayer(v.plan)}`).join(", ")}`);
console.log("tenants  plan          base    LoRA  LoRA/base");
for (const n of TENANTS) {
  for (const v of variants) {
    const b = ms(v.name, "base", n);
    const l = ms(v.name, "lora", n);
    console.log(`${String(n).padStart(7)}  ${v.name.padEnd(11)} ${b.toFixed(2).padStart(6)}  ${l.toFixed(2).padStart(6)}  ${(l / b).toFixed(3)}x`);
  }
  const ratio = (a: string, b: string) => (ms(a, "lora", n) / ms(b, "lora", n)).toFixed(3);
  console.log(`${String(n).padStart(7)}  LoRA: grouped / per module ${ratio("grouped", "per module")}x, per module / unfused ${ratio("per module", "unfused")}x, grouped / unfused ${ratio("grouped", "unfused")}x`);
}

console.log(`\nthe shrinks alone (in ${base.hiddenSize}, rank 8, 8 slots), us per layer's group, best of ${values.rounds} interleaved rounds of 20:`);
console.log("group      rows  one dispatch  one per module  one / per module");
for (const r of shrinks) console.log(`${r.group.padEnd(9)} ${String(r.rows).padStart(5)}  ${r.grouped.toFixed(0).padStart(12)}  ${r.single.toFixed(0).padStart(14)}  ${(r.grouped / r.single).toFixed(3)}x`);

/** The group shrink against its modules' shrinks one at a time, on the engine's layout (8 slots, rank 8). */
async function timeShrinks(rounds: number) {
  const device = gpu.device;
  const step = new StepEncoder(device, new PipelineCache(device));
  const K = base.hiddenSize;
  const R = 8;
  const slots = 8;
  const rows = 8;
  const floats = (n: number) => Float32Array.from({ length: n }, () => Math.random() * 2 - 1);
  const aRows = loraARows(slots, R, K);
  const slotStride = loraSlotStride(slots);
  const tWords = loraTWords(rows, R);
  const out: { group: string; rows: number; grouped: number; single: number }[] = [];
  for (const [group, M] of [["q/k/v", 3], ["gate/up", 2]] as const) {
    const slotBytes = new Uint8Array(M * slotStride * 8);
    for (let m = 0; m < M; m++) slotBytes.set(packLoraSlots(Array.from({ length: slots }, () => ({ rank: R, scaling: 2 }))), m * slotStride * 8);
    const b = {
      x: createStorage(device, floats(rows * K), "x"),
      a: createStorage(device, floats(M * aRows * K), "a"),
      slots: createStorage(device, slotBytes, "slots"),
      rowAdapter: createStorage(device, Uint32Array.from({ length: rows }, (_, i) => i), "one tenant per row"),
      gates: createStorage(device, new Float32Array(rows * 7).fill(1), "gates"),
      t: createStorage(device, M * tWords * 4, "t"),
    };
    const grouped = loraShrinkKernel({ inFeatures: K, outFeatures: K, maxRank: R, rowInfo: true, modules: M });
    const single = loraShrinkKernel({ inFeatures: K, outFeatures: K, maxRank: R, rowInfo: true });
    for (const n of [1, rows]) {
      const select = { x: b.x, rowAdapter: b.rowAdapter, gates: b.gates };
      const recordGroup = () => step.dispatch(grouped, { ...select, a: b.a, slots: b.slots, t: b.t }, { rows: n, gateStride: 7, gateIndex: 0, aRows, slotStride, tStride: tWords });
      const range = (buffer: GPUBuffer, bytes: number, m: number) => ({ buffer, offset: m * bytes, size: bytes });
      const recordEach = () => {
        for (let m = 0; m < M; m++) step.dispatch(single, { ...select, a: range(b.a, aRows * K * 4, m), slots: range(b.slots, slotStride * 8, m), t: range(b.t, tWords * 4, m) }, { rows: n, gateStride: 7, gateIndex: m });
      };
      let [g, e] = [Infinity, Infinity];
      for (let round = 0; round < rounds; round++) {
        g = Math.min(g, await bestMicros(step, device, recordGroup, { repeats: 1, rounds: 20 }));
        e = Math.min(e, await bestMicros(step, device, recordEach, { repeats: 1, rounds: 20 }));
      }
      out.push({ group, rows: n, grouped: g, single: e });
    }
    for (const buffer of Object.values(b)) buffer.destroy();
  }
  step.destroy();
  return out;
}
