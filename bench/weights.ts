// What each weight storage format costs and saves (runtime/package/format.ts WEIGHT_FORMATS): decode
// ms/token and prefill tokens/s of one random F32 checkpoint stored as f32, f16, q8 and q4, the bytes on
// the device, the floor the weights set (the decode matvecs alone over every linear weight,
// bench/stream-once.ts), and the logits' error against the float64 reference on the f32 weights (the
// format's cost in accuracy). The four engines are resident at once and measured in turn, best of
// --repeats, ratios against f32 from the same run.
//   node --import tsx bench/weights.ts [--hidden 512] [--decode 32] [--repeats 5]
// The checkpoint (the 30M-parameter model at hidden 512) is written once under .cache/bench/.
import { join } from "node:path";
import { parseArgs } from "node:util";
import { readHfConfig } from "../compiler/hf-config.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { Engine } from "../runtime/engine/engine.ts";
import type { Plan as PlannedPlan } from "../compiler/plan.ts";
import { storageRowWords, type Plan, type WeightFormat } from "../runtime/package/format.ts";
import { plannedEngine } from "../bin/engine-plan.ts";
import { benchPrompt, figuresOf } from "../bin/measure/generation.ts";
import { loadReferenceWeights, referenceLogits } from "../test/reference/llama.ts";
import { streamOnceMs } from "./stream-once.ts";

const { values } = parseArgs({ options: { hidden: { type: "string", default: "512" }, decode: { type: "string", default: "32" }, repeats: { type: "string", default: "5" } } });
const hidden = Number(values.hidden);
const DECODE = Number(values.decode);
// Other jobs share the machine: each figure is the best of this many runs.
const REPEATS = Number(values.repeats);
const DECODE_PROMPT = 16;
const PREFILL = 128;
const ACCURACY_PROMPT = 8;
const FORMATS: readonly WeightFormat[] = ["f32", "f16", "q8", "q4"];

const dir = join(".cache", "bench", `weights-${hidden}`);
writeRandomCheckpoint(dir, { hiddenSize: hidden, layers: 8, heads: 8, kvHeads: 8, intermediateSize: Math.round((hidden * 11) / 4 / 64) * 64, vocabSize: 4096, maxPositions: 256, seed: 4 });
const base = readHfConfig(dir);
const prompt = (n: number) => benchPrompt(n, 0, base.vocabSize);

/** Bytes of the plan's tensors as stored on the device. */
function deviceBytes(plan: Plan): number {
  return plan.tensors.reduce((n, t) => n + (t.shape[0] ?? 1) * storageRowWords(t.gpuDtype, t.shape.slice(1).reduce((a, b) => a * b, 1)) * 4, 0);
}

function relativeError(got: readonly Float32Array[], want: readonly Float64Array[]): number {
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => row.forEach((w, i) => ((diff += (got[r]![i]! - w) ** 2), (norm += w * w))));
  return Math.sqrt(diff / norm);
}

const gpu = await acquireDevice();
console.log(`device: ${adapterSummary(gpu.report)}`);
console.log(`model: hidden ${hidden}, ${base.layers} layers, ${base.heads} heads, intermediate ${base.intermediateSize}, vocab ${base.vocabSize}, F32 checkpoint`);
console.log(`decode: ${DECODE} tokens after a ${DECODE_PROMPT}-token prompt; prefill: ${PREFILL} tokens; 1 sequence, greedy; best of ${REPEATS}`);

const engines = new Map<WeightFormat, Engine>();
for (const weights of FORMATS) engines.set(weights, await Engine.load(plannedEngine({ base, checkpointDir: dir, gpu, ctx: 256, maxSequences: 1, maxAdapters: 0, weights })));
const decodeMs = new Map<WeightFormat, number>();
const prefillTokensPerS = new Map<WeightFormat, number>();
const streamMs = new Map<WeightFormat, number>();
const error = new Map<WeightFormat, number>();
try {
  const { weights } = loadReferenceWeights(dir);
  const exact = referenceLogits(base, weights, prompt(ACCURACY_PROMPT));
  for (const [format, engine] of engines) {
    await engine.generate({ prompt: prompt(PREFILL), maxTokens: 2 }); // first use of every pipeline
    error.set(format, relativeError((await engine.generate({ prompt: prompt(ACCURACY_PROMPT), maxTokens: 0, logits: "all" })).logits!, exact));
  }
  for (let r = 0; r < REPEATS; r++) {
    for (const [format, engine] of engines) {
      const decode = (await engine.generate({ prompt: prompt(DECODE_PROMPT), maxTokens: DECODE + 1 })).timings;
      decodeMs.set(format, Math.min(decodeMs.get(format) ?? Infinity, figuresOf(decode, 1).decodeMsPerToken));
      const prefill = (await engine.generate({ prompt: prompt(PREFILL), maxTokens: 0 })).timings;
      prefillTokensPerS.set(format, Math.max(prefillTokensPerS.get(format) ?? 0, figuresOf(prefill, 1).prefillTokensPerS));
      streamMs.set(format, Math.min(streamMs.get(format) ?? Infinity, await streamOnceMs(gpu, engine.plan as PlannedPlan, dir, 3)));
    }
  }
  console.log("");
  console.log("weights  device MiB  decode ms/tok  vs f32  matvecs alone ms  vs f32  prefill tok/s  vs f32  logit error vs float64 (f32 weights)");
  const f32 = { decode: decodeMs.get("f32")!, prefill: prefillTokensPerS.get("f32")!, stream: streamMs.get("f32")! };
  for (const [format, engine] of engines) {
    const d = decodeMs.get(format)!;
    const p = prefillTokensPerS.get(format)!;
    const m = streamMs.get(format)!;
    console.log(
      `${format.padEnd(7)}  ${(deviceBytes(engine.plan) / 2 ** 20).toFixed(1).padStart(10)}  ${d.toFixed(1).padStart(13)}  ${(d / f32.decode).toFixed(2).padStart(5)}x  ` +
        `${m.toFixed(1).padStart(16)}  ${(m / f32.stream).toFixed(2).padStart(5)}x  ` +
        `${p.toFixed(1).padStart(13)}  ${(p / f32.prefill).toFixed(2).padStart(5)}x  ${error.get(format)!.toExponential(2)}`,
    );
  }
} finally {
  for (const engine of engines.values()) engine.destroy();
  gpu.destroy();
}
