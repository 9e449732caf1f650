// The paper's per-token Mixture-of-LoRA baselines in the engine against the float64 reference
// (test/reference/moe-lora.ts): per_module (MOELoRA/MoLoRA: a router in every module over rank slices
// of its LoRA) and per_ffn (MixLoRA: a router per layer over feed-forward experts, k passes), each with
// top_k renormalised, plain top_k and dense gates. Every case compares the logits of every position
// (prompt and greedy decode, routed afresh at each token) and the generated tokens; then beam search,
// a batch mixing a routed tenant with plain LoRA and base rows, a MixLoRA adapter written in MoE-PEFT's
// layout and loaded from its directory, and the refusals.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkSource } from "../../../compiler/check.ts";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import type { Adapter, ExpertModule } from "../../../compiler/model.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { mulberry32, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { adapterSpecFromPeft, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { writeSafetensors, type TensorToWrite } from "../../../runtime/formats/safetensors.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { Engine } from "../../../runtime/engine/engine.ts";
import { plannedEngine } from "../../../bin/engine-plan.ts";
import { argmax, loadReferenceWeights, moduleShape, referenceLogits } from "../../reference/llama.ts";
import { referenceMiloraLogits } from "../../reference/milora.ts";
import { referenceMoeGreedy, referenceMoeLogits } from "../../reference/moe-lora.ts";
import { referenceBeamSearch, logSoftmax } from "../../reference/beam.ts";
import { relativeError, runSequence } from "./run-sequence.ts";

// f32 on the GPU against float64 as for MiLoRA (milora.test.ts): relative error (Frobenius norm over
// every position) below 1e-5 of the logits' norm. Routing is decided alike when the router logit of the
// last kept expert and of the best dropped one are further apart than f32 rounding of logits a few
// units in size (about 1e-6): the reference's gaps are checked against MIN_GAP.
const BOUND = 1e-5;
const MIN_GAP = 1e-4;
const TINY = { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 97, maxPositions: 64, seed: 13 } as const;
const PROMPT = [5, 17, 3, 88, 42, 9, 60, 1, 33, 70, 12];
const GENERATED = 4;

const root = mkdtempSync(join(tmpdir(), "milora-moe-"));
const checkpointDir = join(root, "tiny");
writeRandomCheckpoint(checkpointDir, TINY);
const { base, weights } = loadReferenceWeights(checkpointDir);
let gpu: GpuContext;

test.before(async () => {
  gpu = await acquireDevice();
});
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

/** The adapter `name` of a spec written over the checkpoint's config (the text as a user writes it). */
function specOf(body: string, name = "moe"): Adapter {
  const text = `base tiny from "${join(checkpointDir, "config.json")}" { max_positions 64 }\nadapter ${name} on tiny {\n${body}\n}\n`;
  const { program, diagnostics } = checkSource(text, join(root, "moe.milora"));
  const errors = diagnostics.filter((d) => d.severity === "error");
  assert.equal(errors.map((d) => d.message), [], "the spec checks");
  return program.adapters.find((a) => a.name === name)!;
}

/** An engine planned for `spec` (its MoE kernels are the plan's), with room for `adapters` tenants. */
async function engineFor(spec: Adapter, adapters = 3): Promise<Engine> {
  return Engine.load(plannedEngine({ base: readHfConfig(checkpointDir), checkpointDir, gpu, ctx: 64, maxSequences: 6, maxAdapters: adapters, maxLoraRank: 32, adapter: spec }));
}

/** Prompt and greedy decode of `adapter` against the reference: logits, tokens, and no near-tie in routing. */
async function compareGreedy(engine: Engine, adapter: LoadedAdapter, label: string): Promise<void> {
  const seq = engine.createSequence(PROMPT, { adapter: adapter.name });
  const run = await runSequence(engine, seq, GENERATED);
  engine.release(seq);
  const want = referenceMoeLogits(base, weights, adapter, [...PROMPT, ...run.generated]);
  const gap = (d: { experts: number[]; logits: number[] }) => {
    const dropped = d.logits.filter((_, e) => !d.experts.includes(e));
    return dropped.length === 0 ? Infinity : Math.min(...d.experts.map((e) => d.logits[e]!)) - Math.max(...dropped);
  };
  const closest = Math.min(...want.experts.map(gap));
  assert.ok(closest > MIN_GAP, `${label}: the reference's closest routing call (logit gap ${closest}) is clear of f32 rounding`);
  const err = relativeError(run.logits, want.logits);
  assert.ok(err < BOUND, `${label}: relative error ${err}`);
  assert.equal(run.generated, referenceMoeGreedy(base, weights, adapter, PROMPT, GENERATED).tokens, `${label}: greedy tokens`);
}

const SELECTIONS = ["select top_k 2 renormalize", "select top_k 3", "select dense"] as const;

