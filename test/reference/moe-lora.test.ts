// Checks of the per-token Mixture-of-LoRA reference (moe-lora.ts) against routes that do not go
// through it: plain LoRA (milora.ts with no router) where the mixture reduces to one, and per-token
// LoRA linears written here from the math and run through llama.ts's decoder. Everything is float64,
// so every comparison holds to 1e-12 in the logits (which are of order 1 to 10); the differences seen
// are rounding of differently ordered sums, at most 3e-15 here.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { EXPERT_MODULES, FFN_MODULES, storedRank, type Adapter, type BaseModel, type ExpertModule, type ExpertSlot, type MoeRouting } from "../../compiler/model.ts";
import { peftSpec } from "../../examples/random-adapter.ts";
import { randomCheckpointBase, randomWeights, seededNormal, type RandomFamily } from "../../examples/random-checkpoint.ts";
import { loraKey, moeRouterKey, type LoadedAdapter, type LoraKey, type LoraWeights, type MoeRouterKey } from "../../runtime/formats/adapter.ts";
import { argmax, baseLinear, matmulTransposed, referenceLogits, weightsFromMap, type LinearFn, type ReferenceWeights } from "./llama.ts";
import { referenceMiloraLogits, select } from "./milora.ts";
import { moeSelect, referenceMoeGreedy, referenceMoeLogits, type MoeDecision } from "./moe-lora.ts";

/** Every comparison of logits between two float64 routes. */
const TOL = 1e-12;

function model(family: RandomFamily = "llama", seed = 11): { base: BaseModel; weights: ReferenceWeights } {
  const base = randomCheckpointBase({ family, hiddenSize: 16, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 24, vocabSize: 48, seed });
  return { base, weights: weightsFromMap(new Map(randomWeights(base, seed).map((t) => [t.name, Float64Array.from(t.data)]))) };
}
const { base, weights } = model();
const tokens = [5, 17, 33, 2, 40, 41, 9, 26];
const ALL = EXPERT_MODULES;

const topK = (k: number, renormalize: boolean): MoeRouting["selection"] => ({ rule: "top_k", k, renormalize });
const DENSE: MoeRouting["selection"] = { rule: "dense" };

function maxDiff(a: readonly Float64Array[], b: readonly Float64Array[]): number {
  assert.is(a.length, b.length);
  return Math.max(...a.map((row, t) => Math.max(...row.map((x, i) => Math.abs(x - b[t]![i]!)))));
}

interface MoeOptions {
  readonly base?: BaseModel;
  readonly placement: MoeRouting["placement"];
  readonly experts: number;
  readonly selection: MoeRouting["selection"];
  /** The spec's rank: per_module splits it into the experts, per_ffn gives each expert this rank. */
  readonly rank: number;
  readonly modules?: readonly ExpertModule[];
  /** Modules per layer, overriding `modules`. */
  readonly layerModules?: readonly (readonly ExpertModule[])[];
  readonly seed: number;
  /** Routers of zeros: every expert equally probable. */
  readonly zeroRouters?: boolean;
  /** per_ffn: every expert of a module a copy of expert 0. */
  readonly identicalExperts?: boolean;
}

