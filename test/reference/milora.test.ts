import { test } from "uvu";
import * as assert from "uvu/assert";
import { ROUTER_DEFAULTS } from "../../compiler/defaults.ts";
import type { Adapter, ExpertModule, RouterConfig, Selection } from "../../compiler/model.ts";
import { peftSpec, randomAdapter } from "../../examples/random-adapter.ts";
import { randomCheckpointBase, randomWeights } from "../../examples/random-checkpoint.ts";
import type { LoadedAdapter, RouterWeights } from "../../runtime/adapter.ts";
import { referenceLogits, softmax, weightsFromMap } from "./llama.ts";
import { erf, foldLora, gelu, pool, referenceMiloraGreedy, referenceMiloraLogits, routerGates, select, type RoutingDecision } from "./milora.ts";

const base = randomCheckpointBase({ hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 64, seed: 11 });
const weights = weightsFromMap(new Map(randomWeights(base, 11).map((t) => [t.name, Float64Array.from(t.data)])));
const prompt = [5, 17, 33, 2, 60, 41];
const ALL: ExpertModule[] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

function routed(overrides: Partial<RouterConfig>, seed = 7): LoadedAdapter {
  const router: RouterConfig = {
    ...ROUTER_DEFAULTS,
    noise: false,
    ...overrides,
  };
  const spec: Adapter = { ...peftSpec({ base, modules: ALL, rank: 4, alpha: 8, seed: 0, name: "mix" }), router };
  return randomAdapter({ spec, seed });
}

function maxDiff(a: readonly Float64Array[], b: readonly Float64Array[]): number {
  assert.is(a.length, b.length);
  return Math.max(...a.map((row, t) => Math.max(...row.map((x, i) => Math.abs(x - b[t]![i]!)))));
}

/** Element-wise equality to within `tol`. */
function near(a: ArrayLike<number>, b: ArrayLike<number>, tol = 1e-15): boolean {
  return a.length === b.length && Array.from(a).every((x, i) => Math.abs(x - b[i]!) <= tol);
}

const chosen = (d: RoutingDecision) => Object.keys(d.experts).join(",");
const gateSum = (d: RoutingDecision) => Object.values(d.experts).reduce((s, g) => s + g, 0);

test("erf and gelu agree with their known values", () => {
  // erf(0.5), erf(2) and Phi(1) = (1 + erf(1/sqrt 2)) / 2 to 16 digits.
  assert.ok(Math.abs(erf(0.5) - 0.5204998778130465) < 1e-15);
  assert.ok(Math.abs(erf(-2) + 0.9953222650189527) < 1e-15);
  assert.ok(Math.abs(gelu(1) - 0.8413447460685429) < 1e-15);
  assert.is(erf(7), 1);
});

test("top_k keeps the k largest logits (ties to the lower index) and softmaxes over them", () => {
  const z = [0, 2, 1, -1];
  const e = Math.exp(1);
  assert.ok(near(select(z, { rule: "top_k", k: 2 }), [0, e / (e + 1), 1 / (e + 1), 0]));
  assert.equal(select([1, 3, 2, 3], { rule: "top_k", k: 1 }), [0, 1, 0, 0]);
  assert.equal(select([1, 3, 2, 3], { rule: "top_k", k: 2 }), [0, 0.5, 0, 0.5]);
});

test("threshold keeps experts whose probability reaches it (at least the argmax) and renormalises", () => {
  const z = [0.5, 0.3, 0.15, 0.05].map(Math.log);
  assert.ok(near(select(z, { rule: "threshold", threshold: 0.2 }), [0.5 / 0.8, 0.3 / 0.8, 0, 0]));
  assert.ok(near(select(z, { rule: "threshold", threshold: 0.15 }), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]));
  assert.equal(select(z, { rule: "threshold", threshold: 0.9 }), [1, 0, 0, 0]);
});

