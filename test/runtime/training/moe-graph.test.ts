// One training step of a per-token baseline on the device against the float64 reference of
// test/reference/train.ts, for per_module (MOELoRA / MoLoRA: a router per module) and per_ffn (MixLoRA:
// the MLP modules' E experts stacked, a router per layer): the loss, the joint balance loss and the
// gradient of every lora_A, lora_B and router W, on a GQA model with three sequences of different
// lengths packed in one batch: top_k renormalised, plain top_k and dense, with and without the balance
// loss, with LoRA dropout, per_ffn with a partial MLP (gate_proj and down_proj only), and 16 and 12
// experts (the router kernels reduce experts 8 at a time).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { EXPERT_MODULES, type ExpertModule, type MoeRouting } from "../../../compiler/model.ts";
import { randomAdapter } from "../../../examples/random-adapter.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import type { TrainableParams } from "../../../runtime/training/params.ts";
import { referenceTrainLoss, type ReferenceTrainResult } from "../../reference/train.ts";
import { DENSE, PLACEMENTS, closestCall, moeSpec, referenceMoeAdapter, topK, type Placement } from "./reference-adapters.ts";
import { STEP_BATCH, deviceDropout, gradError, stepOnDevice, tinyModel } from "./step-check.ts";

// f32 forward and backward through 2 layers against float64, as graph.test.ts: every gradient within
// 1e-5 relative (L2 over each tensor), the loss and the balance loss within 1e-5 relative.
const GRAD_BOUND = 1e-5;
const LOSS_BOUND = 1e-5;
// Routing decided alike on the device: the reference's kept/dropped logit gaps are far above f32 rounding.
const MIN_GAP = 1e-4;
const DROPOUT_SEED = 77;

const root = mkdtempSync(join(tmpdir(), "milora-moe-graph-"));
const tiny = tinyModel(join(root, "tiny"), { seed: 21 });
const { base } = tiny;
const gpu = await acquireDevice();
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

interface Case {
  readonly placement: Placement;
  readonly selection: MoeRouting["selection"];
  readonly experts: number;
  readonly rank: number;
  readonly balance: number;
  readonly dropout?: number;
  readonly modules?: readonly ExpertModule[];
  readonly seed?: number;
}

async function checkStep(what: string, c: Case): Promise<void> {
  const spec = moeSpec({ placement: c.placement, base, modules: c.modules ?? EXPERT_MODULES, rank: c.rank, experts: c.experts, selection: c.selection, balance: c.balance, ...(c.dropout ? { dropout: c.dropout } : {}) });
  // B random (not PEFT's zero) so that A's and the routers' gradients are not zero.
  const adapter = randomAdapter({ spec, seed: c.seed ?? 5 });
  // One micro-batch: the joint balance loss's weight is the spec's balance itself.
  const run = { dropoutSeed: DROPOUT_SEED, balanceCoef: c.balance };
  await stepOnDevice(gpu.device, tiny, adapter, STEP_BATCH, { plan: { maxLoraRank: c.rank }, maxRows: 32, run }, async ({ lossSum, balanceLoss, supervised, params }) => {
    const want = referenceTrainLoss(base, tiny.reference.weights, { ...referenceMoeAdapter(adapter), ...deviceDropout(base, STEP_BATCH, DROPOUT_SEED, c.dropout ?? 0) }, STEP_BATCH);
    const gap = closestCall(want.moeDecisions);
    assert.ok(gap > MIN_GAP, `${what}: the reference's closest routing call (logit gap ${gap}) is clear of f32 rounding`);
    assert.is(supervised, want.supervised);
    const lossError = Math.abs(lossSum / supervised - want.lmLoss) / want.lmLoss;
    const balanceError = Math.abs(balanceLoss - want.balanceLoss) / want.balanceLoss;
    const worst = await (c.placement === "per_module" ? checkPerModule : checkPerFfn)(what, c, params, want);
    console.log(`${what}: loss ${lossError.toExponential(1)}, balance loss ${balanceError.toExponential(1)} (${balanceLoss.toFixed(4)}), ${worst}; closest call ${gap.toExponential(1)}`);
    assert.ok(lossError < LOSS_BOUND, `${what}: loss ${lossSum / supervised} vs ${want.lmLoss}`);
    assert.ok(balanceError < LOSS_BOUND, `${what}: balance loss ${balanceLoss} vs ${want.balanceLoss}`);
  });
}

/** per_module: every module's lora_A, lora_B and router against the reference; the worst errors, in words. */
async function checkPerModule(what: string, c: Case, params: TrainableParams, want: ReferenceTrainResult): Promise<string> {
  let worstA = 0;
  let worstB = 0;
  let worstRouter = 0;
  for (const l of params.lora) {
    const key = `${l.layer}.${l.module}`;
    const errA = await gradError(gpu.device, l.a, want.lora.get(key)!.a);
    const errB = await gradError(gpu.device, l.b, want.lora.get(key)!.b);
    const wantRouter = want.moeRouters.get(key)!;
    assert.ok(c.balance === 0 && c.selection.rule === "dense" ? true : wantRouter.some((v) => v !== 0), `${what} ${key}: the router has a gradient`);
    const errRouter = await gradError(gpu.device, l.moe!.router, wantRouter);
    assert.ok(errA < GRAD_BOUND && errB < GRAD_BOUND && errRouter < GRAD_BOUND, `${what} ${key}: lora_A ${errA.toExponential(2)}, lora_B ${errB.toExponential(2)}, router ${errRouter.toExponential(2)}`);
    worstA = Math.max(worstA, errA);
    worstB = Math.max(worstB, errB);
    worstRouter = Math.max(worstRouter, errRouter);
  }
  return `worst lora_A ${worstA.toExponential(1)}, lora_B ${worstB.toExponential(1)}, router ${worstRouter.toExponential(1)}`;
}

