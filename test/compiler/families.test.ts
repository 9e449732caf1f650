// The model families as the checker and planner see them: the config keys each reads, the tensors its
// checkpoint holds, the ops and kernel constants its plan gets, and what training refuses of it.
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { Span } from "../../grammar/ast.ts";
import { fileURLToPath } from "node:url";
import { checkFiles, checkSource } from "../../compiler/check.ts";
import { checkpointTensors } from "../../compiler/families.ts";
import { baseFromHfConfig } from "../../compiler/hf-config.ts";
import { planBase, type Plan } from "../../compiler/plan.ts";
import { randomCheckpointBase, type RandomCheckpointOptions } from "../../examples/random-checkpoint.ts";
import { untrainable } from "../../runtime/training/graph.ts";

const at = { offset: 0, line: 1, column: 1 };
const span: Span = { file: "config.json", start: at, end: at };
const SIZES = { hiddenSize: 64, layers: 1, heads: 4, kvHeads: 2, intermediateSize: 96, vocabSize: 50, seed: 1 } as const;
const base = (o: Partial<RandomCheckpointOptions>) => randomCheckpointBase({ ...SIZES, ...o });

/** Sizes every config below shares; the family's own keys are added per test. */
const CONFIG = { hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 96, vocab_size: 50 };
const fromConfig = (keys: Record<string, unknown>) => baseFromHfConfig({ ...CONFIG, ...keys }, "m", "config.json", span);

test("mistral reads sliding_window (null: none); qwen2 ignores it unless use_sliding_window, which is refused", () => {
  assert.is(fromConfig({ model_type: "mistral", sliding_window: 4096 }).base?.slidingWindow, 4096);
  assert.is(fromConfig({ model_type: "mistral", sliding_window: null }).base?.slidingWindow, undefined);
  assert.is(fromConfig({ model_type: "qwen2", use_sliding_window: false, sliding_window: 4096 }).base?.slidingWindow, undefined);
  const refused = fromConfig({ model_type: "qwen2", use_sliding_window: true, sliding_window: 4096 });
  assert.equal(refused.problems.map((p) => p.code), ["MIL307"]);
  assert.match(refused.problems[0]!.message, "use_sliding_window true");
});

test("each family accepts its own activation and names what it refuses", () => {
  assert.ok(fromConfig({ model_type: "gemma", hidden_act: "gelu", hidden_activation: "gelu_pytorch_tanh" }).base);
  assert.ok(fromConfig({ model_type: "gemma", hidden_act: "gelu" }).base, "an older gemma config without hidden_activation runs the tanh GELU");
  assert.match(fromConfig({ model_type: "gemma", hidden_activation: "gelu" }).problems[0]!.message, 'hidden_activation "gelu" (milora implements gelu_pytorch_tanh for gemma)');
  assert.match(fromConfig({ model_type: "qwen2", hidden_act: "gelu" }).problems[0]!.message, 'hidden_act "gelu" (milora implements silu for qwen2)');
});

test("a spec's sliding_window is for mistral only, reported at the key", () => {
  const spec = (family: string) => `base b: ${family} { hidden_size 64 layers 2 heads 4 intermediate_size 96 vocab_size 50 sliding_window 16 }\n`;
  assert.equal(checkSource(spec("mistral"), "s.milora").diagnostics, []);
  const [d] = checkSource(spec("llama"), "s.milora").diagnostics;
  assert.is(d?.code, "MIL213");
  assert.equal([d!.span.start.line, d!.span.start.column], [1, 84]);
  assert.match(d!.message, "family llama has no sliding-window attention");
});

test("a qwen2 checkpoint holds q/k/v biases beside their weights; the others hold none", () => {
  const names = (family: RandomCheckpointOptions["family"]) => checkpointTensors(base({ family })).map((t) => `${t.name} [${t.shape.join(",")}]`);
  const biases = names("qwen2").filter((n) => n.includes(".bias"));
  assert.equal(biases, ["model.layers.0.self_attn.q_proj.bias [64]", "model.layers.0.self_attn.k_proj.bias [32]", "model.layers.0.self_attn.v_proj.bias [32]"]);
  for (const family of ["llama", "mistral", "gemma"] as const) assert.ok(!names(family).some((n) => n.includes(".bias")), family);
});

const kernelOf = (plan: Plan, key: string) => plan.kernels.find((k) => k.key === key)!;

test("plans: qwen2 adds its biases after q/k/v, gemma norms by (1 + w), GeGLU and scales embeddings, mistral windows attention", () => {
  const qwen = planBase(base({ family: "qwen2" }));
  assert.equal(
    qwen.layer.map((op) => op.op),
    ["rmsnorm", "linear", "bias", "linear", "bias", "linear", "bias", "rope", "kv_write", "attention", "linear", "rmsnorm", "linear", "linear", "swiglu", "linear"],
  );
  const qBias = qwen.layer[2] as Extract<Plan["layer"][number], { op: "bias" }>;
  assert.equal([qBias.weight, qBias.output, kernelOf(qwen, qBias.kernel).constants], ["model.layers.{layer}.self_attn.q_proj.bias", "q", { width: 64 }]);

  const gemma = planBase(base({ family: "gemma", tieEmbeddings: true }));
  assert.ok(gemma.layer.some((op) => op.op === "geglu") && !gemma.layer.some((op) => op.op === "swiglu"));
  const norm = gemma.layer.find((op) => op.op === "rmsnorm")!;
  assert.equal(kernelOf(gemma, (norm as { kernel: string }).kernel).constants, { hidden: 64, eps: 1e-6, offset: 1 });
  assert.equal(kernelOf(gemma, gemma.embeddingScale!).constants, { factor: Math.fround(8) });

  const mistral = planBase(base({ family: "mistral", slidingWindow: 16 }));
  const attention = mistral.layer.find((op) => op.op === "attention") as { kernel: string };
  assert.equal(kernelOf(mistral, attention.kernel).constants, { heads: 4, kvHeads: 2, headDim: 16, maxPositions: 256, window: 16 });
  // a llama plan is as before: no window, no offset, no embedding scale
  const llama = planBase(base({}));
  assert.is(llama.embeddingScale, undefined);
  assert.ok(llama.kernels.every((k) => !("window" in k.constants) && !("offset" in k.constants)));
});

test("training names what it does not implement of a family, and takes a window longer than every example", () => {
  assert.equal(untrainable(planBase(base({})), 100), []);
  assert.equal(untrainable(planBase(base({ family: "qwen2" })), 10), ["linear biases"]);
  assert.equal(untrainable(planBase(base({ family: "gemma" })), 10), ["the GeGLU MLP", "RMSNorm by (1 + w)", "scaled embeddings"]);
  assert.equal(untrainable(planBase(base({ family: "mistral", slidingWindow: 16 })), 16), []);
  assert.match(untrainable(planBase(base({ family: "mistral", slidingWindow: 16 })), 17)[0]!, "a sliding window of 16 positions, shorter than the longest example's 17 tokens");
});

test("each family's example spec checks clean and plans, its adapter's routers included", () => {
  for (const [file, family] of [["qwen2.5-0.5b", "qwen2"], ["mistral-7b", "mistral"], ["gemma-2b", "gemma"]] as const) {
    const { program, diagnostics } = checkFiles([fileURLToPath(new URL(`../../examples/${file}.milora`, import.meta.url))]);
    assert.equal(diagnostics, [], file);
    const adapter = program.adapters[0]!;
    assert.is(adapter.base.family, family);
    const plan = planBase(adapter.base, { adapter, ctx: 256 });
    assert.is(plan.routers.length, adapter.base.layers, file);
  }
});

test.run();