/** A per-token Mixture-of-LoRA adapter with seeded random weights, built in memory. */
function moeAdapter(o: MoeOptions): LoadedAdapter {
  const b0 = o.base ?? base;
  const layers = Array.from({ length: b0.layers }, (_, l) => l);
  const slots: ExpertSlot[] = layers.flatMap((layer) => {
    const modules = o.layerModules?.[layer] ?? o.modules ?? ALL;
    return peftSpec({ base: b0, modules, layers: [layer], rank: o.rank, alpha: 2 * o.rank, seed: 0 }).experts;
  });
  const moe: MoeRouting = { placement: o.placement, experts: o.experts, selection: o.selection, balance: 0.01 };
  const spec: Adapter = { ...peftSpec({ base: b0, modules: [], rank: o.rank, alpha: 2 * o.rank, seed: 0, name: "moe" }), layers, experts: slots, moe };
  const normal = seededNormal(o.seed);
  const gaussian = (length: number, std: number) => Float32Array.from({ length }, () => std * normal());
  const lora = new Map<LoraKey, LoraWeights>();
  const routers = new Map<MoeRouterKey, Float32Array>();
  for (const slot of slots) {
    const stored = storedRank(spec, slot);
    // Updates of about half the base output: s B A x ~ 0.5 W x.
    const std = 0.5 / (slot.scaling * Math.sqrt(stored));
    let a = gaussian(stored * slot.inFeatures, 1 / Math.sqrt(slot.inFeatures));
    let b = gaussian(slot.outFeatures * stored, std);
    if (o.identicalExperts && stored !== slot.rank) {
      const r = slot.rank;
      const a0 = a.slice(0, r * slot.inFeatures);
      a = Float32Array.from({ length: a.length }, (_, i) => a0[i % a0.length]!);
      b = Float32Array.from({ length: b.length }, (_, i) => b[Math.floor(i / stored) * stored + (i % stored) % r]!);
    }
    lora.set(loraKey(slot.layer, slot.module), { a, b, rank: stored, scaling: slot.scaling });
    if (o.placement === "per_module") routers.set(moeRouterKey(slot.layer, slot.module), router(o, slot.inFeatures, gaussian));
  }
  if (o.placement === "per_ffn") {
    for (const layer of layers) {
      if (slots.some((s) => s.layer === layer && FFN_MODULES.includes(s.module))) routers.set(moeRouterKey(layer, "ffn"), router(o, b0.hiddenSize, gaussian));
    }
  }
  return { name: "moe", spec, lora, moeRouters: routers };
}

/** Logits a few units apart, so that tokens choose differently and away from ties. */
function router(o: MoeOptions, inFeatures: number, gaussian: (length: number, std: number) => Float32Array): Float32Array {
  return o.zeroRouters ? new Float32Array(o.experts * inFeatures) : gaussian(o.experts * inFeatures, 4 / Math.sqrt(inFeatures));
}

/**
 * A plain LoRA adapter (no router: every module at gate 1) whose module m holds `pick(m, w)` of the
 * MoE adapter's weights w.
 */
function plainFrom(moe: LoadedAdapter, pick: (module: ExpertModule, w: LoraWeights) => LoraWeights): LoadedAdapter {
  const { moe: _, ...spec } = moe.spec;
  const lora = new Map([...moe.lora].map(([key, w]) => [key, pick(key.split(".")[1] as ExpertModule, w)] as const));
  return { name: "plain", spec, lora };
}

/** Ranks from .. to - 1 of a LoRA (rows of A, columns of B), at `scaling`. */
function ranks(w: LoraWeights, from: number, to: number, scaling: number): LoraWeights {
  const inF = w.a.length / w.rank;
  const out = w.b.length / w.rank;
  const r = to - from;
  const a = w.a.slice(from * inF, to * inF);
  const b = Float32Array.from({ length: out * r }, (_, i) => w.b[Math.floor(i / r) * w.rank + from + (i % r)]!);
  return { a, b, rank: r, scaling };
}

function plainLogits(adapter: LoadedAdapter, b0 = base, w0 = weights): Float64Array[] {
  assert.is(adapter.spec.moe, undefined);
  assert.is(adapter.spec.router, undefined);
  return referenceMiloraLogits(b0, w0, adapter, tokens).logits;
}

/** y = W x + s B A x for one row, from the LoRA's f32 weights; `from`/`to` pick ranks. */
function loraRow(y: Float64Array, w: LoraWeights, x: Float64Array, from = 0, to = w.rank): Float64Array {
  const a = Float64Array.from(w.a.slice(from * x.length, to * x.length));
  const out = y.length;
  const b = Float64Array.from({ length: out * (to - from) }, (_, i) => w.b[Math.floor(i / (to - from)) * w.rank + from + (i % (to - from))]!);
  const update = matmulTransposed(matmulTransposed([x], a, to - from), b, out)[0]!;
  return y.map((v, o) => v + w.scaling * update[o]!);
}

