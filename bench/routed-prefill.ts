// What routing a prompt over chunks costs: prefill ms of a prompt three times the step budget, for a
// MiLoRA tenant (attention pooling, top_k 2 of 7) and for plain LoRA on the same 7 modules, each with
// the whole prompt in one step and with steps of a third of it. Plain LoRA's chunks run chunk by chunk
// through every layer; the MiLoRA prompt's run layer by layer over the chunks (its hidden states held
// whole, each layer's router pooling over all of them first): the difference between the two ratios
// is what the layer-major order costs beyond chunking itself.
//   node --import tsx bench/routed-prefill.ts [--hidden 512] [--step 64] [--repeats 5]
import { join } from "node:path";
import { parseArgs } from "node:util";
import { readHfConfig } from "../compiler/hf-config.ts";
import { ROUTER_DEFAULTS } from "../compiler/defaults.ts";
import { EXPERT_MODULES, type Adapter } from "../compiler/model.ts";
import { peftSpec, randomAdapter } from "../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { Engine } from "../runtime/engine/engine.ts";
import { plannedEngine } from "../bin/engine-plan.ts";

const { values } = parseArgs({ options: { hidden: { type: "string", default: "512" }, step: { type: "string", default: "64" }, repeats: { type: "string", default: "5" } } });
const hidden = Number(values.hidden);
const STEP = Number(values.step);
const PROMPT = 3 * STEP;
// Other jobs share the machine: each figure is the median (and the best) of this many runs.
const REPEATS = Number(values.repeats);
const RANK = 8;

const dir = join(".cache", "bench", `milora-${hidden}`);
writeRandomCheckpoint(dir, { hiddenSize: hidden, layers: 8, heads: 8, kvHeads: 4, intermediateSize: Math.round((hidden * 8) / 3 / 64) * 64, vocabSize: 4096, maxPositions: 256, seed: 3 });
const base = readHfConfig(dir);
const lora = peftSpec({ base, modules: EXPERT_MODULES, rank: RANK, alpha: 2 * RANK, seed: 0, name: "lora" });
const routed: Adapter = { ...lora, name: "milora", router: { ...ROUTER_DEFAULTS, pooling: "attention", selection: { rule: "top_k", k: 2, renormalize: false }, noise: false, balance: 0.01 } };
const prompt = Array.from({ length: PROMPT }, (_, i) => (i * 37 + 5) % base.vocabSize);

const gpu = await acquireDevice();
console.log(`device: ${adapterSummary(gpu.report)}`);
console.log(`model: hidden ${hidden}, 8 layers, intermediate ${base.intermediateSize}, vocab ${base.vocabSize}; adapters: rank ${RANK} on all 7 modules; prompt ${PROMPT} tokens`);

// Both engines at once, their runs interleaved, so the machine's other load falls on both alike.
const engines = new Map<number, Engine>();
for (const stepRows of [PROMPT, STEP]) {
  const engine = await Engine.load(plannedEngine({ base, checkpointDir: dir, gpu, ctx: PROMPT + 2, maxSequences: 1, maxAdapters: 2, maxLoraRank: RANK, maxBatchRows: stepRows }));
  for (const spec of [lora, routed]) engine.loadAdapter(spec.name, randomAdapter({ spec, seed: 5 }));
  engines.set(stepRows, engine);
}
const gates: Record<number, Map<string, number>[]> = {};
const times = new Map<string, number[]>();
// The first round warms the kernels each shape dispatches.
for (let r = 0; r < REPEATS + 1; r++) {
  for (const [stepRows, engine] of engines) {
    for (const spec of [lora, routed]) {
      const g = await engine.generate({ prompt, maxTokens: 0, adapter: spec.name });
      if (spec.router) gates[stepRows] = (g.routing ?? []).map((d) => new Map(Object.entries(d.experts)));
      const key = `${stepRows} ${spec.name}`;
      if (r > 0) times.set(key, [...(times.get(key) ?? []), g.timings.prefillMs]);
    }
  }
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
for (const stepRows of engines.keys()) {
  const line = [`steps of ${String(stepRows).padStart(3)} rows`];
  for (const spec of [lora, routed]) {
    const t = times.get(`${stepRows} ${spec.name}`)!;
    line.push(`${spec.router ? "MiLoRA" : "LoRA"} median ${median(t).toFixed(0).padStart(6)} ms (best ${Math.min(...t).toFixed(0)})`);
  }
  console.log(line.join("   "));
}
for (const engine of engines.values()) engine.destroy();
// The decisions of both ways, compared: the same experts, gates equal to f32 rounding.
let worst = 0;
gates[PROMPT]!.forEach((layer, l) => {
  const other = gates[STEP]![l]!;
  if ([...layer.keys()].sort().join() !== [...other.keys()].sort().join()) throw new Error(`layer ${l}: chunked routing chose other experts`);
  for (const [m, g] of layer) worst = Math.max(worst, Math.abs(g - other.get(m)!));
});
console.log(`routing over chunks vs one step: same experts in every layer, largest gate difference ${worst.toExponential(1)}`);
gpu.destroy();
