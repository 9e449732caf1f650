// One training step on the device (forward, fused cross-entropy, backward) against the float64
// reference of test/reference/train.ts: the loss and the gradient of every LoRA tensor, for plain LoRA
// on every module of a GQA model, with sequences of different lengths packed in one batch, without and
// with LoRA dropout, and on a base with llama3 rope scaling (positions past its original context).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { ROUTER_DEFAULTS } from "../../../compiler/defaults.ts";
import { EXPERT_MODULES, type Adapter, type ExpertModule, type RouterConfig } from "../../../compiler/model.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { pcg } from "../../../compiler/kernels/sampling.ts";
import { planBase } from "../../../compiler/plan.ts";
import { trainKernelResolver } from "../../../compiler/train-kernels.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint, type RandomCheckpointOptions } from "../../../examples/random-checkpoint.ts";
import { openCheckpoint } from "../../../runtime/formats/checkpoint.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { PipelineCache, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { IGNORE_INDEX as I } from "../../../runtime/training/data.ts";
import { TrainingGraph, packBatch, untrainable } from "../../../runtime/training/graph.ts";
import { TrainableParams } from "../../../runtime/training/params.ts";
import { uploadWeights } from "../../../runtime/engine/weights.ts";
import { loadReferenceWeights, moduleShape } from "../../reference/llama.ts";
import { referenceTrainLoss, type ReferenceLora, type ReferenceRouter, type ReferenceRouting } from "../../reference/train.ts";

// f32 forward and backward through 2 layers against float64: gradients within 1e-5 relative (L2 over
// each tensor; measured 3e-7 to 8e-7), the loss within 1e-5 relative, the project's usual f32 bound.
const GRAD_BOUND = 1e-5;
const LOSS_BOUND = 1e-5;

const root = mkdtempSync(join(tmpdir(), "milora-train-graph-"));
const TINY = { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 61, maxPositions: 64, seed: 21 } as const;

/** A random checkpoint, its base and its float64 weights. */
function model(name: string, options: Partial<RandomCheckpointOptions> = {}) {
  const dir = join(root, name);
  writeRandomCheckpoint(dir, { ...TINY, ...options });
  return { dir, base: readHfConfig(dir), reference: loadReferenceWeights(dir) };
}
const tiny = model("tiny");
const gpu = await acquireDevice();
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

const batch = [
  { tokens: [3, 14, 15, 9, 26, 5, 35], labels: [I, I, I, 9, 26, 5, 35] },
  { tokens: [8, 9, 7, 9, 3], labels: [I, I, 7, 9, 3] },
  { tokens: [2, 7, 18, 28, 18, 28, 45, 59, 60, 12, 1], labels: [I, 7, 18, 28, 18, 28, 45, 59, 60, 12, 1] },
];

function relative(got: Float32Array, want: Float64Array): number {
  let d = 0;
  let n = 0;
  for (let i = 0; i < want.length; i++) {
    d += (got[i]! - want[i]!) ** 2;
    n += want[i]! ** 2;
  }
  // A module no decision switched on has no gradient: then the kernel's must be zero too.
  return n === 0 ? Math.sqrt(d) : Math.sqrt(d / n);
}