const routerArgmax = (r: Float32Array, x: Float64Array, experts: number) => argmax(matmulTransposed([x], Float64Array.from(r), experts)[0]!);
const distinct = (xs: readonly unknown[]) => new Set(xs.map((x) => JSON.stringify(x))).size;

// ---- selection ----

test("selection by hand: top_k keeps the largest p at p or renormalised, dense keeps all; the margin to the first dropped", () => {
  const p = [0.2, 0.4, 0.1, 0.3];
  const z = p.map(Math.log);
  const near = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]!) <= 1e-15);
  const k2 = moeSelect(z, topK(2, false));
  assert.equal(k2.experts, [1, 3]);
  assert.ok(near(k2.gates, [0.4, 0.3]), String(k2.gates));
  assert.ok(near(k2.probabilities, p));
  assert.ok(Math.abs(k2.margin - 0.1) < 1e-15);
  const k2r = moeSelect(z, topK(2, true));
  assert.equal(k2r.experts, [1, 3]);
  assert.ok(near(k2r.gates, [4 / 7, 3 / 7]), String(k2r.gates));
  const dense = moeSelect(z, DENSE);
  assert.equal(dense.experts, [1, 3, 0, 2]);
  assert.ok(near(dense.gates, [0.4, 0.3, 0.2, 0.1]));
  assert.is(dense.margin, Infinity);
  assert.is(moeSelect(z, topK(4, false)).margin, Infinity);
  assert.equal(moeSelect([3], topK(1, false)).gates, [1]);
  // Equal probabilities go to the lower index (torch.topk); the margin of a choice between equals is 0.
  const e = Math.E;
  const tie = moeSelect([0, 1, 1, 0], topK(3, true));
  assert.equal(tie.experts, [1, 2, 0]);
  assert.ok(near(tie.gates, [e / (2 * e + 1), e / (2 * e + 1), 1 / (2 * e + 1)]));
  assert.is(tie.margin, 0);
  assert.equal(moeSelect([0, 1, 1, 0], topK(1, true)).experts, [1]);
  assert.equal(moeSelect([0, 0, 0], topK(2, true)).gates, [0.5, 0.5]);
  assert.throws(() => moeSelect(z, topK(5, true)), /top_k 5 of 4/);
  assert.throws(() => moeSelect(z, topK(0, true)), /top_k 0/);
});

test("selection agrees with MiLoRA's select() gate for gate on random logits", () => {
  const normal = seededNormal(3);
  for (let n = 0; n < 50; n++) {
    const z = Array.from({ length: 6 }, () => 3 * normal());
    for (const selection of [topK(1, true), topK(2, false), topK(3, true), topK(6, false), DENSE]) {
      const choice = moeSelect(z, selection);
      const gates = z.map(() => 0);
      choice.experts.forEach((ex, i) => (gates[ex] = choice.gates[i]!));
      const theirs = select(z, selection);
      assert.ok(gates.every((g, i) => Math.abs(g - theirs[i]!) <= 1e-15), `${JSON.stringify(selection)}: ${gates} vs ${theirs}`);
      assert.ok(choice.margin >= 0);
    }
  }
});

// ---- per_module ----

test("per_module, dense over zero routers (every gate 1/E): plain LoRA at scaling s/E", () => {
  const E = 4;
  const moe = moeAdapter({ placement: "per_module", experts: E, selection: DENSE, rank: 8, seed: 1, zeroRouters: true });
  const result = referenceMoeLogits(base, weights, moe, tokens);
  assert.is(result.experts.length, base.layers * ALL.length * tokens.length);
  for (const d of result.experts) assert.ok(d.gates.every((g) => g === 1 / E));
  const plain = plainLogits(plainFrom(moe, (_, w) => ({ ...w, scaling: w.scaling / E })));
  assert.ok(maxDiff(result.logits, plain) < TOL, String(maxDiff(result.logits, plain)));
  assert.ok(maxDiff(result.logits, referenceLogits(base, weights, tokens)) > 1e-2, "the adapter must change the logits");
});