test("per_module (MOELoRA): every module routes each token over rank slices of its LoRA, for each gate form", async () => {
  for (const select of SELECTIONS) {
    const spec = specOf(`experts all { rank 16 alpha 32 }\nrouter { placement per_module num_experts 4 ${select} }`);
    const engine = await engineFor(spec);
    try {
      const a = randomAdapter({ spec, seed: 5 + SELECTIONS.indexOf(select), name: "moelora" });
      engine.loadAdapter(a.name, a);
      await compareGreedy(engine, a, `per_module ${select}`);
    } finally {
      engine.destroy();
    }
  }
});

test("per_ffn (MixLoRA): one router per layer mixes k feed-forward experts, attention plain LoRA, for each gate form", async () => {
  for (const select of SELECTIONS) {
    const spec = specOf(`experts attn.* { rank 8 alpha 16 }\nexperts mlp.* { rank 4 alpha 8 }\nrouter { placement per_ffn num_experts 4 ${select} }`);
    const engine = await engineFor(spec);
    try {
      const a = randomAdapter({ spec, seed: 6, name: "mixlora" });
      engine.loadAdapter(a.name, a);
      await compareGreedy(engine, a, `per_ffn ${select}`);
    } finally {
      engine.destroy();
    }
  }
});

test("per_ffn with an MLP module left out and layers without experts: those add nothing, the rest still mix", async () => {
  const spec = specOf(`experts gate_proj, down_proj, q_proj { rank 4 alpha 8 }\nlayers 1\nrouter { placement per_ffn num_experts 3 select top_k 2 renormalize }`);
  const engine = await engineFor(spec);
  try {
    const a = randomAdapter({ spec, seed: 9, name: "partial" });
    engine.loadAdapter(a.name, a);
    await compareGreedy(engine, a, "per_ffn partial");
  } finally {
    engine.destroy();
  }
});

test("beam search over per-token routing: each beam routes its own tokens, as the reference's beam search", async () => {
  for (const body of [
    `experts all { rank 16 alpha 32 }\nrouter { placement per_module num_experts 4 select top_k 2 renormalize }`,
    `experts attn.*, mlp.* { rank 4 alpha 8 }\nrouter { placement per_ffn num_experts 4 select top_k 2 renormalize }`,
  ]) {
    const spec = specOf(body);
    const engine = await engineFor(spec);
    try {
      const a = randomAdapter({ spec, seed: 21, name: "beams" });
      engine.loadAdapter(a.name, a);
      const next = (tokens: readonly number[]) => logSoftmax(referenceMoeLogits(base, weights, a, tokens).logits.at(-1)!);
      const want = referenceBeamSearch(next, PROMPT, { numBeams: 3, maxNewTokens: 4, eos: [], numReturnSequences: 3 });
      const got = await engine.generate({ prompt: PROMPT, maxTokens: 4, beam: { beams: 3, numReturnSequences: 3 }, adapter: a.name });
      assert.equal(got.beams!.map((b) => b.tokens), want.map((b) => b.tokens), `${spec.moe!.placement}: the beams`);
      got.beams!.forEach((b, i) => assert.ok(Math.abs(b.score - want[i]!.score) < 1e-3, `${spec.moe!.placement} beam ${i}: score ${b.score} vs ${want[i]!.score}`));
    } finally {
      engine.destroy();
    }
  }
});

test("a batch mixing a per_ffn tenant, a plain LoRA tenant and a base sequence: each row as if alone", async () => {
  const spec = specOf(`experts all { rank 4 alpha 8 }\nrouter { placement per_ffn num_experts 4 select top_k 2 renormalize }`);
  const engine = await engineFor(spec);
  try {
    const moe = randomAdapter({ spec, seed: 31, name: "mixlora" });
    const plain = randomAdapter({ spec: peftSpec({ base, modules: ["q_proj", "up_proj", "down_proj"], rank: 8, alpha: 16, seed: 0, name: "plain" }), seed: 32 });
    engine.loadAdapter(moe.name, moe);
    engine.loadAdapter(plain.name, plain);
    const prompts = [PROMPT, [9, 8, 7, 6, 5, 4], [40, 41, 42, 43, 44, 45, 46, 47]];
    const results = await engine.generateBatch([
      { prompt: prompts[0]!, maxTokens: GENERATED, adapter: moe.name },
      { prompt: prompts[1]!, maxTokens: GENERATED, adapter: plain.name },
      { prompt: prompts[2]!, maxTokens: GENERATED },
    ]);
    const greedy = (logitsOf: (tokens: number[]) => Float64Array[], prompt: readonly number[]) => {
      const tokens = [...prompt];
      for (let i = 0; i < GENERATED; i++) tokens.push(argmax(logitsOf(tokens).at(-1)!));
      return tokens.slice(prompt.length);
    };
    assert.equal(results[0]!.tokens, referenceMoeGreedy(base, weights, moe, prompts[0]!, GENERATED).tokens, "per_ffn tenant");
    assert.equal(results[1]!.tokens, greedy((t) => referenceMiloraLogits(base, weights, plain, t).logits, prompts[1]!), "plain LoRA tenant");
    assert.equal(results[2]!.tokens, greedy((t) => referenceLogits(base, weights, t), prompts[2]!), "base sequence");
  } finally {
    engine.destroy();
  }
});

