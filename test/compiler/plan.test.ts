// The plan of a LLaMA base: its tensor table, its op lists and its kernel set, as plain data.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { PlanError, kernelSources, planBase, type PlanOp } from "../../compiler/plan.ts";
import { randomCheckpointBase } from "../../examples/random-checkpoint.ts";
import { llamaTensorNames } from "../../runtime/checkpoint.ts";

const gqa = randomCheckpointBase({
  hiddenSize: 64,
  layers: 2,
  heads: 4,
  kvHeads: 2,
  intermediateSize: 176,
  vocabSize: 512,
  seed: 1,
});
const tied = { ...gqa, tieEmbeddings: true };

/** Every kernel key an op names. */
function keysOf(ops: readonly PlanOp[]): string[] {
  return ops.flatMap((op) => (op.op === "linear" ? [op.matmul, op.matvec, ...(op.lora ? [op.lora.shrink, op.lora.expand] : [])] : [op.kernel]));
}

test("the tensor table is exactly what a LLaMA checkpoint holds, with GQA widths", () => {
  for (const base of [gqa, tied]) {
    const plan = planBase(base);
    const table = plan.tensors.map((t) => `${t.name} [${t.shape.join(",")}]`).sort();
    assert.equal(
      table,
      llamaTensorNames(base)
        .map((t) => `${t.name} [${t.shape.join(",")}]`)
        .sort(),
    );
  }
  const k = planBase(gqa).tensors.find((t) => t.name === "model.layers.1.self_attn.k_proj.weight")!;
  assert.equal(k.shape, [32, 64]);
  assert.is(k.module, "k_proj");
  assert.is(k.splittable, false);
});

test("tied embeddings: the head reads the embedding table, and only it may be split", () => {
  const plan = planBase(tied);
  const head = plan.head.find((op) => op.op === "linear");
  assert.is(head?.op === "linear" && head.weight, "model.embed_tokens.weight");
  assert.equal(
    plan.tensors.filter((t) => t.splittable).map((t) => t.name),
    ["model.embed_tokens.weight"],
  );
});

test("the plan survives JSON, and every kernel an op names is in the kernel set", () => {
  const plan = planBase(gqa, { ctx: 100 });
  assert.equal(JSON.parse(JSON.stringify(plan)), plan);
  const sources = kernelSources(plan);
  for (const key of [...keysOf(plan.layer), ...keysOf(plan.head)]) assert.ok(sources.has(key), key);
  assert.is(sources.size, plan.kernels.length);
  // q (64 -> 64) and o (64 -> 64, + residual) differ only in the epilogue: distinct kernels.
  assert.ok(sources.has("matmul(K=64,N=64,residual=false)"));
  assert.ok(sources.has("matmul(K=64,N=64,residual=true)"));
  assert.ok(sources.has("attention(heads=4,kvHeads=2,headDim=16,maxPositions=100)"));
});

test("the residual stream leaves each layer where it entered", () => {
  const plan = planBase(gqa);
  const writes = plan.layer.flatMap((op) => ("output" in op ? [op.output] : []));
  assert.is(writes.at(-1), plan.input);
  for (const op of plan.layer) if (op.op === "linear" && op.residual) assert.is.not(op.residual, op.output);
});

test("what the kernels cannot run is refused with the reason", () => {
  assert.throws(
    () => planBase(gqa, { ctx: 0 }),
    (e: unknown) => e instanceof PlanError && /context 0/.test((e as Error).message),
  );
  assert.throws(() => planBase({ ...gqa, attentionBias: true }), /attention biases/);
  assert.throws(() => planBase({ ...gqa, family: "mistral" }), /family "mistral"/);
});

test("serving adapters adds LoRA shrink/expand to every expert linear (not lm_head), one pipeline per shape", () => {
  assert.ok(planBase(gqa).layer.every((op) => op.op !== "linear" || op.lora === undefined));
  const plan = planBase(gqa, { maxLoraRank: 8 });
  assert.is(plan.maxLoraRank, 8);
  const linears = plan.layer.filter((op): op is Extract<PlanOp, { op: "linear" }> => op.op === "linear");
  assert.equal(linears.map((op) => op.lora!.gateColumn), [0, 1, 2, 3, 4, 5, 6]);
  // Shrink is specialised by the input width (64, or 176 for down_proj), expand by the output width (64, 32, 176).
  assert.is(new Set(linears.map((op) => op.lora!.shrink)).size, 2);
  assert.is(new Set(linears.map((op) => op.lora!.expand)).size, 3);
  assert.ok(plan.head.every((op) => op.op !== "linear" || op.lora === undefined));
  const sources = kernelSources(plan);
  for (const key of keysOf(plan.layer)) assert.ok(sources.has(key), key);
  assert.throws(() => planBase(gqa, { maxLoraRank: 300 }), /from 0 to 256/);
});

test.run();