test("per_module over zero routers, top_k: the lowest experts win the tie, each owning a contiguous block of r/E ranks", () => {
  const E = 4;
  const r = 8;
  const cases = [
    { selection: topK(1, true), kept: 1, gate: 1 },
    { selection: topK(2, true), kept: 2, gate: 1 / 2 },
    { selection: topK(2, false), kept: 2, gate: 1 / 4 },
  ];
  for (const { selection, kept, gate } of cases) {
    const moe = moeAdapter({ placement: "per_module", experts: E, selection, rank: r, seed: 2, zeroRouters: true });
    const result = referenceMoeLogits(base, weights, moe, tokens);
    for (const d of result.experts) assert.equal(d.experts, [0, 1].slice(0, kept));
    // Experts 0 .. kept-1 are ranks 0 .. kept * r/E - 1, each at gate * s.
    const plain = plainLogits(plainFrom(moe, (_, w) => ranks(w, 0, (kept * r) / E, gate * w.scaling)));
    assert.ok(maxDiff(result.logits, plain) < TOL, `${JSON.stringify(selection)}: ${maxDiff(result.logits, plain)}`);
  }
});

test("per_module with one expert is plain LoRA; top_k E (either form) is dense", () => {
  const one = moeAdapter({ placement: "per_module", experts: 1, selection: topK(1, false), rank: 4, seed: 3 });
  assert.ok(maxDiff(referenceMoeLogits(base, weights, one, tokens).logits, plainLogits(plainFrom(one, (_, w) => w))) < TOL);
  const dense = referenceMoeLogits(base, weights, moeAdapter({ placement: "per_module", experts: 4, selection: DENSE, rank: 8, seed: 4 }), tokens);
  for (const renormalize of [true, false]) {
    const all = referenceMoeLogits(base, weights, moeAdapter({ placement: "per_module", experts: 4, selection: topK(4, renormalize), rank: 8, seed: 4 }), tokens);
    assert.ok(maxDiff(all.logits, dense.logits) < TOL);
    all.experts.forEach((d, i) => assert.equal(d.experts, dense.experts[i]!.experts));
  }
  // A random router's gates are the softmax, not 1/E: dense differs from plain LoRA at s/E.
  const uniform = plainFrom(moeAdapter({ placement: "per_module", experts: 4, selection: DENSE, rank: 8, seed: 4 }), (_, w) => ({ ...w, scaling: w.scaling / 4 }));
  assert.ok(maxDiff(dense.logits, plainLogits(uniform)) > 1e-3);
});

/**
 * A per-token LoRA linear written here: for each row x of a routed module, the expert e = argmax of
 * R x, then W x + s B_e A_e x on its block of ranks (top_k 1, renormalised: gate 1).
 */
function argmaxPerModule(b0: BaseModel, w0: ReferenceWeights, moe: LoadedAdapter, chosen: Map<string, number>): LinearFn {
  const plain = baseLinear(b0, w0);
  const E = moe.spec.moe!.experts;
  return (layer, module, x) => {
    const y = plain(layer, module, x);
    const w = moe.lora.get(loraKey(layer, module));
    if (!w) return y;
    const r = w.rank / E;
    return x.map((row, t) => {
      const e = routerArgmax(moe.moeRouters!.get(moeRouterKey(layer, module))!, row, E);
      chosen.set(`${layer}.${module}.${t}`, e);
      return loraRow(y[t]!, w, row, e * r, (e + 1) * r);
    });
  };
}