/**
 * A MixLoRA adapter as MoE-PEFT exports one (docs/formats.md, "per_ffn"): adapter_config.json with
 * peft_type MIXLORA, and per layer the attention LoRA `mixlora.layers.{l}.self_attn.{proj}.lora_A/B`,
 * the router `mixlora.layers.{l}.mlp.moe_gate.weight` [E, hidden] and each expert's LoRA
 * `mixlora.layers.{l}.mlp.{proj}.experts.{e}.lora_A/B`, every tensor drawn here.
 */
function writeMoePeftMixlora(dir: string, o: { experts: number; topK: number; r: number; alpha: number; seed: number }): void {
  const random = mulberry32(o.seed);
  const uniform = (n: number, scale: number) => Float32Array.from({ length: n }, () => (random() * 2 - 1) * scale);
  const tensors: TensorToWrite[] = [];
  const lora = (prefix: string, module: ExpertModule) => {
    const [out, inF] = moduleShape(base, module);
    tensors.push(
      { name: `${prefix}.lora_A.weight`, dtype: "F32", shape: [o.r, inF], data: uniform(o.r * inF, 1 / Math.sqrt(inF)) },
      { name: `${prefix}.lora_B.weight`, dtype: "F32", shape: [out, o.r], data: uniform(out * o.r, 0.5 / Math.sqrt(o.r)) },
    );
  };
  for (let layer = 0; layer < base.layers; layer++) {
    for (const m of ["q_proj", "k_proj", "v_proj", "o_proj"] as const) lora(`mixlora.layers.${layer}.self_attn.${m}`, m);
    tensors.push({ name: `mixlora.layers.${layer}.mlp.moe_gate.weight`, dtype: "F32", shape: [o.experts, base.hiddenSize], data: uniform(o.experts * base.hiddenSize, 6 / Math.sqrt(base.hiddenSize)) });
    for (const m of ["gate_proj", "up_proj", "down_proj"] as const) for (let e = 0; e < o.experts; e++) lora(`mixlora.layers.${layer}.mlp.${m}.experts.${e}`, m);
  }
  mkdirSync(dir, { recursive: true });
  const config = {
    bias: "none",
    peft_type: "MIXLORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: "tiny",
    r: o.r,
    lora_alpha: o.alpha,
    lora_dropout: 0.05,
    target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    routing_strategy: "mixlora",
    num_experts: o.experts,
    top_k: o.topK,
    router_aux_loss_coef: 0.01,
    router_init_range: 0.02,
    jitter_noise: 0.0,
    act_fn: "silu",
  };
  writeFileSync(join(dir, "adapter_config.json"), JSON.stringify(config, null, 2));
  writeSafetensors(join(dir, "adapter_model.safetensors"), tensors, { format: "pt" });
}

test("a MixLoRA adapter in MoE-PEFT's layout loads from its directory and runs as the reference says", async () => {
  const dir = join(root, "mixlora-moe-peft");
  writeMoePeftMixlora(dir, { experts: 4, topK: 2, r: 4, alpha: 8, seed: 41 });
  const spec = adapterSpecFromPeft(dir, readHfConfig(checkpointDir), "mixlora");
  assert.equal(spec.moe, { placement: "per_ffn", experts: 4, selection: { rule: "top_k", k: 2, renormalize: true }, balance: 0.01 });
  const engine = await engineFor(spec);
  try {
    const tenant = engine.loadAdapter("mixlora", dir);
    await compareGreedy(engine, tenant.adapter, "MoE-PEFT MixLoRA");
  } finally {
    engine.destroy();
  }
});

test("an engine serves only the MoE routing it was planned for, and merging refuses per-token routing", async () => {
  const perModule = specOf(`experts all { rank 8 }\nrouter { placement per_module num_experts 4 select top_k 2 renormalize }`);
  const perFfn = specOf(`experts all { rank 4 }\nrouter { placement per_ffn num_experts 4 select top_k 2 renormalize }`);
  const engine = await engineFor(perModule);
  try {
    const other = randomAdapter({ spec: perFfn, seed: 3, name: "ffn" });
    assert.throws(() => engine.loadAdapter(other.name, other), /per_ffn routing over 4 experts .* the engine's kernels were made for per_module/);
    const mine = randomAdapter({ spec: perModule, seed: 4, name: "mine" });
    engine.loadAdapter(mine.name, mine);
    let refused: unknown;
    await engine.mergeAdapter(mine.name).catch((e: unknown) => (refused = e));
    assert.match(String(refused), /routes every token \(per_module\)/);
  } finally {
    engine.destroy();
  }
});

test.run();