test("dense gives every expert its softmax probability", () => {
  const z = [1, -2, 0.5];
  const gates = select(z, { rule: "dense" });
  const e = z.map(Math.exp);
  const total = e.reduce((a, b) => a + b, 0);
  assert.ok(near(gates, e.map((x) => x / total)));
  assert.ok(Math.abs(gates.reduce((a, b) => a + b, 0) - 1) < 1e-15);
});

test("pooling over the prompt: last, mean, max and the attention pooler", () => {
  const rows = [Float64Array.of(0.2, 1), Float64Array.of(2, 0.5), Float64Array.of(-1, 0)];
  assert.equal([...pool(rows, "last")], [-1, 0]);
  assert.ok(near(pool(rows, "mean"), [(0.2 + 2 - 1) / 3, 1.5 / 3]));
  assert.equal([...pool(rows, "max")], [2, 1]);
  // Identity projection and v = (1, 0): token t weighs exp(tanh(h_t[0])).
  const pooler = { proj: Float32Array.of(1, 0, 0, 1), v: Float32Array.of(1, 0) };
  const w = softmax(rows.map((r) => Math.tanh(r[0]!)));
  const expected = [0, 1].map((i) => rows.reduce((s, r, t) => s + w[t]! * r[i]!, 0));
  assert.ok(near(pool(rows, "attention", pooler), expected));
});

test("a router picks experts by its gate rows and names them by module", () => {
  // Rows: q_proj likes feature 0, v_proj feature 1, down_proj the negative of feature 0.
  const router: RouterWeights = { gate: Float32Array.of(1, 0, 0, 1, -1, 0), experts: ["q_proj", "v_proj", "down_proj"] };
  const config = (pooling: RouterConfig["pooling"], selection: Selection): RouterConfig => ({ ...routed({}).spec.router!, pooling, selection });
  const rows = [Float64Array.of(-3, 1), Float64Array.of(2, 0.5)];
  assert.equal(routerGates(router, config("last", { rule: "top_k", k: 1 }), rows), { q_proj: 1 });
  assert.equal(Object.keys(routerGates(router, config("mean", { rule: "top_k", k: 2 }), rows)), ["v_proj", "down_proj"]);
  const dense = routerGates(router, config("max", { rule: "dense" }), rows);
  assert.equal(Object.keys(dense), ["q_proj", "v_proj", "down_proj"]);
  assert.ok(Math.abs(Object.values(dense).reduce((a, b) => a + b, 0) - 1) < 1e-15);
});

test("random routers send different prompts to different experts", () => {
  const adapter = routed({ pooling: "last", selection: { rule: "top_k", k: 2 } });
  const decisions = [prompt, [40, 12, 7], [63, 0, 22, 18]].map((p) => referenceMiloraLogits(base, weights, adapter, p).routing.map(chosen).join(" | "));
  assert.is(new Set(decisions).size, 3, decisions.join("\n"));
});

test("with B = 0 the adapter changes nothing: the logits are the base reference's", () => {
  const adapter = routed({ pooling: "mean" });
  const zeroB: LoadedAdapter = { ...adapter, lora: new Map([...adapter.lora].map(([k, w]) => [k, { ...w, b: new Float32Array(w.b.length) }])) };
  const result = referenceMiloraLogits(base, weights, zeroB, prompt, [9, 9]);
  assert.is(maxDiff(result.logits, referenceLogits(base, weights, [...prompt, 9, 9])), 0);
  assert.is(result.routing.length, base.layers);
});

test("plain LoRA equals the base model with W + (alpha/r) B A folded in", () => {
  const adapter = randomAdapter({ spec: peftSpec({ base, modules: ["q_proj", "v_proj", "o_proj", "down_proj"], rank: 4, alpha: 8, seed: 0 }), seed: 3 });
  const tokens = [...prompt, 1, 2];
  const lora = referenceMiloraLogits(base, weights, adapter, prompt, [1, 2]);
  assert.equal(lora.routing, []);
  assert.ok(maxDiff(lora.logits, referenceLogits(base, foldLora(weights, adapter), tokens)) < 1e-10);
  assert.ok(maxDiff(lora.logits, referenceLogits(base, weights, tokens)) > 1e-2, "the LoRA must change the logits");
});

