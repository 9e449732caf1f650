// The training loop on the per-token baselines against float64, as trainer.test.ts does for LoRA, for a
// per_module (MOELoRA) and a per_ffn (MixLoRA) adapter: three SGD and three clipped AdamW steps (with the
// balance loss) give the parameters, lora_A, lora_B (per_ffn: the MLP modules' experts stacked) and every
// router (per module, or per layer), that the reference gives after the same steps; a fresh adapter's
// experts and routers are drawn as documented; an interrupted run resumed from its checkpoint (per_ffn:
// MoE-PEFT's MixLoRA layout) ends where the uninterrupted one does, bit for bit (the routers' moments are
// saved and restored too).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { FFN_MODULES, type ExpertModule } from "../../../compiler/model.ts";
import { randomAdapter } from "../../../examples/random-adapter.ts";
import { moeRouterKey, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import type { OptimizerSettings } from "../../../runtime/training/optimizer.ts";
import { MOE_ROUTER_INIT_STD, initialAdapter } from "../../../runtime/training/params.ts";
import { referenceTrainLoss } from "../../reference/train.ts";
import { closestCall, moeSpec, referenceMoeAdapter, topK } from "./reference-adapters.ts";
import { TRAIN_DATA, byName, checkResume, referenceSteps, trainSettings, trainerBed, updateError } from "./step-check.ts";

const bed = await trainerBed("moe-trainer", 8);
test.after(() => bed.close());
const { base, reference } = bed;

// top_k 2 of 4 renormalised, balance 0.1: per_module on up_proj and down_proj at rank 8 (four experts of
// rank 2), per_ffn with gate_proj and down_proj experts of rank 4.
const specs = {
  per_module: moeSpec({ placement: "per_module", base, modules: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], rank: 8, experts: 4, selection: topK(2, true), balance: 0.1 }),
  per_ffn: moeSpec({ placement: "per_ffn", base, modules: ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], rank: 4, experts: 4, selection: topK(2, true), balance: 0.1 }),
};
type Placement = keyof typeof specs;
const start = (placement: Placement, dropout = 0): LoadedAdapter => {
  const spec = specs[placement];
  return randomAdapter({ spec: { ...spec, experts: spec.experts.map((e) => ({ ...e, dropout })) }, seed: 9 });
};

async function checkSteps(placement: Placement, optimizer: Partial<OptimizerSettings>, what: string): Promise<void> {
  const adapter = start(placement);
  const s = trainSettings(optimizer);
  const trainer = bed.trainer(adapter, s, what);
  const metrics = [];
  for (let i = 0; i < 3; i++) metrics.push(await trainer.trainStep());
  const got = await trainer.weights();
  trainer.destroy();
  for (const m of metrics) assert.ok(m.balance_loss > 0 && Math.abs(m.loss - m.lm_loss - 0.1 * m.balance_loss) < 1e-6, `${what} step ${m.step}: loss = lm_loss + 0.1 balance_loss`);
  // The float64 parameters (by name) after the same steps on the whole data set each step.
  const view = referenceMoeAdapter(adapter);
  const want = byName(view.lora, view.moe!.routers);
  let closest = Infinity;
  referenceSteps(want, s, () => {
    const result = referenceTrainLoss(base, reference.weights, view, TRAIN_DATA);
    closest = Math.min(closest, closestCall(result.moeDecisions));
    return byName(result.lora, result.moeRouters);
  });
  // Every step's routing is clear of f32 rounding, so the device routes as the reference does.
  assert.ok(closest > 1e-4, `${what}: the reference's closest routing call ${closest}`);
  let worst = 0;
  let worstRouter = 0;
  for (const [name, w] of want) {
    const [layer, at, part] = name.split(".") as [string, ExpertModule | "ffn", "a" | "b" | "router"];
    const gv = part === "router" ? got.moeRouters!.get(moeRouterKey(Number(layer), at))! : got.lora.get(`${Number(layer)}.${at as ExpertModule}`)![part];
    const before = part === "router" ? adapter.moeRouters!.get(moeRouterKey(Number(layer), at))! : adapter.lora.get(`${Number(layer)}.${at as ExpertModule}`)![part];
    // To 1e-4 of the update, or to the f32 rounding of the weights the steps are added to (half an ulp a
    // step: the routers' SGD steps, about 1e-4 of their weights, are that small).
    const { error, moved, size } = updateError(gv, w, before);
    const storage = (s.steps! * 2 ** -24 * size) / Math.sqrt(moved);
    if (part === "router") worstRouter = Math.max(worstRouter, error / Math.max(1e-4, storage));
    else worst = Math.max(worst, error);
    assert.ok(moved > 0 && error < Math.max(1e-4, storage), `${what} ${name}: ${error.toExponential(2)} of the update (f32 storage of the weights: ${storage.toExponential(2)})`);
  }
  console.log(`${what}: worst LoRA error ${worst.toExponential(1)} of the update; worst router error ${worstRouter.toFixed(2)} of its bound (1e-4 of the update or the f32 storage of the weights)`);
}