async function checkStep(dropout: number, what: string, router?: Partial<RouterConfig>, on = tiny): Promise<void> {
  const { dir, base, reference } = on;
  const plain = peftSpec({ base, modules: EXPERT_MODULES, rank: 4, alpha: 8, seed: 1 });
  const config: RouterConfig | undefined = router && { ...ROUTER_DEFAULTS, noise: false, balance: 0.01, ...router };
  const spec: Adapter = { ...plain, experts: plain.experts.map((e) => ({ ...e, dropout })), ...(config ? { router: config } : {}) };
  // B random (not PEFT's zero) so that A's gradient is not zero as well; routers random too.
  const adapter = randomAdapter({ spec, seed: 5 });
  const plan = planBase(base, { maxLoraRank: 4 });
  const checkpoint = openCheckpoint(dir);
  const weights = await uploadWeights(gpu.device, checkpoint, plan, plan.maxBindingBytes);
  checkpoint.close();
  const params = new TrainableParams(gpu.device, adapter);
  const graph = new TrainingGraph({ device: gpu.device, plan, weights, params, kernel: trainKernelResolver(), pipelines: new PipelineCache(gpu.device), maxRows: 32 });
  const packed = packBatch(batch);
  const supervised = packed.supervisedRows.length;
  const dropoutSeed = 77;
  const routedLayers = adapter.router?.size ?? 0;
  const { lossSum, balanceLoss } = await graph.run(packed, 1 / supervised, { backward: true, dropoutSeed, balanceCoef: config ? config.balance / routedLayers : 0 });

  // The mask the graph draws: module stream from (seed, layer, module), element row * in + column.
  const offsets = batch.map((_, i) => batch.slice(0, i).reduce((n, e) => n + e.tokens.length, 0));
  const keeps = (layer: number, module: ExpertModule, example: number, position: number, column: number) => {
    const stream = pcg((pcg(dropoutSeed) ^ (layer * 8 + EXPERT_MODULES.indexOf(module) + 1)) >>> 0);
    return dropoutKeeps(dropout, stream, (offsets[example]! + position) * moduleShape(base, module)[1] + column);
  };
  const want = referenceTrainLoss(base, reference.weights, {
    lora: new Map(
      [...adapter.lora].map(([key, w]): [string, ReferenceLora] => [key, { a: Float64Array.from(w.a), b: Float64Array.from(w.b), rank: w.rank, scaling: w.scaling }]),
    ),
    balance: config?.balance ?? 0,
    ...(dropout > 0 ? { dropout: { p: dropout, keeps } } : {}),
    ...(config && adapter.router ? referenceRouters(config, adapter) : {}),
  }, batch);
  assert.is(supervised, want.supervised);
  const loss = lossSum / supervised;
  assert.ok(Math.abs(loss - want.lmLoss) / want.lmLoss < LOSS_BOUND, `${what}: loss ${loss} vs ${want.lmLoss}`);
  if (config) assert.ok(Math.abs(balanceLoss - want.balanceLoss) / want.balanceLoss < LOSS_BOUND, `${what}: balance loss ${balanceLoss} vs ${want.balanceLoss}`);
  for (const r of params.routers.values()) {
    const g = want.routers.get(r.layer)!;
    const tensors: [string, GPUBuffer, number, Float64Array][] = [[`router ${r.layer} W_r`, r.gate.grad, r.gate.count, g.gate]];
    if (r.pooler) tensors.push([`router ${r.layer} w_sa`, r.pooler.grad, r.pooler.count, g.pooler!]);
    if (r.rational) tensors.push([`router ${r.layer} rational`, r.rational.grad, r.rational.count, Float64Array.from([...g.numerator!, ...g.denominator!])]);
    for (const [name, buffer, count, wanted] of tensors) {
      const err = relative(await readBuffer(gpu.device, buffer, 0, count * 4), wanted);
      assert.ok(err < GRAD_BOUND, `${what} ${name}: ${err.toExponential(2)}`);
    }
  }
  for (const l of params.lora) {
    const key = `${l.layer}.${l.module}`;
    const gotA = await readBuffer(gpu.device, l.a.grad, 0, l.a.count * 4);
    const gotB = await readBuffer(gpu.device, l.b.grad, 0, l.b.count * 4);
    const errA = relative(gotA, want.lora.get(key)!.a);
    const errB = relative(gotB, want.lora.get(key)!.b);
    assert.ok(errA < GRAD_BOUND && errB < GRAD_BOUND, `${what} ${key}: lora_A ${errA.toExponential(2)}, lora_B ${errB.toExponential(2)}`);
  }
  graph.destroy();
  params.destroy();
  weights.destroy();
}

/** Whether element `i` of mask stream `stream` is kept: the dropout kernels' rule, pcg(stream ^ pcg(i)) >= round(p * 2^32). */
function dropoutKeeps(p: number, stream: number, i: number): boolean {
  return pcg(((stream >>> 0) ^ pcg(i >>> 0)) >>> 0) >= Math.min(0xffffffff, Math.round(p * 2 ** 32));
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
