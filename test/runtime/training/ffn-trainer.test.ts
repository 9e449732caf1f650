// The training loop on a per_ffn (MixLoRA) adapter against float64, as moe-trainer.test.ts does for
// per_module: three SGD and three clipped AdamW steps (with the balance loss) give the parameters,
// lora_A, lora_B (the MLP modules' experts stacked) and every layer's router, that the reference gives
// after the same steps; a fresh adapter's experts and routers are drawn as documented; an interrupted
// run resumed from its checkpoint (MoE-PEFT's MixLoRA layout) ends where the uninterrupted one does, bit
// for bit (the routers' moments are saved and restored too).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { FFN_MODULES, type ExpertModule } from "../../../compiler/model.ts";
import { planBase } from "../../../compiler/plan.ts";
import { trainKernelResolver } from "../../../compiler/train-kernels.ts";
import { randomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { moeRouterKey, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { openCheckpoint } from "../../../runtime/formats/checkpoint.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { uploadWeights } from "../../../runtime/engine/weights.ts";
import { IGNORE_INDEX as I, type TrainExample } from "../../../runtime/training/data.ts";
import { OPTIMIZER_DEFAULTS, type OptimizerSettings } from "../../../runtime/training/optimizer.ts";
import { MOE_ROUTER_INIT_STD, initialAdapter } from "../../../runtime/training/params.ts";
import { Trainer, checkpointAdapter, type TrainSettings } from "../../../runtime/training/trainer.ts";
import { loadReferenceWeights } from "../../reference/llama.ts";
import { referenceTrainLoss, type ReferenceLora } from "../../reference/train.ts";
import { ffnSpec, referenceFfnAdapter } from "./ffn-common.ts";
import { closestCall, topK } from "./moe-common.ts";

const root = mkdtempSync(join(tmpdir(), "milora-ffn-trainer-"));
const dir = join(root, "tiny");
writeRandomCheckpoint(dir, { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 61, maxPositions: 64, seed: 8 });
const base = readHfConfig(dir);
const reference = loadReferenceWeights(dir);
const gpu = await acquireDevice();
const plan = planBase(base, { maxLoraRank: 8 });
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

const spec = ffnSpec({ base, modules: ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], rank: 4, experts: 4, selection: topK(2, true), balance: 0.1 });
const start = (dropout = 0): LoadedAdapter => randomAdapter({ spec: { ...spec, experts: spec.experts.map((e) => ({ ...e, dropout })) }, seed: 9 });

/** The float64 parameters (by name) after the steps of the same optimizer on the whole data set each step. */
function referenceSteps(adapter: LoadedAdapter, s: TrainSettings): { params: Map<string, Float64Array>; closest: number } {
  const view = referenceFfnAdapter(adapter);
  const lora = view.lora as Map<string, ReferenceLora>;
  const params = new Map<string, Float64Array>();
  for (const [key, l] of lora) params.set(`${key}.a`, l.a).set(`${key}.b`, l.b);
  for (const [key, w] of view.moe!.routers) params.set(`${key}.router`, w);
  const moments = new Map([...params].map(([k, p]) => [k, { m: new Float64Array(p.length), v: new Float64Array(p.length) }]));
  const o = s.optimizer;
  let closest = Infinity;
  for (let t = 1; t <= s.steps!; t++) {
    const result = referenceTrainLoss(base, reference.weights, view, data);
    closest = Math.min(closest, closestCall(result.moeDecisions));
    const grads = new Map<string, Float64Array>();
    for (const [key, g] of result.lora) grads.set(`${key}.a`, g.a).set(`${key}.b`, g.b);
    for (const [key, g] of result.moeRouters) grads.set(`${key}.router`, g);
    let sq = 0;
    for (const g of grads.values()) for (const x of g) sq += x * x;
    const clip = o.maxGradNorm > 0 ? Math.min(1, o.maxGradNorm / (Math.sqrt(sq) + 1e-6)) : 1;
    for (const [name, values] of params) {
      const grad = grads.get(name)!;
      const { m, v } = moments.get(name)!;
      for (let i = 0; i < values.length; i++) {
        const gi = grad[i]! * clip;
        if (o.kind === "sgd") {
          values[i] = values[i]! - s.lr * gi;
          continue;
        }
        values[i] = values[i]! * (1 - s.lr * o.weightDecay);
        m[i] = o.beta1 * m[i]! + (1 - o.beta1) * gi;
        v[i] = o.beta2 * v[i]! + (1 - o.beta2) * gi * gi;
        values[i] = values[i]! - (s.lr * (m[i]! / (1 - o.beta1 ** t))) / (Math.sqrt(v[i]! / (1 - o.beta2 ** t)) + o.eps);
      }
    }
  }
  return { params, closest };
}

async function checkSteps(optimizer: Partial<OptimizerSettings>, what: string): Promise<void> {
  const adapter = start();
  const s = settings(optimizer);
  const trainer = new Trainer({ device: gpu.device, plan, weights, adapter, kernel: trainKernelResolver(), settings: s, train: data, out: join(root, what) });
  const metrics = [];
  for (let i = 0; i < 3; i++) metrics.push(await trainer.trainStep());
  const got = await trainer.weights();
  trainer.destroy();
  for (const m of metrics) assert.ok(m.balance_loss > 0 && Math.abs(m.loss - m.lm_loss - 0.1 * m.balance_loss) < 1e-6, `${what} step ${m.step}: loss = lm_loss + 0.1 balance_loss`);
  const { params: want, closest } = referenceSteps(adapter, s);
  // Every step's routing is clear of f32 rounding, so the device routes as the reference does.
  assert.ok(closest > 1e-4, `${what}: the reference's closest routing call ${closest}`);
  let worst = 0;
  let worstRouter = 0;
  for (const [name, w] of want) {
    const [layer, at, part] = name.split(".") as [string, ExpertModule | "ffn", "a" | "b" | "router"];
    const gv = part === "router" ? got.moeRouters!.get(moeRouterKey(Number(layer), at))! : got.lora.get(`${Number(layer)}.${at as ExpertModule}`)![part];
    const before = part === "router" ? adapter.moeRouters!.get(moeRouterKey(Number(layer), at))! : adapter.lora.get(`${Number(layer)}.${at as ExpertModule}`)![part];
    // Measured against the size of the update, not of the weights: the steps themselves must agree, to
    // 1e-4 of the update, or to the f32 rounding of the weights the steps are added to (half an ulp a
    // step: the routers' SGD steps, about 1e-4 of their weights, are that small).
    let diff = 0;
    let moved = 0;
    let size = 0;
    for (let i = 0; i < w.length; i++) {
      diff += (gv[i]! - w[i]!) ** 2;
      moved += (w[i]! - before[i]!) ** 2;
      size += w[i]! ** 2;
    }
    const error = Math.sqrt(diff / moved);
    const storage = (s.steps! * 2 ** -24 * Math.sqrt(size)) / Math.sqrt(moved);
    if (part === "router") worstRouter = Math.max(worstRouter, error / Math.max(1e-4, storage));
    else worst = Math.max(worst, error);
    assert.ok(moved > 0 && error < Math.max(1e-4, storage), `${what} ${name}: ${error.toExponential(2)} of the update (f32 storage of the weights: ${storage.toExponential(2)})`);
  }
  console.log(`${what}: worst LoRA error ${worst.toExponential(1)} of the update; worst router error ${worstRouter.toFixed(2)} of its bound (1e-4 of the update or the f32 storage of the weights)`);
}

test("three SGD steps of a per_ffn adapter (top_k 2 of 4 renormalised, balance 0.1, gate_proj and down_proj experts) give the float64 reference's parameters, routers included", async () => {
  await checkSteps({ kind: "sgd", maxGradNorm: 0 }, "sgd");
});

// eps 1e-6 rather than 1e-8: AdamW's first step on an element is about lr * g / (|g| + eps), so with
// eps 1e-8 an element whose gradient is within f32 rounding of zero (with these weights layer 1
// gate_proj's expert 3 has one at 8.8e-8, 7e-7 of its slice's norm) takes a step of about lr decided by
// that rounding; the comparison would then measure f32 noise, not the step.
test("three AdamW steps (eps 1e-6) with weight decay and clipping to norm 0.05 give the float64 reference's parameters, routers included", async () => {
  await checkSteps({ kind: "adamw", weightDecay: 0.1, maxGradNorm: 0.05, eps: 1e-6 }, "adamw");
});

test("a fresh per_ffn adapter: PEFT's LoRA init per expert (stacked), B = 0, a router per layer from N(0, 0.02^2)", () => {
  const fresh = initialAdapter(spec, 3);
  for (const e of spec.experts) {
    const w = fresh.lora.get(`${e.layer}.${e.module}`)!;
    const rank = FFN_MODULES.includes(e.module) ? 4 * e.rank : e.rank;
    assert.is(w.rank, rank, `${e.layer}.${e.module}: rank`);
    assert.is(w.a.length, rank * e.inFeatures);
    const bound = 1 / Math.sqrt(e.inFeatures);
    assert.ok(w.a.every((v) => Math.abs(v) <= bound) && w.a.some((v) => Math.abs(v) > 0.9 * bound), `${e.layer}.${e.module}: A from U(-1/sqrt(in), 1/sqrt(in))`);
    assert.ok(w.b.length === e.outFeatures * rank && w.b.every((v) => v === 0), `${e.layer}.${e.module}: B = 0`);
  }
  assert.equal([...fresh.moeRouters!.keys()], ["0.ffn", "1.ffn"]);
  const all = [...fresh.moeRouters!.values()].flatMap((w) => {
    assert.is(w.length, 4 * base.hiddenSize);
    return Array.from(w);
  });
  const mean = all.reduce((a, b) => a + b, 0) / all.length;
  const std = Math.sqrt(all.reduce((a, b) => a + (b - mean) ** 2, 0) / all.length);
  assert.ok(Math.abs(mean) < 0.004 && Math.abs(std - MOE_ROUTER_INIT_STD) < 0.002, `mean ${mean}, std ${std} of ${all.length} weights`);
});

test("an interrupted per_ffn run resumed from its checkpoint ends with the uninterrupted run's weights, bit for bit", async () => {
  const s = settings({ kind: "adamw" }, { steps: 4, batchSize: 1, gradAccum: 2, shuffle: true, schedule: "linear", warmup: 1 });
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
  const cut = await run(join(root, "cut"), start(0.3), 2);
  assert.ok(cut.summary.interrupted && cut.summary.steps === 2);
  const resumed = await run(join(root, "cut"), checkpointAdapter(join(root, "cut"), start(0.3)), undefined, join(root, "cut"));
  assert.is(resumed.summary.steps, 4);
  for (const [key, w] of whole.result.lora) {
    const r = resumed.result.lora.get(key)!;
    assert.equal(Array.from(r.a), Array.from(w.a), `${key} lora_A`);
    assert.equal(Array.from(r.b), Array.from(w.b), `${key} lora_B`);
  }
  for (const [key, w] of whole.result.moeRouters!) assert.equal(Array.from(resumed.result.moeRouters!.get(key)!), Array.from(w), `${key} router`);
  // The routers moved: they are trained, not carried.
  const before = start(0.3);
  for (const [key, w] of whole.result.moeRouters!) assert.not.equal(Array.from(w), Array.from(before.moeRouters!.get(key)!), `${key} router trained`);
});

test.run();
