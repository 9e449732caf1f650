// One training step of a per_ffn (MixLoRA) adapter on the device against the float64 reference of
// test/reference/train.ts: the loss, the joint balance loss and the gradient of every lora_A, lora_B
// (the MLP modules' E experts stacked) and every layer's router W, on a GQA model with three sequences
// of different lengths packed in one batch: top_k renormalised, plain top_k and dense, with and without
// the balance loss, a partial MLP (gate_proj and down_proj only), LoRA dropout, and 12 experts (the
// router kernels reduce experts 8 at a time).
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
import { ffnSpec, referenceFfnAdapter } from "./ffn-common.ts";
import { DENSE, closestCall, topK } from "./moe-common.ts";

// f32 forward and backward through 2 layers against float64, as graph.test.ts: every gradient within
// 1e-5 relative (L2 over each tensor), the loss and the balance loss within 1e-5 relative.
const GRAD_BOUND = 1e-5;
const LOSS_BOUND = 1e-5;
// Routing decided alike on the device: the reference's kept/dropped logit gaps are far above f32 rounding.
const MIN_GAP = 1e-4;

const root = mkdtempSync(join(tmpdir(), "milora-ffn-graph-"));
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
  const spec = ffnSpec({ base, modules: c.modules ?? EXPERT_MODULES, rank: c.rank, experts: c.experts, selection: c.selection, balance: c.balance, ...(c.dropout ? { dropout: c.dropout } : {}) });
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
  const want = referenceTrainLoss(base, reference, { ...referenceFfnAdapter(adapter), ...(p > 0 ? { dropout: { p, keeps } } : {}) }, batch);
  const gap = closestCall(want.moeDecisions);
  assert.ok(gap > MIN_GAP, `${what}: the reference's closest routing call (logit gap ${gap}) is clear of f32 rounding`);
  assert.is(supervised, want.supervised);
  const lossError = Math.abs(lossSum / supervised - want.lmLoss) / want.lmLoss;
  const balanceError = Math.abs(balanceLoss - want.balanceLoss) / want.balanceLoss;
  const worst = { attention: 0, mlpA: 0, mlpB: 0, router: 0 };
  for (const l of params.lora) {
    const key = `${l.layer}.${l.module}`;
    const errA = relative(await readBuffer(gpu.device, l.a.grad, 0, l.a.count * 4), want.lora.get(key)!.a);
    const errB = relative(await readBuffer(gpu.device, l.b.grad, 0, l.b.count * 4), want.lora.get(key)!.b);
    assert.ok(errA < GRAD_BOUND && errB < GRAD_BOUND, `${what} ${key}: lora_A ${errA.toExponential(2)}, lora_B ${errB.toExponential(2)}`);
    if (l.ffn) {
      assert.is(l.rank, c.experts * c.rank, `${key}: the experts stacked`);
      worst.mlpA = Math.max(worst.mlpA, errA);
      worst.mlpB = Math.max(worst.mlpB, errB);
    } else worst.attention = Math.max(worst.attention, errA, errB);
  }
  assert.equal([...params.ffnRouters.keys()], [0, 1]);
  for (const [layer, router] of params.ffnRouters) {
    const wantRouter = want.moeRouters.get(`${layer}.ffn`)!;
    assert.ok(wantRouter.some((v) => v !== 0), `${what} layer ${layer}: the router has a gradient`);
    const err = relative(await readBuffer(gpu.device, router.grad, 0, router.count * 4), wantRouter);
    assert.ok(err < GRAD_BOUND, `${what} layer ${layer} router ${err.toExponential(2)}`);
    worst.router = Math.max(worst.router, err);
  }
  console.log(
    `${what}: loss ${lossError.toExponential(1)}, balance loss ${balanceError.toExponential(1)} (${balanceLoss.toFixed(4)}), worst attention LoRA ${worst.attention.toExponential(1)}, ` +
      `MLP lora_A ${worst.mlpA.toExponential(1)}, lora_B ${worst.mlpB.toExponential(1)}, router ${worst.router.toExponential(1)}; closest call ${gap.toExponential(1)}`,
  );
  assert.ok(lossError < LOSS_BOUND, `${what}: loss ${lossSum / supervised} vs ${want.lmLoss}`);
  assert.ok(balanceError < LOSS_BOUND, `${what}: balance loss ${balanceLoss} vs ${want.balanceLoss}`);
  graph.destroy();
  params.destroy();
  weights.destroy();
}

test("per_ffn top_k 2 of 4 renormalised (MixLoRA's) with the balance loss: loss, balance loss, every lora_A, lora_B and router gradient", async () => {
  await checkStep("top_k renormalised", { selection: topK(2, true), experts: 4, rank: 4, balance: 0.1 });
});

test("per_ffn plain top_k 2 of 4 with the balance loss, and top_k renormalised without it", async () => {
  await checkStep("top_k", { selection: topK(2, false), experts: 4, rank: 4, balance: 0.1, seed: 6 });
  await checkStep("no balance", { selection: topK(2, true), experts: 4, rank: 2, balance: 0, seed: 7 });
});

test("per_ffn dense over 3 experts (the balance loss is E whatever the routers do)", async () => {
  await checkStep("dense", { selection: DENSE, experts: 3, rank: 4, balance: 0.1 });
});

test("per_ffn with a partial MLP: gate_proj and down_proj adapted (up_proj's base product serves every expert)", async () => {
  await checkStep("gate_proj + down_proj", { selection: topK(2, true), experts: 4, rank: 4, balance: 0.1, modules: ["q_proj", "gate_proj", "down_proj"], seed: 8 });
  await checkStep("up_proj only", { selection: topK(1, false), experts: 4, rank: 4, balance: 0.1, modules: ["v_proj", "up_proj"], seed: 12 });
});

test("per_ffn with LoRA dropout 0.3 (the router reads u itself; one mask per module, shared by its experts)", async () => {
  await checkStep("dropout", { selection: topK(2, true), experts: 4, rank: 4, balance: 0.1, dropout: 0.3, seed: 9 });
});

test("per_ffn with 12 experts of rank 2, top_k 3 (a partial group of the router kernels' 8)", async () => {
  await checkStep("12 experts", { selection: topK(3, false), experts: 12, rank: 2, balance: 0.1, modules: ["o_proj", "gate_proj", "up_proj", "down_proj"], seed: 10 });
});

test.run();
