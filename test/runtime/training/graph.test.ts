// One training step on the device (forward, fused cross-entropy, backward) against the float64
// reference of test/reference/train.ts: the loss and the gradient of every LoRA tensor, for plain LoRA
// on every module of a GQA model, with sequences of different lengths packed in one batch, without and
// with LoRA dropout, and on a base with llama3 rope scaling (positions past its original context).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { ROUTER_DEFAULTS } from "../../../compiler/defaults.ts";
import { EXPERT_MODULES, type Adapter, type RouterConfig } from "../../../compiler/model.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { planBase } from "../../../compiler/plan.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import type { RandomCheckpointOptions } from "../../../examples/random-checkpoint.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { untrainable } from "../../../runtime/training/graph.ts";
import type { TrainTensor } from "../../../runtime/training/params.ts";
import { referenceTrainLoss, type ReferenceRouter, type ReferenceRouting } from "../../reference/train.ts";
import { referenceLora } from "./reference-adapters.ts";
import { STEP_BATCH, deviceDropout, gradError, stepOnDevice, tinyModel } from "./step-check.ts";

// f32 forward and backward through 2 layers against float64: gradients within 1e-5 relative (L2 over
// each tensor; measured 3e-7 to 8e-7), the loss within 1e-5 relative, the project's usual f32 bound.
const GRAD_BOUND = 1e-5;
const LOSS_BOUND = 1e-5;
const DROPOUT_SEED = 77;

const root = mkdtempSync(join(tmpdir(), "milora-train-graph-"));
/** A random checkpoint (the tiny model, seed 21, unless `options` say otherwise), its base and its float64 weights. */
const model = (name: string, options: Partial<RandomCheckpointOptions> = {}) => tinyModel(join(root, name), { seed: 21, ...options });
const tiny = model("tiny");
const gpu = await acquireDevice();
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

async function checkStep(dropout: number, what: string, router?: Partial<RouterConfig>, on = tiny): Promise<void> {
  const { base, reference } = on;
  const plain = peftSpec({ base, modules: EXPERT_MODULES, rank: 4, alpha: 8, seed: 1 });
  const config: RouterConfig | undefined = router && { ...ROUTER_DEFAULTS, noise: false, balance: 0.01, ...router };
  const spec: Adapter = { ...plain, experts: plain.experts.map((e) => ({ ...e, dropout })), ...(config ? { router: config } : {}) };
  // B random (not PEFT's zero) so that A's gradient is not zero as well; routers random too.
  const adapter = randomAdapter({ spec, seed: 5 });
  const routedLayers = adapter.router?.size ?? 0;
  const run = { dropoutSeed: DROPOUT_SEED, balanceCoef: config ? config.balance / routedLayers : 0 };
  await stepOnDevice(gpu.device, on, adapter, STEP_BATCH, { plan: { maxLoraRank: 4 }, maxRows: 32, run }, async ({ lossSum, balanceLoss, supervised, params }) => {
    const want = referenceTrainLoss(base, reference.weights, {
      lora: referenceLora(adapter),
      balance: config?.balance ?? 0,
      ...deviceDropout(base, STEP_BATCH, DROPOUT_SEED, dropout),
      ...(config && adapter.router ? referenceRouters(config, adapter) : {}),
    }, STEP_BATCH);
    assert.is(supervised, want.supervised);
    const loss = lossSum / supervised;
    assert.ok(Math.abs(loss - want.lmLoss) / want.lmLoss < LOSS_BOUND, `${what}: loss ${loss} vs ${want.lmLoss}`);
    if (config) assert.ok(Math.abs(balanceLoss - want.balanceLoss) / want.balanceLoss < LOSS_BOUND, `${what}: balance loss ${balanceLoss} vs ${want.balanceLoss}`);
    for (const r of params.routers.values()) {
      const g = want.routers.get(r.layer)!;
      const tensors: [string, TrainTensor, Float64Array][] = [[`router ${r.layer} W_r`, r.gate, g.gate]];
      if (r.pooler) tensors.push([`router ${r.layer} w_sa`, r.pooler, g.pooler!]);
      if (r.rational) tensors.push([`router ${r.layer} rational`, r.rational, Float64Array.from([...g.numerator!, ...g.denominator!])]);
      for (const [name, tensor, wanted] of tensors) {
        const err = await gradError(gpu.device, tensor, wanted);
        assert.ok(err < GRAD_BOUND, `${what} ${name}: ${err.toExponential(2)}`);
      }
    }
    for (const l of params.lora) {
      const key = `${l.layer}.${l.module}`;
      const errA = await gradError(gpu.device, l.a, want.lora.get(key)!.a);
      const errB = await gradError(gpu.device, l.b, want.lora.get(key)!.b);
      assert.ok(errA < GRAD_BOUND && errB < GRAD_BOUND, `${what} ${key}: lora_A ${errA.toExponential(2)}, lora_B ${errB.toExponential(2)}`);
    }
  });
}

