// Training speed: one optimizer step (forward, backward, update) against one forward pass of the same
// batch, for plain LoRA and MiLoRA (the paper's router: self-attention pooler, rational activation,
// top-2) on the bench model's shapes, with the device memory the trainer holds. Ratios from one run.
//   node --import tsx bench/train.ts [--hidden 512] [--layers 8] [--batch 4] [--length 128] [--repeats 3]
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { ROUTER_DEFAULTS } from "../compiler/defaults.ts";
import { readHfConfig } from "../compiler/hf-config.ts";
import { EXPERT_MODULES, type Adapter } from "../compiler/model.ts";
import { planBase } from "../compiler/plan.ts";
import { rationalInit } from "../compiler/rational.ts";
import { trainKernelResolver } from "../compiler/train-kernels.ts";
import { peftSpec } from "../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { openCheckpoint } from "../runtime/formats/checkpoint.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { uploadWeights } from "../runtime/engine/weights.ts";
import { IGNORE_INDEX, type TrainExample } from "../runtime/training/data.ts";
import { OPTIMIZER_DEFAULTS } from "../runtime/training/optimizer.ts";
import { initialAdapter } from "../runtime/training/params.ts";
import { Trainer, type TrainSettings } from "../runtime/training/trainer.ts";

const { values: args } = parseArgs({
  options: {
    hidden: { type: "string", default: "512" },
    layers: { type: "string", default: "8" },
    batch: { type: "string", default: "4" },
    length: { type: "string", default: "128" },
    repeats: { type: "string", default: "3" },
  },
});
const hidden = Number(args.hidden);
const layers = Number(args.layers);
const batch = Number(args.batch);
const length = Number(args.length);
const repeats = Number(args.repeats);

const root = mkdtempSync(join(tmpdir(), "milora-bench-train-"));
const dir = join(root, "model");
writeRandomCheckpoint(dir, { hiddenSize: hidden, layers, heads: hidden / 64, kvHeads: hidden / 64, intermediateSize: Math.round((hidden * 11) / 4 / 32) * 32, vocabSize: 4096, maxPositions: 256, seed: 1 });
const base = readHfConfig(dir);
const gpu = await acquireDevice();
const plan = planBase(base, { maxLoraRank: 8 });
const checkpoint = openCheckpoint(dir);
const weights = await uploadWeights(gpu.device, checkpoint, plan, plan.maxBindingBytes);
checkpoint.close();

// Prompt/answer pairs: a quarter of each sequence is the prompt the router reads.
const examples: TrainExample[] = Array.from({ length: batch }, (_, s) => {
  const tokens = Array.from({ length }, (_, t) => (s * 131 + t * 17) % 4096);
  return { tokens, labels: tokens.map((tok, t) => (t < length / 4 ? IGNORE_INDEX : tok)), source: `bench ${s}` };
});
const settings: TrainSettings = {
  epochs: 1, steps: repeats + 1, batchSize: batch, gradAccum: 1, lr: 1e-4, schedule: "constant", warmup: 0,
  optimizer: OPTIMIZER_DEFAULTS, maxLength: length, seed: 0, shuffle: false, evalEvery: 0, patience: 0, saveEvery: 0, activationLr: 0,
};

const plain = peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name: "lora" });
const routed: Adapter = {
  ...plain,
  name: "milora",
  router: { ...ROUTER_DEFAULTS, pooling: "attention", activation: "rational", rational: { numerator: 6, denominator: 5 }, noise: false, balance: 0.01 },
};
const mib = (b: number) => (b / 1024 / 1024).toFixed(1);
console.log(`device ${adapterSummary(gpu.report)}`);
console.log(`model hidden ${hidden}, ${layers} layers, vocab 4096; batch ${batch} x ${length} tokens; rank 8 on all 7 modules; base ${mib(weights.bytes)} MiB`);
console.log("| adapter | forward ms | training step ms | step / forward | tokens/s trained | activations MiB | parameters+grads+moments MiB |");
console.log("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
for (const spec of [plain, routed]) {
  const adapter = initialAdapter({ ...spec, experts: spec.experts.map((e) => ({ ...e, dropout: 0 })) }, 1, spec.router?.rational ? rationalInit(spec.router.rational) : undefined);
  const trainer = new Trainer({ device: gpu.device, plan, weights, adapter, kernel: trainKernelResolver(), settings, train: examples, out: join(root, spec.name) });
  await trainer.trainStep(); // compiles every pipeline
  await trainer.evalLoss(examples);
  let forward = 0;
  let step = 0;
  for (let i = 0; i < repeats; i++) {
    let t = performance.now();
    await trainer.evalLoss(examples);
    forward += performance.now() - t;
    t = performance.now();
    await trainer.trainStep();
    step += performance.now() - t;
  }
  forward /= repeats;
  step /= repeats;
  const { activations, parameters } = trainer.bytes;
  console.log(`| ${spec.name} | ${forward.toFixed(0)} | ${step.toFixed(0)} | ${(step / forward).toFixed(2)}x | ${((batch * length) / (step / 1000)).toFixed(0)} | ${mib(activations)} | ${mib(parameters)} |`);
  trainer.destroy();
}
weights.destroy();
gpu.destroy();
rmSync(root, { recursive: true, force: true });