/** per_ffn: every module's lora_A and lora_B (an MLP module's experts stacked) and every layer's router against the reference; the worst errors, in words. */
async function checkPerFfn(what: string, c: Case, params: TrainableParams, want: ReferenceTrainResult): Promise<string> {
  const worst = { attention: 0, mlpA: 0, mlpB: 0, router: 0 };
  for (const l of params.lora) {
    const key = `${l.layer}.${l.module}`;
    const errA = await gradError(gpu.device, l.a, want.lora.get(key)!.a);
    const errB = await gradError(gpu.device, l.b, want.lora.get(key)!.b);
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
    const err = await gradError(gpu.device, router, wantRouter);
    assert.ok(err < GRAD_BOUND, `${what} layer ${layer} router ${err.toExponential(2)}`);
    worst.router = Math.max(worst.router, err);
  }
  return `worst attention LoRA ${worst.attention.toExponential(1)}, MLP lora_A ${worst.mlpA.toExponential(1)}, lora_B ${worst.mlpB.toExponential(1)}, router ${worst.router.toExponential(1)}`;
}

/** Each placement's tests: a test's name and the steps it checks, each a label and its case. */
const TESTS: Record<Placement, readonly (readonly [string, readonly (readonly [string, Omit<Case, "placement">])[]])[]> = {
  per_module: [
    ["per_module top_k 2 of 4 renormalised (MOELoRA's form) with the balance loss: loss, balance loss, every lora_A, lora_B and router gradient", [["top_k renormalised", { selection: topK(2, true), experts: 4, rank: 8, balance: 0.1 }]]],
    [
      "per_module plain top_k 2 of 4 with the balance loss, and top_k renormalised without it",
      [
        ["top_k", { selection: topK(2, false), experts: 4, rank: 8, balance: 0.1, seed: 6 }],
        ["no balance", { selection: topK(2, true), experts: 4, rank: 4, balance: 0, seed: 7 }],
      ],
    ],
    ["per_module dense over 2 experts (the balance loss is E whatever the routers do)", [["dense", { selection: DENSE, experts: 2, rank: 4, balance: 0.1 }]]],
    ["per_module with LoRA dropout 0.3 (the router reads the module's input, the LoRA its dropped copy)", [["dropout", { selection: topK(2, true), experts: 4, rank: 8, balance: 0.1, dropout: 0.3, seed: 8 }]]],
    [
      "per_module with 16 experts of rank 1 (top_k 4) and 12 of rank 2 (top_k 3, a partial group of 8) on three modules",
      [
        ["16 experts", { selection: topK(4, true), experts: 16, rank: 16, balance: 0.1, modules: ["q_proj", "o_proj", "down_proj"], seed: 9 }],
        ["12 experts", { selection: topK(3, false), experts: 12, rank: 24, balance: 0.1, modules: ["k_proj", "gate_proj", "down_proj"], seed: 10 }],
      ],
    ],
  ],
  per_ffn: [
    ["per_ffn top_k 2 of 4 renormalised (MixLoRA's) with the balance loss: loss, balance loss, every lora_A, lora_B and router gradient", [["top_k renormalised", { selection: topK(2, true), experts: 4, rank: 4, balance: 0.1 }]]],
    [
      "per_ffn plain top_k 2 of 4 with the balance loss, and top_k renormalised without it",
      [
        ["top_k", { selection: topK(2, false), experts: 4, rank: 4, balance: 0.1, seed: 6 }],
        ["no balance", { selection: topK(2, true), experts: 4, rank: 2, balance: 0, seed: 7 }],
      ],
    ],
    ["per_ffn dense over 3 experts (the balance loss is E whatever the routers do)", [["dense", { selection: DENSE, experts: 3, rank: 4, balance: 0.1 }]]],
    [
      "per_ffn with a partial MLP: gate_proj and down_proj adapted (up_proj's base product serves every expert)",
      [
        ["gate_proj + down_proj", { selection: topK(2, true), experts: 4, rank: 4, balance: 0.1, modules: ["q_proj", "gate_proj", "down_proj"], seed: 8 }],
        ["up_proj only", { selection: topK(1, false), experts: 4, rank: 4, balance: 0.1, modules: ["v_proj", "up_proj"], seed: 12 }],
      ],
    ],
    ["per_ffn with LoRA dropout 0.3 (the router reads u itself; one mask per module, shared by its experts)", [["dropout", { selection: topK(2, true), experts: 4, rank: 4, balance: 0.1, dropout: 0.3, seed: 9 }]]],
    ["per_ffn with 12 experts of rank 2, top_k 3 (a partial group of the router kernels' 8)", [["12 experts", { selection: topK(3, false), experts: 12, rank: 2, balance: 0.1, modules: ["o_proj", "gate_proj", "up_proj", "down_proj"], seed: 10 }]]],
  ],
};

for (const placement of PLACEMENTS) {
  for (const [name, steps] of TESTS[placement]) {
    test(name, async () => {
      for (const [what, c] of steps) await checkStep(`${placement} ${what}`, { placement, ...c });
    });
  }
}

test.run();