test("plain LoRA on every module: loss and every lora_A and lora_B gradient match the float64 reference", async () => {
  await checkStep(0, "no dropout");
});

/** The reference's view of a routed adapter: its router tensors in float64 and the routing settings. */
function referenceRouters(config: RouterConfig, adapter: LoadedAdapter) {
  const sel = config.selection;
  const routing: ReferenceRouting = {
    pooling: config.pooling,
    activation: config.activation,
    selection: sel.rule === "top_k" ? { rule: "top_k", k: sel.k } : sel.rule === "threshold" ? { rule: "threshold", threshold: sel.threshold } : { rule: "dense" },
    renormalize: sel.rule !== "dense" && sel.renormalize,
    when: config.when,
  };
  const routers = new Map(
    [...adapter.router!].map(([layer, r]): [number, ReferenceRouter] => [
      layer,
      {
        experts: r.experts,
        gate: Float64Array.from(r.gate),
        ...(r.pooler ? { pooler: Float64Array.from(r.pooler) } : {}),
        ...(r.rational ? { rational: { numerator: Float64Array.from(r.rational.numerator), denominator: Float64Array.from(r.rational.denominator) } } : {}),
      },
    ]),
  );
  return { routing, routers };
}

test("MiLoRA as in the paper (self-attention pooler, rational activation, top-2 probabilities, balance loss): every LoRA and router gradient", async () => {
  await checkStep(0, "paper", { pooling: "attention", activation: "rational", rational: { numerator: 6, denominator: 5 }, selection: { rule: "top_k", k: 2, renormalize: false } });
});

test("MiLoRA with renormalised top-3 and mean pooling with GELU; threshold with max pooling; the per-token baseline", async () => {
  await checkStep(0, "renormalised", { pooling: "mean", activation: "gelu", selection: { rule: "top_k", k: 3, renormalize: true } });
  await checkStep(0, "threshold", { pooling: "max", activation: "relu", selection: { rule: "threshold", threshold: 0.15, renormalize: false } });
  await checkStep(0, "token", { when: "token", activation: "gelu", selection: { rule: "top_k", k: 2, renormalize: false } });
});

test("with LoRA dropout 0.3 (PEFT's, on the LoRA input, a mask per module) the same holds", async () => {
  await checkStep(0.3, "dropout 0.3");
});

test("llama3 rope scaling (original context 4, so the 11-token example passes it): forward and backward rotate by its frequencies", async () => {
  // Head size 8, rope_theta 100: wavelengths 2 pi 100^(i/4) = 6.3, 19.9, 62.8, 199 against 4 / 0.5 and
  // 4 / 0.1: one pair kept, one blended, two divided by factor.
  const scaled = model("llama3", { ropeTheta: 100, ropeScaling: { type: "llama3", factor: 8, lowFreqFactor: 0.1, highFreqFactor: 0.5, originalMaxPositions: 4 } });
  await checkStep(0, "llama3", { pooling: "mean", selection: { rule: "top_k", k: 2, renormalize: false } }, scaled);
});

test("dynamic rope scaling is named as what training does not implement", () => {
  const dynamic = model("dynamic", { maxPositions: 16, ropeScaling: { type: "dynamic", factor: 2, originalMaxPositions: 16 } });
  assert.equal(untrainable(planBase(dynamic.base), 10), ["dynamic rope scaling (linear and llama3 train)"]);
});

test.run();