test("a prompt's routing decision folded into the weights gives the routed logits", () => {
  for (const selection of [{ rule: "top_k", k: 3 }, { rule: "threshold", threshold: 0.2 }, { rule: "dense" }] as const) {
    const adapter = routed({ pooling: "attention", activation: "gelu", selection });
    const result = referenceMiloraLogits(base, weights, adapter, prompt, [3]);
    for (const d of result.routing) assert.ok(Math.abs(gateSum(d) - 1) < 1e-12, `${selection.rule}: gates sum to 1`);
    if (selection.rule === "top_k") assert.ok(result.routing.every((d) => Object.keys(d.experts).length === 3));
    if (selection.rule === "dense") assert.ok(result.routing.every((d) => Object.keys(d.experts).length === 7));
    const folded = foldLora(weights, adapter, result.routing);
    assert.ok(maxDiff(result.logits, referenceLogits(base, folded, [...prompt, 3])) < 1e-10, selection.rule);
  }
});

test("prompt routing is decided once: decode keeps the prompt's gates even where a recompute would differ", () => {
  const adapter = routed({ pooling: "mean", selection: { rule: "top_k", k: 2 } });
  const atPrefill = referenceMiloraLogits(base, weights, adapter, prompt);
  // Find generated tokens after which routing over prompt + generated (as if all were prompt) differs.
  const generated = [0, 1, 2, 3, 4, 5, 6, 7].map((t) => [t * 8 + 3, t * 5 + 1]).find((g) => {
    const recomputed = referenceMiloraLogits(base, weights, adapter, [...prompt, ...g]).routing;
    return recomputed.some((d, i) => chosen(d) !== chosen(atPrefill.routing[i]!));
  });
  assert.ok(generated, "some continuation must change a recomputed decision");
  const decoding = referenceMiloraLogits(base, weights, adapter, prompt, generated);
  assert.equal(decoding.routing, atPrefill.routing);
  // Prompt positions are untouched by what follows, and generated positions use the prefill gates.
  assert.is(maxDiff(decoding.logits.slice(0, prompt.length), atPrefill.logits), 0);
  const recomputed = referenceMiloraLogits(base, weights, adapter, [...prompt, ...generated]);
  assert.ok(maxDiff(decoding.logits.slice(prompt.length), recomputed.logits.slice(prompt.length)) > 1e-6);
  const greedy = referenceMiloraGreedy(base, weights, adapter, prompt, 3);
  assert.is(greedy.tokens.length, 3);
  assert.equal(greedy.routing, atPrefill.routing);
});

test("token routing decides per position, and at the last prompt token matches last-token prompt routing in layer 0", () => {
  const adapter = routed({ when: "token", selection: { rule: "top_k", k: 2 } });
  const result = referenceMiloraLogits(base, weights, adapter, prompt, [7]);
  assert.is(result.routing.length, base.layers * (prompt.length + 1));
  for (let layer = 0; layer < base.layers; layer++) {
    const decisions = result.routing.filter((d) => d.layer === layer);
    assert.equal(decisions.map((d) => d.position), [0, 1, 2, 3, 4, 5, 6]);
    assert.ok(new Set(decisions.map(chosen)).size > 1, `layer ${layer}: positions route differently`);
    assert.ok(decisions.every((d) => Math.abs(gateSum(d) - 1) < 1e-12));
  }
  // Layer 0 reads the embeddings, which do not depend on any routing.
  const once = referenceMiloraLogits(base, weights, { ...adapter, spec: { ...adapter.spec, router: { ...adapter.spec.router!, when: "prompt" } } }, prompt);
  const lastPrompt = result.routing.find((d) => d.layer === 0 && d.position === prompt.length - 1)!;
  assert.equal(lastPrompt.experts, once.routing[0]!.experts);
  // Decode positions see only their prefix: appending a token leaves earlier logits as they were.
  const shorter = referenceMiloraLogits(base, weights, adapter, prompt);
  assert.is(maxDiff(result.logits.slice(0, prompt.length), shorter.logits), 0);
});

test.run();