test("per_module top_k 1: per token and module, plain LoRA with the ranks of the argmax expert of that module's input", () => {
  for (const family of ["llama", "qwen2"] as const) {
    const { base: b0, weights: w0 } = model(family, 13);
    const moe = moeAdapter({ base: b0, placement: "per_module", experts: 4, selection: topK(1, true), rank: 8, seed: 5, modules: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"] });
    const result = referenceMoeLogits(b0, w0, moe, tokens);
    const chosen = new Map<string, number>();
    const expected = referenceLogits(b0, w0, tokens, argmaxPerModule(b0, w0, moe, chosen));
    assert.ok(maxDiff(result.logits, expected) < TOL, `${family}: ${maxDiff(result.logits, expected)}`);
    assert.is(result.experts.length, chosen.size);
    for (const d of result.experts) {
      assert.equal(d.experts, [chosen.get(`${d.layer}.${d.at}.${d.position}`)]);
      assert.equal(d.gates, [1]);
    }
    // Every routed module sends different tokens to different experts.
    for (const layer of [0, 1]) {
      for (const m of ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]) {
        const per = result.experts.filter((d) => d.layer === layer && d.at === m).map((d) => d.experts[0]);
        assert.ok(distinct(per) > 1, `${family} layer ${layer} ${m}: ${per}`);
      }
    }
  }
});

// ---- per_ffn ----

test("per_ffn with E identical experts and gates summing to 1 (top_k renormalised, dense): plain LoRA with that expert", () => {
  const E = 4;
  const r = 4;
  for (const selection of [topK(2, true), topK(1, true), DENSE]) {
    const moe = moeAdapter({ placement: "per_ffn", experts: E, selection, rank: r, seed: 6, identicalExperts: true });
    const result = referenceMoeLogits(base, weights, moe, tokens);
    assert.is(result.experts.length, base.layers * tokens.length);
    assert.ok(result.experts.every((d) => d.at === "ffn" && Math.abs(d.gates.reduce((a, b) => a + b, 0) - 1) < 1e-15));
    const plain = plainLogits(plainFrom(moe, (m, w) => (FFN_MODULES.includes(m) ? ranks(w, 0, r, w.scaling) : w)));
    assert.ok(maxDiff(result.logits, plain) < TOL, `${JSON.stringify(selection)}: ${maxDiff(result.logits, plain)}`);
    assert.ok(maxDiff(result.logits, referenceLogits(base, weights, tokens)) > 1e-2, "the adapter must change the logits");
  }
});

test("per_ffn without renormalize: identical experts under zero routers, top_k K of E, give K/E of the whole feed-forward output, base included", () => {
  const E = 4;
  const r = 2;
  const moe = moeAdapter({ placement: "per_ffn", experts: E, selection: topK(2, false), rank: r, seed: 7, identicalExperts: true, zeroRouters: true });
  const result = referenceMoeLogits(base, weights, moe, tokens);
  for (const d of result.experts) {
    assert.equal(d.experts, [0, 1]);
    assert.equal(d.gates, [1 / E, 1 / E]);
  }
  const plain = plainFrom(moe, (m, w) => (FFN_MODULES.includes(m) ? ranks(w, 0, r, w.scaling) : w));
  const lora: LinearFn = (layer, module, x) => {
    const y = baseLinear(base, weights)(layer, module, x).map((row, t) => loraRow(row, plain.lora.get(loraKey(layer, module))!, x[t]!));
    return module === "down_proj" ? y.map((row) => row.map((v) => (2 / E) * v)) : y;
  };
  const expected = referenceLogits(base, weights, tokens, lora);
  assert.ok(maxDiff(result.logits, expected) < TOL, String(maxDiff(result.logits, expected)));
});

/**
 * A MixLoRA feed-forward block for top_k 1 renormalised (gate 1), written here as LoRA linears run
 * through llama.ts's decoder: gate_proj's input is the MLP input u, whose argmax expert then serves
 * gate, up and down of that token; attention modules are plain LoRA.
 */
function argmaxPerFfn(b0: BaseModel, w0: ReferenceWeights, moe: LoadedAdapter, chosen: Map<string, number>): LinearFn {
  const plain = baseLinear(b0, w0);
  const E = moe.spec.moe!.experts;
  let expert: number[] = [];
  return (layer, module, x) => {
    const y = plain(layer, module, x);
    if (module === "gate_proj") expert = x.map((u, t) => {
      const e = routerArgmax(moe.moeRouters!.get(moeRouterKey(layer, "ffn"))!, u, E);
      chosen.set(`${layer}.${t}`, e);
      return e;
    });
    const w = moe.lora.get(loraKey(layer, module));
    if (!w) return y;
    if (!FFN_MODULES.includes(module)) return x.map((row, t) => loraRow(y[t]!, w, row));
    const r = w.rank / E;
    return x.map((row, t) => loraRow(y[t]!, w, row, expert[t]! * r, (expert[t]! + 1) * r));
  };
}

test("per_ffn top_k 1: per token, plain LoRA with the argmax expert of the MLP input (silu and gemma's gelu-tanh; a module left out is base only)", () => {
  const cases = [
    { family: "llama" as const, modules: ALL },
    { family: "gemma" as const, modules: ["q_proj", "v_proj", "gate_proj", "down_proj"] as ExpertModule[] },
    { family: "qwen2" as const, modules: ["k_proj", "up_proj"] as ExpertModule[] },
  ];
  for (const { family, modules } of cases) {
    const { base: b0, weights: w0 } = model(family, 17);
    const moe = moeAdapter({ base: b0, placement: "per_ffn", experts: 4, selection: topK(1, true), rank: 2, seed: 8, modules });
    const result = referenceMoeLogits(b0, w0, moe, tokens);
    const chosen = new Map<string, number>();
    const expected = referenceLogits(b0, w0, tokens, argmaxPerFfn(b0, w0, moe, chosen));
    assert.ok(maxDiff(result.logits, expected) < TOL, `${family}: ${maxDiff(result.logits, expected)}`);
    assert.is(result.experts.length, chosen.size);
    for (const d of result.experts) assert.equal(d.experts, [chosen.get(`${d.layer}.${d.position}`)]);
    for (const layer of [0, 1]) {
      const per = result.experts.filter((d) => d.layer === layer).map((d) => d.experts[0]);
      assert.ok(distinct(per) > 1, `${family} layer ${layer}: ${per}`);
    }
    // The experts differ: the mixture is not plain LoRA with expert 0.
    const first = plainFrom(moe, (m, w) => (FFN_MODULES.includes(m) ? ranks(w, 0, 2, w.scaling) : w));
    assert.ok(maxDiff(result.logits, plainLogits(first, b0, w0)) > 1e-3, family);
  }
});

test("per_ffn top_k 2 renormalised and not: the same experts, gates differing by their sum, the mixture's logits differing", () => {
  const make = (renormalize: boolean) => moeAdapter({ placement: "per_ffn", experts: 4, selection: topK(2, renormalize), rank: 2, seed: 9 });
  const paper = referenceMoeLogits(base, weights, make(false), tokens);
  const renorm = referenceMoeLogits(base, weights, make(true), tokens);
  // Layer 0 reads the same hidden states in both.
  paper.experts.filter((d) => d.layer === 0).forEach((d, i) => {
    const other = renorm.experts[i]!;
    assert.equal(d.experts, other.experts);
    const sum = d.gates[0]! + d.gates[1]!;
    assert.ok(sum < 1 - 1e-6);
    assert.ok(d.gates.every((g, j) => Math.abs(g / sum - other.gates[j]!) < 1e-15));
  });
  assert.ok(maxDiff(paper.logits, renorm.logits) > 1e-3);
});

test("per_ffn: a layer without MLP experts has no ffn router and is plain LoRA", () => {
  const r = 2;
  const moe = moeAdapter({ placement: "per_ffn", experts: 3, selection: topK(2, true), rank: r, seed: 10, identicalExperts: true, layerModules: [["q_proj", "v_proj"], ALL] });
  assert.ok(!moe.moeRouters!.has(moeRouterKey(0, "ffn")));
  const result = referenceMoeLogits(base, weights, moe, tokens);
  assert.ok(result.experts.every((d) => d.layer === 1));
  assert.is(result.experts.length, tokens.length);
  const plain = plainLogits(plainFrom(moe, (m, w) => (FFN_MODULES.includes(m) ? ranks(w, 0, r, w.scaling) : w)));
  assert.ok(maxDiff(result.logits, plain) < TOL);
});

// ---- both ----

test("routing is causal and greedy decoding recomputes per token; decisions come by layer, module, position", () => {
  for (const placement of ["per_module", "per_ffn"] as const) {
    const moe = moeAdapter({ placement, experts: 4, selection: topK(2, true), rank: 4, seed: 12 });
    const full = referenceMoeLogits(base, weights, moe, tokens);
    const prefix = referenceMoeLogits(base, weights, moe, tokens.slice(0, 5));
    assert.is(maxDiff(full.logits.slice(0, 5), prefix.logits), 0);
    const key = (d: MoeDecision) => [d.layer, d.at === "ffn" ? -1 : EXPERT_MODULES.indexOf(d.at), d.position];
    full.experts.forEach((d, i) => {
      if (i === 0) return;
      const [a, b] = [key(full.experts[i - 1]!), key(d)];
      assert.ok(a[0]! < b[0]! || (a[0] === b[0] && (a[1]! < b[1]! || (a[1] === b[1] && a[2]! < b[2]!))), `${a} before ${b}`);
    });
    const greedy = referenceMoeGreedy(base, weights, moe, tokens.slice(0, 4), 3);
    assert.is(greedy.tokens.length, 3);
    for (let i = 0; i < 3; i++) {
      const step = referenceMoeLogits(base, weights, moe, [...tokens.slice(0, 4), ...greedy.tokens.slice(0, i)]);
      assert.is(argmax(step.logits.at(-1)!), greedy.tokens[i]);
      if (i === 2) assert.equal(greedy.experts, step.experts);
    }
  }
});

test("malformed adapters are refused: no spec.moe, a routed module or MLP without its router, an unsplittable rank", () => {
  const moe = moeAdapter({ placement: "per_module", experts: 4, selection: topK(1, true), rank: 8, seed: 14 });
  assert.throws(() => referenceMoeLogits(base, weights, plainFrom(moe, (_, w) => w), tokens), /no per-token/);
  const noRouter = new Map(moe.moeRouters!);
  noRouter.delete(moeRouterKey(1, "v_proj"));
  assert.throws(() => referenceMoeLogits(base, weights, { ...moe, moeRouters: noRouter }, tokens), /layer 1 v_proj has LoRA weights but no per_module router/);
  const odd = moeAdapter({ placement: "per_module", experts: 3, selection: topK(1, true), rank: 8, seed: 14 });
  assert.throws(() => referenceMoeLogits(base, weights, odd, tokens), /does not split into 3 experts/);
  const ffn = moeAdapter({ placement: "per_ffn", experts: 2, selection: topK(1, true), rank: 2, seed: 14 });
  assert.throws(() => referenceMoeLogits(base, weights, { ...ffn, moeRouters: new Map() }, tokens), /layer 0 has per_ffn experts on gate_proj, up_proj, down_proj but no ffn router/);
  // The stacked rank must be E * r, as storedRank says.
  const lora = new Map(ffn.lora);
  lora.set(loraKey(0, "up_proj"), ranks(ffn.lora.get(loraKey(0, "up_proj"))!, 0, 2, 1));
  assert.throws(() => referenceMoeLogits(base, weights, { ...ffn, lora }, tokens), /holds rank 2, the spec stores rank 4/);
});

test.run();
