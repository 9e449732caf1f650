// Adapters in the engine against the float64 reference: plain PEFT LoRA, MiLoRA prompt routing (each
// pooling, activation and selection, both gate forms), the per-token baseline, mixed batches and
// merged mode, on a tiny random checkpoint and random adapters written here. Every case compares the
// logits of every position (prompt and greedy decode, which reuses the prompt's decision), the
// generated tokens, the chosen experts and the gates.
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { ROUTER_DEFAULTS } from "../../../compiler/defaults.ts";
import { EXPERT_MODULES, type Adapter, type ExpertModule, type RouterConfig } from "../../../compiler/model.ts";
import { peftSpec, randomAdapter, writeRandomPeftAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { checkpointTensors } from "../../../compiler/families.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { Engine, EngineError } from "../../../runtime/engine/engine.ts";
import type { Generation } from "../../../runtime/engine/requests.ts";
import type { LayerRouting } from "../../../runtime/engine/routing.ts";
import type { Sequence } from "../../../runtime/engine/sequence.ts";
import { writeSafetensors } from "../../../runtime/formats/safetensors.ts";
import { loadReferenceWeights, type ReferenceWeights } from "../../reference/llama.ts";
import { argmax } from "../../reference/llama.ts";
import { foldLora, referenceMiloraLogits, type RoutingDecision } from "../../reference/milora.ts";
import { generatingResolver, plannedEngine } from "../../../bin/engine-plan.ts";
import { kernelSources, planBase } from "../../../compiler/plan.ts";
import { relativeError, runSequence } from "./run-sequence.ts";

// f32 on the GPU against float64, as for the base model (engine.test.ts), plus two rank-8 LoRA
// products per module and the router's pooling and softmax: relative error (Frobenius norm over all
// positions) below 1e-5 of the logits' norm; gates within 1e-5 absolute.
const BOUND = 1e-5;
const GATE_TOLERANCE = 1e-5;
const TINY = { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 97, maxPositions: 64, seed: 7 } as const;
const PROMPT = [5, 17, 3, 88, 42, 9, 60, 1, 33, 70, 12];
const GENERATED = 4;

const root = mkdtempSync(join(tmpdir(), "milora-adapters-"));
const checkpointDir = join(root, "tiny");
writeRandomCheckpoint(checkpointDir, TINY);
const { base, weights } = loadReferenceWeights(checkpointDir);
let gpu: GpuContext;
let engine: Engine;

test.before(async () => {
  gpu = await acquireDevice();
  engine = await Engine.load(plannedEngine({ base: readHfConfig(checkpointDir), checkpointDir, gpu, ctx: 64, maxSequences: 6, maxAdapters: 4, maxLoraRank: 8 }));
});
test.after(() => {
  engine.destroy();
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

/** A MiLoRA adapter on all seven modules (rank 8 unless given) with the given router. */
function milora(router: Partial<RouterConfig>, seed: number, name = "mix", rank = 8, modules: readonly ExpertModule[] = EXPERT_MODULES): LoadedAdapter {
  const config: RouterConfig = {
    ...ROUTER_DEFAULTS,
    noise: false,
    balance: 0.01,
    ...router,
  };
  const spec: Adapter = { ...peftSpec({ base, modules, rank, alpha: 2 * rank, seed: 0, name }), router: config };
  return randomAdapter({ spec, seed });
}

/** Same decisions (by layer, then position), same chosen experts, gates within GATE_TOLERANCE. */
function assertSameRouting(got: readonly LayerRouting[], want: readonly RoutingDecision[]): void {
  assert.is(got.length, want.length, "number of routing decisions");
  const order = <T extends RoutingDecision>(ds: readonly T[]) => [...ds].sort((a, b) => a.layer - b.layer || (a.position ?? 0) - (b.position ?? 0));
  const sortedWant = order(want);
  order(got).forEach((d, i) => {
    const w = sortedWant[i]!;
    assert.is(d.layer, w.layer);
    assert.is(d.position, w.position);
    assert.equal(Object.keys(d.experts).sort(), Object.keys(w.experts).sort(), `layer ${d.layer} position ${d.position}: chosen experts`);
    for (const [m, g] of Object.entries(w.experts)) {
      const diff = Math.abs(d.experts[m as keyof typeof d.experts]! - g);
      assert.ok(diff < GATE_TOLERANCE, `layer ${d.layer} ${m}: gate differs by ${diff}`);
    }
  });
}

/** Runs `adapter` on the prompt plus GENERATED greedy tokens and checks logits and routing against the reference. */
async function matchesReference(adapter: LoadedAdapter, on: Engine = engine, prompt: readonly number[] = PROMPT): Promise<Sequence> {
  const engine = on;
  engine.loadAdapter(adapter.name, adapter);
  try {
    const seq = engine.createSequence(prompt, { adapter: adapter.name });
    const { logits, generated } = await runSequence(engine, seq, GENERATED);
    engine.release(seq);
    const want = referenceMiloraLogits(base, weights, adapter, [...prompt], generated);
    const err = relativeError(logits, want.logits);
    assert.ok(err < BOUND, `relative error ${err.toExponential(2)} >= ${BOUND}`);
    assertSameRouting(seq.routing, want.routing);
    // Greedy decoding: each generated token is the reference's argmax after its prefix (where the
    // two best logits are not within 1e-3 of each other, which f32 could swap).
    generated.forEach((token, i) => {
      const row = want.logits[prompt.length - 1 + i]!;
      const [first, second] = [...row].sort((a, b) => b - a);
      if (first! - second! > 1e-3) assert.is(token, argmax(row), `generated token ${i}`);
    });
    return seq;
  } finally {
    engine.unloadAdapter(adapter.name);
  }
}

test("a plain PEFT adapter loaded from its directory runs as LoRA on every module it has (gate 1)", async () => {
  const dir = join(root, "peft");
  const adapter = writeRandomPeftAdapter(dir, { base, modules: ["q_proj", "v_proj", "down_proj"], rank: 8, alpha: 32, seed: 3 });
  engine.loadAdapter("peft", dir);
  try {
    const seq = engine.createSequence(PROMPT, { adapter: "peft" });
    const { logits, generated } = await runSequence(engine, seq, GENERATED);
    engine.release(seq);
    const err = relativeError(logits, referenceMiloraLogits(base, weights, adapter, PROMPT, generated).logits);
    assert.ok(err < BOUND, `relative error ${err.toExponential(2)}`);
    assert.equal(seq.routing, []);
  } finally {
    engine.unloadAdapter("peft");
  }
});

test("a PEFT adapter gives the logits of the base checkpoint with W + (alpha/r) B A folded in", async () => {
  const adapter = writeRandomPeftAdapter(join(root, "peft-fold"), { base, modules: EXPERT_MODULES, rank: 4, alpha: 8, seed: 4 });
  const foldedDir = join(root, "folded");
  writeFolded(foldedDir, foldLora(weights, adapter));
  const folded = await Engine.load(plannedEngine({ base: readHfConfig(foldedDir), checkpointDir: foldedDir, gpu, ctx: 64, maxAdapters: 0 }));
  engine.loadAdapter("peft", adapter);
  try {
    const viaFold = (await folded.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" })).logits!;
    const viaAdapter = (await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all", adapter: "peft" })).logits!;
    const err = relativeError(viaAdapter, viaFold.map((row) => Float64Array.from(row)));
    assert.ok(err < BOUND, `relative error ${err.toExponential(2)}`);
  } finally {
    folded.destroy();
    engine.unloadAdapter("peft");
  }
});

/** A HF checkpoint directory of `w` (F32), with the tiny checkpoint's config. */
function writeFolded(dir: string, w: ReferenceWeights): void {
  mkdirSync(dir, { recursive: true });
  copyFileSync(join(checkpointDir, "config.json"), join(dir, "config.json"));
  const tensors = checkpointTensors(base).map(({ name, shape }) => ({ name, dtype: "F32" as const, shape, data: Float32Array.from(w.get(name)) }));
  writeSafetensors(join(dir, "model.safetensors"), tensors, { format: "pt" });
}

for (const pooling of ["last", "mean", "max", "attention"] as const) {
  test(`prompt routing with ${pooling} pooling, top_k 2: logits and decisions match the reference`, async () => {
    await matchesReference(milora({ pooling }, 10 + pooling.length));
  });
}

// A prompt three times a step: its rows run layer by layer over three chunks of 8, each layer's router
// pooling over all 24 rows first; the prefill's logits of all 24 rows come back in three head submits.
const LONG = Array.from({ length: 24 }, (_, i) => (i * 37 + 5) % TINY.vocabSize);

for (const pooling of ["last", "mean", "max", "attention"] as const) {
  test(`a prompt routed with ${pooling} pooling over 3 steps' rows: logits of every position and decisions match the reference`, async () => {
    const chunked = await Engine.load(plannedEngine({ base, checkpointDir, gpu, ctx: 64, maxSequences: 2, maxAdapters: 1, maxLoraRank: 8, maxBatchRows: 8 }));
    try {
      assert.is(chunked.maxRows, 8);
      await matchesReference(milora({ pooling }, 70 + pooling.length, `chunked-${pooling}`), chunked, LONG);
    } finally {
      chunked.destroy();
    }
  });
}

test("a prompt routed over chunks in a batch: each sequence gets what it gets alone, beam candidates and logprobs included", async () => {
  const chunked = await Engine.load(plannedEngine({ base, checkpointDir, gpu, ctx: 64, maxSequences: 3, maxAdapters: 1, maxLoraRank: 8, maxBatchRows: 8 }));
  chunked.loadAdapter("a", milora({ pooling: "attention" }, 77, "a"));
  try {
    const requests = [
      { prompt: LONG, adapter: "a", maxTokens: 3, logits: "all" as const },
      { prompt: [40, 2, 7], maxTokens: 3, logits: "all" as const },
      { prompt: LONG.slice(0, 20), adapter: "a", maxTokens: 3 },
    ];
    const alone: Generation[] = [];
    for (const r of requests) alone.push(await chunked.generate(r));
    const together = await chunked.generateBatch(requests);
    together.forEach((got, i) => {
      assert.equal(got.tokens, alone[i]!.tokens, `request ${i}: tokens`);
      if (got.logits) assert.ok(relativeError(got.logits, alone[i]!.logits!.map((row) => Float64Array.from(row))) < 1e-6, `request ${i}: logits`);
      assertSameRouting(got.routing ?? [], alone[i]!.routing ?? []);
    });
    // The sampled row's candidates and log-probability come from the last head submit.
    const seq = chunked.createSequence(LONG, { adapter: "a" });
    seq.candidates = 4;
    seq.wantsLogprob = true;
    seq.logits = "all";
    const out = (await chunked.prefill([seq])).get(seq)!;
    chunked.release(seq);
    const last = out.logits!.at(-1)!;
    const top = Math.max(...last);
    const logSum = top + Math.log(last.reduce((s, v) => s + Math.exp(v - top), 0));
    assert.is(out.candidates!.tokens[0], out.token);
    assert.is(out.candidates!.tokens[0], argmax(Float64Array.from(last)));
    assert.ok(Math.abs(out.logprob! - (last[out.token]! - logSum)) < 1e-4, `logprob ${out.logprob}`);
    assert.ok(Math.abs(out.candidates!.logprobs[0]! - out.logprob!) < 1e-4);
  } finally {
    chunked.destroy();
  }
});

const RATIONAL = { activation: "rational", rational: { numerator: 6, denominator: 5 } } as const;

test("prompt routing with top_k 3 renormalize after a gelu activation of the mean", async () => {
  await matchesReference(milora({ selection: { rule: "top_k", k: 3, renormalize: true }, activation: "gelu", pooling: "mean" }, 21));
});

test("prompt routing with the rational activation: the adapter's coefficients, and the GELU-fit ones when it has none", async () => {
  await matchesReference(milora({ ...RATIONAL, pooling: "attention" }, 28));
  const fitted = milora({ ...RATIONAL, pooling: "max", selection: { rule: "top_k", k: 1, renormalize: false } }, 29, "fit");
  const withoutCoefficients: LoadedAdapter = { ...fitted, router: new Map([...fitted.router!].map(([l, { rational: _, ...r }]) => [l, r])) };
  await matchesReference(withoutCoefficients);
  // A different numerator / denominator order gets its own fit.
  await matchesReference(milora({ activation: "rational", rational: { numerator: 4, denominator: 2 }, pooling: "mean" }, 30, "r42"));
});

test("prompt routing with threshold (both gate forms) and with dense selection", async () => {
  await matchesReference(milora({ selection: { rule: "threshold", threshold: 0.2, renormalize: false } }, 22));
  await matchesReference(milora({ selection: { rule: "threshold", threshold: 0.2, renormalize: true }, pooling: "attention", activation: "relu" }, 22));
  await matchesReference(milora({ selection: { rule: "dense" }, activation: "relu", pooling: "max" }, 23));
});

test("a router over a subset of the modules (4 experts) gates the right modules, prompt and token", async () => {
  const some: ExpertModule[] = ["v_proj", "o_proj", "up_proj", "down_proj"];
  await matchesReference(milora({ selection: { rule: "top_k", k: 2, renormalize: true } }, 26, "some", 8, some));
  await matchesReference(milora({ when: "token", selection: { rule: "threshold", threshold: 0.3, renormalize: false } }, 27, "some", 8, some));
});

test("per-token routing with every activation and both top_k gate forms", async () => {
  await matchesReference(milora({ when: "token", ...RATIONAL, selection: { rule: "top_k", k: 2, renormalize: true } }, 34));
  await matchesReference(milora({ when: "token", activation: "gelu", selection: { rule: "threshold", threshold: 0.25, renormalize: true } }, 35));
  await matchesReference(milora({ when: "token", activation: "relu", selection: { rule: "dense" } }, 36));
});

test("per-token routing routes every position at every layer, prefill and decode alike", async () => {
  const seq = await matchesReference(milora({ when: "token" }, 24));
  assert.is(seq.routing.length, base.layers * (PROMPT.length + GENERATED));
});

test("prompt routing runs once: decode steps keep the prompt's gates where the tokens would route differently", async () => {
  const adapter = milora({ pooling: "last" }, 25);
  const seq = await matchesReference(adapter);
  assert.is(seq.routing.length, base.layers);
  // The same weights routed per token choose other experts for some generated position, and so give
  // other logits there: an engine that re-ran the router while decoding would have failed above.
  const tokenRouted = { ...adapter, spec: { ...adapter.spec, router: { ...adapter.spec.router!, when: "token" as const } } };
  const generated = seq.tokens.slice(PROMPT.length);
  const perToken = referenceMiloraLogits(base, weights, tokenRouted, PROMPT, generated);
  const prompt = referenceMiloraLogits(base, weights, adapter, PROMPT, generated);
  const differs = perToken.routing.some(
    (d) => d.position! >= PROMPT.length && Object.keys(d.experts).join() !== Object.keys(prompt.routing[d.layer]!.experts).join(),
  );
  assert.ok(differs, "some generated position routes differently per token");
  const decodeRows = (r: Float64Array[]) => r.slice(PROMPT.length);
  const gap = relativeError(decodeRows(perToken.logits).map((row) => Float32Array.from(row)), decodeRows(prompt.logits));
  assert.ok(gap > 100 * BOUND, `per-token routing changes the decode logits (by ${gap.toExponential(2)})`);
});

test("a batch mixing tenants and routing modes gives each sequence exactly what it gives alone", async () => {
  const adapters = [milora({}, 31, "a"), milora({ when: "token", pooling: "mean" }, 32, "b"), milora({ pooling: "max", selection: { rule: "dense" } }, 33, "c")];
  for (const a of adapters) engine.loadAdapter(a.name, a);
  const requests = [
    { prompt: PROMPT, adapter: "a" },
    { prompt: [40, 2, 7], adapter: "b" },
    { prompt: [9, 9, 9, 31], adapter: "c" },
    { prompt: [40, 2, 7] },
    { prompt: [3, 14, 15, 92, 65], adapter: "a" },
  ].map((r) => ({ ...r, maxTokens: 5, logits: "all" as const }));
  try {
    const alone: Generation[] = [];
    for (const r of requests) alone.push(await engine.generate(r));
    const together = await engine.generateBatch(requests);
    together.forEach((got, i) => {
      assert.equal(got.tokens, alone[i]!.tokens, `request ${i}: tokens`);
      const err = relativeError(got.logits!, alone[i]!.logits!.map((row) => Float64Array.from(row)));
      assert.ok(err < 1e-5, `request ${i}: relative error ${err.toExponential(2)}`);
      assertSameRouting(got.routing ?? [], alone[i]!.routing ?? []);
    });
  } finally {
    for (const a of adapters) engine.unloadAdapter(a.name);
  }
});

test("one shrink for q/k/v and one for gate/up gives, bit for bit, the logits of a shrink per module: MiLoRA tenants switching modules off inside a group, a LoRA on some modules only, base rows; decode, a prefill past the matvec rows", async () => {
  const single = planBase(base, { ctx: 64, maxLoraRank: 8, groupLoraShrinks: false });
  const ungrouped = await Engine.load({ base, checkpointDir, gpu, plan: single, kernels: kernelSources(single), resolver: generatingResolver, maxSequences: 6, maxAdapters: 4 });
  const partial = randomAdapter({ spec: peftSpec({ base, modules: ["k_proj", "o_proj", "up_proj"], rank: 5, alpha: 10, seed: 0, name: "some" }), seed: 35 });
  const adapters = [milora({}, 34, "a"), milora({ when: "token", pooling: "mean", selection: { rule: "top_k", k: 1, renormalize: false } }, 36, "b"), partial];
  const engines = [engine, ungrouped];
  for (const e of engines) for (const a of adapters) e.loadAdapter(a.name, a);
  const long = Array.from({ length: 40 }, (_, i) => (i * 29 + 3) % base.vocabSize);
  const requests = [
    { prompt: PROMPT, adapter: "a" },
    { prompt: [40, 2, 7], adapter: "b" },
    { prompt: [9, 9, 9, 31], adapter: "some" },
    { prompt: [40, 2, 7] },
    { prompt: long, adapter: "a" },
  ].map((r) => ({ ...r, maxTokens: 4, logits: "all" as const }));
  try {
    // one batch (mixed decode rows), then the long prompt alone (a 40-row prefill: matmul and expand)
    const [grouped, each] = await Promise.all(engines.map(async (e) => [...(await e.generateBatch(requests.slice(0, 4))), await e.generate(requests[4]!)]));
    grouped!.forEach((got, i) => {
      assert.equal(got.tokens, each![i]!.tokens, `request ${i}: tokens`);
      got.logits!.forEach((row, p) => assert.ok(row.every((v, j) => Object.is(v, each![i]!.logits![p]![j])), `request ${i}, position ${p}: logits bit for bit`));
    });
    // and the grouped engine against float64 for the tenant that lacks modules
    await matchesReference(randomAdapter({ spec: peftSpec({ base, modules: ["q_proj", "v_proj", "gate_proj"], rank: 3, alpha: 6, seed: 0, name: "qvg" }), seed: 37 }));
  } finally {
    for (const a of adapters) engine.unloadAdapter(a.name);
    ungrouped.destroy();
  }
});

test("merged mode (W + g s B A for one prompt's decision) gives the unmerged logits, and unmerging restores the base", async () => {
  const adapter = milora({}, 41);
  engine.loadAdapter("m", adapter);
  try {
    const baseBefore = (await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" })).logits!;
    const unmerged = await engine.generate({ prompt: PROMPT, maxTokens: 6, logits: "all", adapter: "m" });
    await engine.mergeAdapter("m", unmerged.routing);
    assert.throws(() => engine.createSequence(PROMPT, { adapter: "m" }), /merged/);
    const merged = await engine.generate({ prompt: PROMPT, maxTokens: 6, logits: "all" });
    assert.equal(merged.tokens, unmerged.tokens);
    const err = relativeError(merged.logits!, unmerged.logits!.map((row) => Float64Array.from(row)));
    assert.ok(err < BOUND, `relative error ${err.toExponential(2)}`);
    await engine.unmergeAdapter();
    const baseAfter = (await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" })).logits!;
    assert.equal(baseAfter, baseBefore);
  } finally {
    await engine.unmergeAdapter();
    engine.unloadAdapter("m");
  }
});

test("weights larger than a storage binding run as row blocks: MiLoRA prefill and decode match the reference, merging folds every block", async () => {
  // A 20 KB binding splits gate/up_proj [176, 64] into blocks of 78 rows, down_proj [64, 176] (with its
  // residual) into blocks of 28, and the embedding and lm_head [97, 64] into blocks of 78.
  const split = await Engine.load(plannedEngine({ base, checkpointDir, gpu, ctx: 64, maxSequences: 1, maxAdapters: 1, maxLoraRank: 8, maxBindingBytes: 20_000 }));
  try {
    await matchesReference(milora({ pooling: "mean" }, 61, "split"), split);
    split.loadAdapter("lora", randomAdapter({ spec: peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name: "lora" }), seed: 62 }));
    const unmerged = await split.generate({ prompt: PROMPT, maxTokens: 2, logits: "all", adapter: "lora" });
    await split.mergeAdapter("lora");
    const merged = await split.generate({ prompt: PROMPT, maxTokens: 2, logits: "all" });
    const err = relativeError(merged.logits!, unmerged.logits!.map((row) => Float64Array.from(row)));
    assert.ok(err < BOUND, `merged into split weights: relative error ${err.toExponential(2)}`);
    await split.unmergeAdapter();
  } finally {
    split.destroy();
  }
  // A 40 KB binding still splits gate/up_proj (45 KB) but lets a step hold a 40-row prompt: past the
  // matvec's row limit, so the blocks run through the prefill matmul too.
  const wide = await Engine.load(plannedEngine({ base, checkpointDir, gpu, ctx: 64, maxSequences: 1, maxAdapters: 1, maxLoraRank: 8, maxBindingBytes: 40_000 }));
  try {
    const long = Array.from({ length: 40 }, (_, i) => (i * 37 + 5) % base.vocabSize);
    await matchesReference(milora({ pooling: "mean" }, 63, "split-long"), wide, long);
  } finally {
    wide.destroy();
  }
});

test("refusals: a chunked routed prompt whose hidden states exceed a binding, unloading an adapter in use, a rank above the engine's, merging token routing", async () => {
  const small = await Engine.load(plannedEngine({ base, checkpointDir, gpu, ctx: 64, maxSequences: 1, maxBatchRows: 8, maxLoraRank: 4 }));
  try {
    assert.throws(() => small.loadAdapter("big", milora({}, 51)), /rank 8, above the engine's largest LoRA rank 4/);
    small.loadAdapter("a", milora({}, 52, "a", 4));
    const seq = small.createSequence(PROMPT, { adapter: "a" });
    assert.throws(() => small.unloadAdapter("a"), /used by 1 live sequence/);
    small.release(seq);
    small.unloadAdapter("a");
    small.loadAdapter("t", milora({ when: "token" }, 53, "t", 4));
    await small.mergeAdapter("t").then(
      () => assert.unreachable("merged a token-routed adapter"),
      (e: Error) => assert.match(e.message, /routes every token/),
    );
  } finally {
    small.destroy();
  }
  // A 9000-byte binding: steps of 12 rows (the 176-wide MLP activation), and a routed prompt's hidden
  // states [tokens, 64] fit it up to 35 tokens.
  const narrow = await Engine.load(plannedEngine({ base, checkpointDir, gpu, ctx: 64, maxSequences: 1, maxAdapters: 1, maxLoraRank: 4, maxBindingBytes: 9000 }));
  try {
    narrow.loadAdapter("a", milora({}, 54, "a", 4));
    assert.throws(() => narrow.createSequence(LONG.concat(LONG).slice(0, 36), { adapter: "a" }), (e: unknown) => e instanceof EngineError && /must fit one storage binding/.test((e as Error).message));
    narrow.release(narrow.createSequence(LONG.concat(LONG).slice(0, 35), { adapter: "a" }));
  } finally {
    narrow.destroy();
  }
});

test.run();
