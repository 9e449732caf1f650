// One training step of a per_module (MOELoRA / MoLoRA) adapter on the device against the float64
// reference of test/reference/train.ts: the loss, the joint balance loss and the gradient of every
// lora_A, lora_B and per-module router W, on a GQA model with three sequences of different lengths
// packed in one batch: top_k renormalised, plain top_k and dense, with and without the balance loss,
// with LoRA dropout, and 16 and 12 experts (the router kernels reduce experts 8 at a time).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { pcg } from "../../../compiler/kernels/sampling.ts";
import { EXPERT_MODULES, type ExpertModule, type MoeRouting } from "../../../compiler/model.ts";
import { planBase } from "../../../compiler/plan.ts";
import { trainKernelResolver } from "../../../compiler/train-kernels.ts";
import { randomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { openCheckpoint } from "../../../runtime/formats/checkpoint.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { PipelineCache, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { uploadWeights } from "../../../runtime/engine/weights.ts";
import { IGNORE_INDEX as I } from "../../../runtime/training/data.ts";
import { TrainingGraph, packBatch } from "../../../runtime/training/graph.ts";
import { TrainableParams } from "../../../runtime/training/params.ts";
import { loadReferenceWeights, moduleShape } from "../../reference/llama.ts";
import { referenceTrainLoss } from "../../reference/train.ts";
import { DENSE, closestCall, moeSpec, referenceMoeAdapter, topK } from "./moe-common.ts";

// f32 forward and backward through 2 layers against float64, as graph.test.ts: every gradient within
// 1e-5 relative (L2 over each tensor), the loss and the balance loss within 1e-5 relative.
const GRAD_BOUND = 1e-5;
const LOSS_BOUND = 1e-5;
// Routing decided alike on the device: the reference's kept/dropped logit gaps are far above f32 rounding.
const MIN_GAP = 1e-4;

const root = mkdtempSync(join(tmpdir(), "milora-moe-graph-"));
const dir = join(root, "tiny");
writeRandomCheckpoint(dir, { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 61, maxPositions: 64, seed: 21 });
const base = readHfConfig(dir);
const { weights: reference } = loadReferenceWeights(dir);
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
  return n === 0 ? Math.sqrt(d) : Math.sqrt(d / n);
}

interface Case {
  readonly selection: MoeRouting["selection"];
  readonly experts: number;
  readonly rank: number;
  readonly balance: number;
  readonly dropout?: number;
  readonly modules?: readonly ExpertModule[];
  readonly seed?: number;
}

