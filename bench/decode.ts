// End-to-end speed: prefill tokens/s and decode ms/token of the engine on random checkpoints, against
// the time the matvec kernels alone take to stream every weight once (the floor of a decode step).
//   node --import tsx bench/decode.ts            (models are written once under .cache/bench/)
import { join } from "node:path";
import { readHfConfig } from "../compiler/hf-config.ts";
import type { Plan } from "../compiler/plan.ts";
import { writeRandomCheckpoint, type RandomCheckpointOptions } from "../examples/random-checkpoint.ts";
import { acquireDevice, adapterSummary, type GpuContext } from "../runtime/gpu/device.ts";
import { Engine } from "../runtime/engine/engine.ts";
import { plannedEngine } from "../bin/engine-plan.ts";
import { benchPrompt, figuresOf } from "../bin/measure/generation.ts";
import { RANDOM_SIZES } from "../bin/measure/random-model.ts";
import { streamOnceMs } from "./stream-once.ts";

const MODELS: Record<string, RandomCheckpointOptions> = {
  tiny: RANDOM_SIZES.tiny,
  mid: { hiddenSize: 768, layers: 8, heads: 12, kvHeads: 4, intermediateSize: 2048, vocabSize: 8192, maxPositions: 512, seed: 2 },
};
const PREFILL_TOKENS = 128;
const DECODE_PROMPT = 16;
const DECODE_TOKENS = 32;

interface Row {
  model: string;
  weightsMiB: number;
  prefillTokensPerS: number;
  decodeMsPerToken: number;
  streamOnceMs: number;
}

async function measure(gpu: GpuContext, name: string, options: RandomCheckpointOptions): Promise<Row> {
  const dir = join(".cache", "bench", name);
  writeRandomCheckpoint(dir, options);
  const base = readHfConfig(dir);
  const engine = await Engine.load(plannedEngine({ base, checkpointDir: dir, gpu, ctx: Math.min(base.maxPositions, 256), maxSequences: 1 }));
  const prompt = (n: number) => benchPrompt(n, 0, base.vocabSize);
  try {
    await engine.generate({ prompt: prompt(PREFILL_TOKENS), maxTokens: 2 }); // first use of every path
    const prefill = await engine.generate({ prompt: prompt(PREFILL_TOKENS), maxTokens: 0 });
    const decode = await engine.generate({ prompt: prompt(DECODE_PROMPT), maxTokens: DECODE_TOKENS + 1 });
    const stream = await streamOnceMs(gpu, engine.plan as Plan, dir);
    return {
      model: `${name} (hidden ${base.hiddenSize}, ${base.layers} layers, vocab ${base.vocabSize})`,
      weightsMiB: engine.plan.tensors.reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 4), 0) / 2 ** 20,
      prefillTokensPerS: figuresOf(prefill.timings, 1).prefillTokensPerS,
      decodeMsPerToken: figuresOf(decode.timings, 1).decodeMsPerToken,
      streamOnceMs: stream,
    };
  } finally {
    engine.destroy();
  }
}

const gpu = await acquireDevice();
console.log(`device: ${adapterSummary(gpu.report)}`);
console.log(`prefill: ${PREFILL_TOKENS}-token prompt; decode: ${DECODE_TOKENS} tokens after a ${DECODE_PROMPT}-token prompt, 1 sequence`);
const rows: Row[] = [];
for (const [name, options] of Object.entries(MODELS)) rows.push(await measure(gpu, name, options));
console.log("");
console.log("model                                          weights MiB  prefill tok/s  decode ms/tok  stream-once ms  decode/stream");
for (const r of rows) {
  console.log(
    `${r.model.padEnd(46)} ${r.weightsMiB.toFixed(1).padStart(11)}  ${r.prefillTokensPerS.toFixed(1).padStart(13)}  ` +
      `${r.decodeMsPerToken.toFixed(2).padStart(13)}  ${r.streamOnceMs.toFixed(2).padStart(14)}  ${(r.decodeMsPerToken / r.streamOnceMs).toFixed(2).padStart(13)}`,
  );
}
gpu.destroy();