/** An interrupted run of `placement` resumed from its checkpoint, against the uninterrupted run; the routers moved too. */
async function checkResumeMoe(placement: Placement): Promise<void> {
  const s = trainSettings({ kind: "adamw" }, { steps: 4, batchSize: 1, gradAccum: 2, shuffle: true, schedule: "linear", warmup: 1 });
  const whole = await checkResume(bed, placement, s, () => start(placement, 0.3), 2);
  // The routers moved: they are trained, not carried.
  const before = start(placement, 0.3);
  for (const [key, w] of whole.moeRouters!) assert.not.equal(Array.from(w), Array.from(before.moeRouters!.get(key)!), `${key} router trained`);
}

/**
 * Routers drawn from N(0, 0.02^2): each of its expected length, and all their weights' mean within
 * `meanBound` of 0 and standard deviation within `stdBound` of MOE_ROUTER_INIT_STD.
 */
function checkRouterInit(routers: readonly (readonly [Float32Array, number])[], meanBound: number, stdBound: number): void {
  const all = routers.flatMap(([w, length]) => {
    assert.is(w.length, length);
    return Array.from(w);
  });
  const mean = all.reduce((a, b) => a + b, 0) / all.length;
  const std = Math.sqrt(all.reduce((a, b) => a + (b - mean) ** 2, 0) / all.length);
  assert.ok(Math.abs(mean) < meanBound && Math.abs(std - MOE_ROUTER_INIT_STD) < stdBound, `mean ${mean}, std ${std} of ${all.length} weights`);
}

// ---------------------------------------------------------------------------------------------------
// per_module

test("three SGD steps of a per_module adapter (top_k 2 of 4 renormalised, balance 0.1) give the float64 reference's parameters, routers included", async () => {
  await checkSteps("per_module", { kind: "sgd", maxGradNorm: 0 }, "per_module sgd");
});

test("three AdamW steps with weight decay and clipping to norm 0.05 give the float64 reference's parameters, routers included", async () => {
  await checkSteps("per_module", { kind: "adamw", weightDecay: 0.1, maxGradNorm: 0.05 }, "per_module adamw");
});

test("a fresh per_module adapter: PEFT's LoRA init, the same A as without routers, routers from N(0, 0.02^2)", () => {
  const spec = specs.per_module;
  const fresh = initialAdapter(spec, 3);
  const { moe: _, ...plainSpec } = spec;
  const plain = initialAdapter(plainSpec, 3);
  for (const [key, w] of fresh.lora) {
    assert.equal(Array.from(w.a), Array.from(plain.lora.get(key)!.a), `${key}: A as without routers`);
    assert.ok(w.b.every((v) => v === 0), `${key}: B = 0`);
  }
  checkRouterInit(spec.experts.map((e) => [fresh.moeRouters!.get(moeRouterKey(e.layer, e.module))!, 4 * e.inFeatures] as const), 0.002, 0.001);
});

test("an interrupted per_module run resumed from its checkpoint ends with the uninterrupted run's weights, bit for bit", async () => {
  await checkResumeMoe("per_module");
});

// ---------------------------------------------------------------------------------------------------
// per_ffn

test("three SGD steps of a per_ffn adapter (top_k 2 of 4 renormalised, balance 0.1, gate_proj and down_proj experts) give the float64 reference's parameters, routers included", async () => {
  await checkSteps("per_ffn", { kind: "sgd", maxGradNorm: 0 }, "per_ffn sgd");
});

// eps 1e-6 rather than 1e-8: AdamW's first step on an element is about lr * g / (|g| + eps), so with
// eps 1e-8 an element whose gradient is within f32 rounding of zero (with these weights layer 1
// gate_proj's expert 3 has one at 8.8e-8, 7e-7 of its slice's norm) takes a step of about lr decided by
// that rounding; the comparison would then measure f32 noise, not the step.
test("three AdamW steps (eps 1e-6) with weight decay and clipping to norm 0.05 give the float64 reference's parameters, routers included", async () => {
  await checkSteps("per_ffn", { kind: "adamw", weightDecay: 0.1, maxGradNorm: 0.05, eps: 1e-6 }, "per_ffn adamw");
});

test("a fresh per_ffn adapter: PEFT's LoRA init per expert (stacked), B = 0, a router per layer from N(0, 0.02^2)", () => {
  const spec = specs.per_ffn;
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
  checkRouterInit([...fresh.moeRouters!.values()].map((w) => [w, 4 * base.hiddenSize] as const), 0.004, 0.002);
});

test("an interrupted per_ffn run resumed from its checkpoint ends with the uninterrupted run's weights, bit for bit", async () => {
  await checkResumeMoe("per_ffn");
});

test.run();