async function checkStep(what: string, c: Case): Promise<void> {
  const spec = moeSpec({ base, modules: c.modules ?? EXPERT_MODULES, rank: c.rank, experts: c.experts, selection: c.selection, balance: c.balance, ...(c.dropout ? { dropout: c.dropout } : {}) });
  // B random (not PEFT's zero) so that A's and the routers' gradients are not zero.
  const adapter = randomAdapter({ spec, seed: c.seed ?? 5 });
  const plan = planBase(base, { maxLoraRank: c.rank });
  const checkpoint = openCheckpoint(dir);
  const weights = await uploadWeights(gpu.device, checkpoint, plan, plan.maxBindingBytes);
  checkpoint.close();
  const params = new TrainableParams(gpu.device, adapter);
  const graph = new TrainingGraph({ device: gpu.device, plan, weights, params, kernel: trainKernelResolver(), pipelines: new PipelineCache(gpu.device), maxRows: 32 });
  const packed = packBatch(batch);
  const supervised = packed.supervisedRows.length;
  const dropoutSeed = 77;
  // One micro-batch: the joint balance loss's weight is the spec's balance itself.
  const { lossSum, balanceLoss } = await graph.run(packed, 1 / supervised, { backward: true, dropoutSeed, balanceCoef: c.balance });

  const offsets = batch.map((_, i) => batch.slice(0, i).reduce((n, e) => n + e.tokens.length, 0));
  const p = c.dropout ?? 0;
  const keeps = (layer: number, module: ExpertModule, example: number, position: number, column: number) => {
    const stream = pcg((pcg(dropoutSeed) ^ (layer * 8 + EXPERT_MODULES.indexOf(module) + 1)) >>> 0);
    const i = (offsets[example]! + position) * moduleShape(base, module)[1] + column;
    return pcg(((stream >>> 0) ^ pcg(i >>> 0)) >>> 0) >= Math.min(0xffffffff, Math.round(p * 2 ** 32));
  };
  const want = referenceTrainLoss(base, reference, { ...referenceMoeAdapter(adapter), ...(p > 0 ? { dropout: { p, keeps } } : {}) }, batch);
  const gap = closestCall(want.moeDecisions);
  assert.ok(gap > MIN_GAP, `${what}: the reference's closest routing call (logit gap ${gap}) is clear of f32 rounding`);
  assert.is(supervised, want.supervised);
  const errors: Record<string, number> = {};
  errors.loss = Math.abs(lossSum / supervised - want.lmLoss) / want.lmLoss;
  errors.balanceLoss = Math.abs(balanceLoss - want.balanceLoss) / want.balanceLoss;
  let worstA = 0;
  let worstB = 0;
  let worstRouter = 0;
  for (const l of params.lora) {
    const key = `${l.layer}.${l.module}`;
    const errA = relative(await readBuffer(gpu.device, l.a.grad, 0, l.a.count * 4), want.lora.get(key)!.a);
    const errB = relative(await readBuffer(gpu.device, l.b.grad, 0, l.b.count * 4), want.lora.get(key)!.b);
    const router = l.moe!.router;
    const wantRouter = want.moeRouters.get(key)!;
    assert.ok(c.balance === 0 && c.selection.rule === "dense" ? true : wantRouter.some((v) => v !== 0), `${what} ${key}: the router has a gradient`);
    const errRouter = relative(await readBuffer(gpu.device, router.grad, 0, router.count * 4), wantRouter);
    assert.ok(errA < GRAD_BOUND && errB < GRAD_BOUND && errRouter < GRAD_BOUND, `${what} ${key}: lora_A ${errA.toExponential(2)}, lora_B ${errB.toExponential(2)}, router ${errRouter.toExponential(2)}`);
    worstA = Math.max(worstA, errA);
    worstB = Math.max(worstB, errB);
    worstRouter = Math.max(worstRouter, errRouter);
  }
  console.log(
    `${what}: loss ${errors.loss!.toExponential(1)}, balance loss ${errors.balanceLoss!.toExponential(1)} (${balanceLoss.toFixed(4)}), worst lora_A ${worstA.toExponential(1)}, lora_B ${worstB.toExponential(1)}, router ${worstRouter.toExponential(1)}; closest call ${gap.toExponential(1)}`,
  );
  assert.ok(errors.loss! < LOSS_BOUND, `${what}: loss ${lossSum / supervised} vs ${want.lmLoss}`);
  assert.ok(errors.balanceLoss! < LOSS_BOUND, `${what}: balance loss ${balanceLoss} vs ${want.balanceLoss}`);
  graph.destroy();
  params.destroy();
  weights.destroy();
}

test("per_module top_k 2 of 4 renormalised (MOELoRA's form) with the balance loss: loss, balance loss, every lora_A, lora_B and router gradient", async () => {
  await checkStep("top_k renormalised", { selection: topK(2, true), experts: 4, rank: 8, balance: 0.1 });
});

test("per_module plain top_k 2 of 4 with the balance loss, and top_k renormalised without it", async () => {
  await checkStep("top_k", { selection: topK(2, false), experts: 4, rank: 8, balance: 0.1, seed: 6 });
  await checkStep("no balance", { selection: topK(2, true), experts: 4, rank: 4, balance: 0, seed: 7 });
});

test("per_module dense over 2 experts (the balance loss is E whatever the routers do)", async () => {
  await checkStep("dense", { selection: DENSE, experts: 2, rank: 4, balance: 0.1 });
});

test("per_module with LoRA dropout 0.3 (the router reads the module's input, the LoRA its dropped copy)", async () => {
  await checkStep("dropout", { selection: topK(2, true), experts: 4, rank: 8, balance: 0.1, dropout: 0.3, seed: 8 });
});

test("per_module with 16 experts of rank 1 (top_k 4) and 12 of rank 2 (top_k 3, a partial group of 8) on three modules", async () => {
  await checkStep("16 experts", { selection: topK(4, true), experts: 16, rank: 16, balance: 0.1, modules: ["q_proj", "o_proj", "down_proj"], seed: 9 });
  await checkStep("12 experts", { selection: topK(3, false), experts: 12, rank: 24, balance: 0.1, modules: ["k_proj", "gate_proj", "down_proj"], seed: 10 });
});

test.run();
