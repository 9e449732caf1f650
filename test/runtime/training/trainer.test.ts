// The training loop against float64: three SGD and three AdamW steps (clipped) give the parameters the
// reference gives after the same steps; an interrupted run resumed from its checkpoint ends where the
// uninterrupted one does, bit for bit.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { planBase } from "../../../compiler/plan.ts";
import { trainKernelResolver } from "../../../compiler/train-kernels.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { openCheckpoint } from "../../../runtime/formats/checkpoint.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { IGNORE_INDEX as I, type TrainExample } from "../../../runtime/training/data.ts";
import { OPTIMIZER_DEFAULTS, type OptimizerSettings } from "../../../runtime/training/optimizer.ts";
import { Trainer, checkpointAdapter, type TrainSettings } from "../../../runtime/training/trainer.ts";
import { uploadWeights } from "../../../runtime/engine/weights.ts";
import { loadReferenceWeights } from "../../reference/llama.ts";
import { referenceTrainLoss, type ReferenceLora } from "../../reference/train.ts";

const root = mkdtempSync(join(tmpdir(), "milora-trainer-"));
const dir = join(root, "tiny");
writeRandomCheckpoint(dir, { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 61, maxPositions: 64, seed: 8 });
const base = readHfConfig(dir);
const reference = loadReferenceWeights(dir);
const gpu = await acquireDevice();
const plan = planBase(base, { maxLoraRank: 4 });
const checkpoint = openCheckpoint(dir);
const weights = await uploadWeights(gpu.device, checkpoint, plan, plan.maxBindingBytes);
checkpoint.close();
test.after(() => {
  weights.destroy();
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

const data: TrainExample[] = [
  { tokens: [3, 14, 15, 9, 26, 5], labels: [I, I, I, 9, 26, 5], source: "a" },
  { tokens: [8, 9, 7, 9, 3, 2, 38], labels: [I, I, 7, 9, 3, 2, 38], source: "b" },
  { tokens: [2, 7, 18, 28, 18], labels: [I, 7, 18, 28, 18], source: "c" },
];

const settings = (optimizer: Partial<OptimizerSettings>, over: Partial<TrainSettings> = {}): TrainSettings => ({
  epochs: 1,
  steps: 3,
  batchSize: 3,
  gradAccum: 1,
  lr: 0.01,
  schedule: "constant",
  warmup: 0,
  optimizer: { ...OPTIMIZER_DEFAULTS, ...optimizer },
  maxLength: 64,
  seed: 1,
  shuffle: false,
  evalEvery: 0,
  patience: 0,
  saveEvery: 0,
  activationLr: 1e-6,
  ...over,
});

function start(dropout = 0): LoadedAdapter {
  const spec = peftSpec({ base, modules: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], rank: 4, alpha: 8, seed: 1 });
  return randomAdapter({ spec: { ...spec, experts: spec.experts.map((e) => ({ ...e, dropout })) }, seed: 9 });
}

/** The float64 parameters after `steps` steps of the same optimizer on the whole data set each step. */
function referenceSteps(adapter: LoadedAdapter, s: TrainSettings): Map<string, { a: Float64Array; b: Float64Array }> {
  const params = new Map([...adapter.lora].map(([key, w]) => [key, { a: Float64Array.from(w.a), b: Float64Array.from(w.b), rank: w.rank, scaling: w.scaling }]));
  const moments = new Map([...params.keys()].map((k) => [k, { ma: new Float64Array(params.get(k)!.a.length), va: new Float64Array(params.get(k)!.a.length), mb: new Float64Array(params.get(k)!.b.length), vb: new Float64Array(params.get(k)!.b.length) }]));
  const o = s.optimizer;
  for (let t = 1; t <= s.steps!; t++) {
    const grads = referenceTrainLoss(base, reference.weights, { lora: params as Map<string, ReferenceLora>, balance: 0 }, data).lora;
    let sq = 0;
    for (const g of grads.values()) for (const x of [...g.a, ...g.b]) sq += x * x;
    const clip = o.maxGradNorm > 0 ? Math.min(1, o.maxGradNorm / (Math.sqrt(sq) + 1e-6)) : 1;
    for (const [key, p] of params) {
      const g = grads.get(key)!;
      const m = moments.get(key)!;
      for (const [values, grad, mm, vv] of [[p.a, g.a, m.ma, m.va], [p.b, g.b, m.mb, m.vb]] as const) {
        for (let i = 0; i < values.length; i++) {
          const gi = grad[i]! * clip;
          if (o.kind === "sgd") {
            values[i] = values[i]! - s.lr * gi;
            continue;
          }
          values[i] = values[i]! * (1 - s.lr * o.weightDecay);
          mm[i] = o.beta1 * mm[i]! + (1 - o.beta1) * gi;
          vv[i] = o.beta2 * vv[i]! + (1 - o.beta2) * gi * gi;
          const mHat = mm[i]! / (1 - o.beta1 ** t);
          const vHat = vv[i]! / (1 - o.beta2 ** t);
          values[i] = values[i]! - (s.lr * mHat) / (Math.sqrt(vHat) + o.eps);
        }
      }
    }
  }
  return params;
}

async function checkSteps(optimizer: Partial<OptimizerSettings>, what: string): Promise<void> {
  const adapter = start();
  const s = settings(optimizer);
  const trainer = new Trainer({ device: gpu.device, plan, weights, adapter, kernel: trainKernelResolver(), settings: s, train: data, out: join(root, what) });
  for (let i = 0; i < 3; i++) await trainer.trainStep();
  const got = await trainer.weights();
  trainer.destroy();
  const want = referenceSteps(adapter, s);
  for (const [key, w] of want) {
    const g = got.lora.get(key as `${number}.q_proj`)!;
    const before = adapter.lora.get(key as `${number}.q_proj`)!;
    for (const [name, gv, wv, bv] of [["lora_A", g.a, w.a, before.a], ["lora_B", g.b, w.b, before.b]] as const) {
      // Measured against the size of the update, not of the weights: the steps themselves must agree.
      let diff = 0;
      let moved = 0;
      for (let i = 0; i < wv.length; i++) {
        diff += (gv[i]! - wv[i]!) ** 2;
        moved += (wv[i]! - bv[i]!) ** 2;
      }
      const error = Math.sqrt(diff / moved);
      assert.ok(moved > 0 && error < 1e-4, `${what} ${key} ${name}: ${error.toExponential(2)} of the update`);
    }
  }
}

test("three SGD steps give the float64 reference's parameters", async () => {
  await checkSteps({ kind: "sgd", maxGradNorm: 0 }, "sgd");
});

test("three AdamW steps with weight decay and clipping to norm 0.05 give the float64 reference's parameters", async () => {
  await checkSteps({ kind: "adamw", weightDecay: 0.1, maxGradNorm: 0.05 }, "adamw");
});

test("an interrupted run resumed from its checkpoint ends with the uninterrupted run's weights, bit for bit", async () => {
  const s = settings({ kind: "adamw" }, { steps: 6, batchSize: 1, gradAccum: 2, shuffle: true, schedule: "linear", warmup: 2 });
  const run = async (out: string, adapter: LoadedAdapter, stopAt?: number, resume?: string) => {
    const trainer = new Trainer({ device: gpu.device, plan, weights, adapter, kernel: trainKernelResolver(), settings: s, train: data, out });
    if (resume) trainer.restore(resume);
    const abort = new AbortController();
    const summary = await trainer.run(abort.signal, { onStep: (m) => m.step === stopAt && abort.abort() });
    const result = await trainer.weights();
    trainer.destroy();
    return { summary, result };
  };
  const whole = await run(join(root, "whole"), start(0.3));
  const cut = await run(join(root, "cut"), start(0.3), 3);
  assert.ok(cut.summary.interrupted && cut.summary.steps === 3);
  const resumed = await run(join(root, "cut"), checkpointAdapter(join(root, "cut"), start(0.3)), undefined, join(root, "cut"));
  assert.is(resumed.summary.steps, 6);
  for (const [key, w] of whole.result.lora) {
    const r = resumed.result.lora.get(key)!;
    assert.equal(Array.from(r.a), Array.from(w.a), `${key} lora_A`);
    assert.equal(Array.from(r.b), Array.from(w.b), `${key} lora_B`);
  }
});

test.run();
