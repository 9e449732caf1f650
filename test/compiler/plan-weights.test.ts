// The plan's weight storage formats: which tensors take the format, that their linear kernels carry it
// in their constants (so each format has its own kernel keys), and row blocks sized by the format.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { planBase, type PlanOp } from "../../compiler/plan.ts";
import { randomCheckpointBase } from "../../examples/random-checkpoint.ts";

const base = randomCheckpointBase({ hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 512, seed: 1 });
const tied = { ...base, tieEmbeddings: true };

type Linear = Extract<PlanOp, { op: "linear" }>;
const linears = (ops: readonly PlanOp[]) => ops.filter((op): op is Linear => op.op === "linear");

test("f32 unless asked: every tensor f32, linear kernels without a format constant", () => {
  const plan = planBase(base);
  assert.ok(plan.tensors.every((t) => t.gpuDtype === "f32"));
  const constants = plan.kernels.filter((k) => k.family === "matvec" || k.family === "matmul").map((k) => k.constants);
  assert.ok(constants.length > 0 && constants.every((c) => !("weights" in c)));
});

test("q8 (or f16, q4) stores the linear weights and an untied lm_head; the embedding and norms stay f32", () => {
  for (const weights of ["f16", "q8", "q4"] as const) {
    const plan = planBase(base, { weights });
    const formats = new Map(plan.tensors.map((t) => [t.name, t.gpuDtype]));
    for (const t of plan.tensors) assert.is(t.gpuDtype, t.role === "linear" || t.role === "lm_head" ? weights : "f32", t.name);
    assert.is(formats.get("lm_head.weight"), weights);
    assert.is(formats.get("model.embed_tokens.weight"), "f32");
    for (const op of [...linears(plan.layer), ...linears(plan.head)]) {
      for (const key of [op.matvec, op.matmul]) assert.is((plan.kernels.find((k) => k.key === key)!.constants as { weights?: string }).weights, weights, key);
      assert.match(op.matvec, new RegExp(`weights=${weights}\\)$`));
    }
  }
  // Tied: the lm_head is the f32 embedding, read by f32 kernels.
  const head = linears(planBase(tied, { weights: "q8" }).head)[0]!;
  assert.is(head.weight, "model.embed_tokens.weight");
  assert.not.match(head.matvec, /weights=/);
});

test("the spec's weights key is the default; the option overrides it", () => {
  const spec = { ...base, weights: "f16" as const };
  assert.is(planBase(spec).tensors.find((t) => t.role === "linear")!.gpuDtype, "f16");
  assert.is(planBase(spec, { weights: "q8" }).tensors.find((t) => t.role === "linear")!.gpuDtype, "q8");
});

test("row blocks of a split weight are sized by its format's bytes per row", () => {
  // lm_head [512, 64]: 256 bytes a row as f32, 128 as f16, 80 as q8 (2 blocks of 8 words, 2 scales padded to 4), 48 as q4 (2 blocks of 4 words, the scales
  // padded to 4); a 20 KB binding.
  const rows = (weights: "f32" | "f16" | "q8" | "q4") => linears(planBase(base, { weights, maxBindingBytes: 20_000 }).head)[0]!.blocks?.map((b) => b.rows);
  assert.equal(rows("f32"), [78, 44]);
  assert.equal(rows("f16"), [156, 44]);
  assert.equal(rows("q8"), [250, 12]);
  assert.equal(rows("q4"), [416, 96]);
});

test.run();
