import { test } from "uvu";
import * as assert from "uvu/assert";
import { ROUTER_DEFAULTS } from "../../compiler/defaults.ts";
import type { Adapter, ExpertModule, RouterConfig, Selection } from "../../compiler/model.ts";
import { peftSpec, randomAdapter } from "../../examples/random-adapter.ts";
import { randomCheckpointBase, randomWeights } from "../../examples/random-checkpoint.ts";
import type { LoadedAdapter, RouterWeights } from "../../runtime/formats/adapter.ts";
import { referenceLogits, softmax, weightsFromMap } from "./llama.ts";
import { activate, erf, foldLora, gelu, pool, rational, referenceMiloraGreedy, referenceMiloraLogits, routerGates, select, type RoutingDecision } from "./milora.ts";

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

const topK = (k: number, renormalize = false): Selection => ({ rule: "top_k", k, renormalize });
const threshold = (t: number, renormalize = false): Selection => ({ rule: "threshold", threshold: t, renormalize });

test("top_k (eq. 3) keeps the k largest logits (ties to the lower index) at their softmax probability over all", () => {
  const z = [0, 2, 1, -1];
  const e = z.map(Math.exp);
  const total = e.reduce((a, b) => a + b, 0);
  assert.ok(near(select(z, topK(2)), [0, e[1]! / total, e[2]! / total, 0]));
  // The chosen gates sum to less than 1: here (e^2 + e) / (1 + e^2 + e + e^-1).
  assert.ok(select(z, topK(2)).reduce((a, b) => a + b, 0) < 0.92);
  // Three experts tie at 3 (probability e^3 / (e + 3 e^3) each): the lower indices win.
  const tie = Math.exp(3) / (Math.exp(1) + 3 * Math.exp(3));
  assert.ok(near(select([1, 3, 3, 3], topK(2)), [0, tie, tie, 0]));
});

test("top_k renormalize: softmax over the chosen logits, gates sum to 1", () => {
  const z = [0, 2, 1, -1];
  const e = Math.exp(1);
  assert.ok(near(select(z, topK(2, true)), [0, e / (e + 1), 1 / (e + 1), 0]));
  assert.equal(select([1, 3, 2, 3], topK(1, true)), [0, 1, 0, 0]);
  assert.equal(select([1, 3, 2, 3], topK(2, true)), [0, 0.5, 0, 0.5]);
});

test("threshold keeps experts whose probability reaches it (at least the argmax): as they are, or renormalised", () => {
  const z = [0.5, 0.3, 0.15, 0.05].map(Math.log);
  assert.ok(near(select(z, threshold(0.2)), [0.5, 0.3, 0, 0]));
  assert.ok(near(select(z, threshold(0.15)), [0.5, 0.3, 0.15, 0]));
  assert.ok(near(select(z, threshold(0.9)), [0.5, 0, 0, 0]));
  assert.ok(near(select(z, threshold(0.2, true)), [0.5 / 0.8, 0.3 / 0.8, 0, 0]));
  assert.ok(near(select(z, threshold(0.15, true)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]));
  assert.equal(select(z, threshold(0.9, true)), [1, 0, 0, 0]);
});

test("the rational activation is sum a_j x^j / (1 + |sum b_i x^i|), elementwise", () => {
  // a = (1, 2, 3), b = (-1, 0.5): at x = 2, (1 + 4 + 12) / (1 + |-2 + 2|) = 17; at x = -1, 2 / (1 + 1.5).
  assert.is(rational(2, [1, 2, 3], [-1, 0.5]), 17);
  assert.is(rational(-1, [1, 2, 3], [-1, 0.5]), 2 / 2.5);
  assert.is(rational(3, [0, 1], []), 3);
  const coefficients = { numerator: Float32Array.of(1, 2, 3), denominator: Float32Array.of(-1, 0.5) };
  assert.equal([...activate(Float64Array.of(2, -1), "rational", coefficients)], [17, 0.8]);
  assert.equal([...activate(Float64Array.of(2, -1), "relu")], [2, 0]);
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
  // Eq. 8 with w_sa = (1, -2): u = (0.2 - 2, 2 - 1, -1) = (-1.8, 1, -1), a = softmax(u), p = sum a_t h_t.
  const a = softmax([-1.8, 1, -1]);
  const expected = [0, 1].map((i) => rows.reduce((s, r, t) => s + a[t]! * r[i]!, 0));
  assert.ok(near(pool(rows, "attention", Float32Array.of(1, -2)), expected));
});

test("the activation acts on the pooled vector (eq. 3), not on the tokens before pooling", () => {
  // relu(mean(h)) = relu((2 - 4) / 2) = 0 for feature 0, where mean(relu(h)) would be 1.
  const router: RouterWeights = { gate: Float32Array.of(1, 0, 0, 1), experts: ["q_proj", "v_proj"] };
  const config: RouterConfig = { ...ROUTER_DEFAULTS, pooling: "mean", activation: "relu", selection: { rule: "dense" } };
  const p = pool([Float64Array.of(2, 0.5), Float64Array.of(-4, 0.5)], "mean");
  const gates = routerGates(router, config, p);
  // Logits (relu(-1), relu(0.5)) = (0, 0.5).
  assert.ok(near([gates.q_proj!, gates.v_proj!], softmax([0, 0.5])));
});

test("a router picks experts by its gate rows and names them by module", () => {
  // Rows: q_proj likes feature 0, v_proj feature 1, down_proj the negative of feature 0.
  const router: RouterWeights = { gate: Float32Array.of(1, 0, 0, 1, -1, 0), experts: ["q_proj", "v_proj", "down_proj"] };
  const config = (pooling: RouterConfig["pooling"], selection: Selection): RouterConfig => ({ ...routed({}).spec.router!, pooling, selection });
  const rows = [Float64Array.of(-3, 1), Float64Array.of(2, 0.5)];
  const gates = (pooling: RouterConfig["pooling"], selection: Selection) => routerGates(router, config(pooling, selection), pool(rows, pooling));
  assert.equal(gates("last", topK(1, true)), { q_proj: 1 });
  // Paper form: the one gate is q_proj's probability, softmax(2, 0.5, -2)[0].
  assert.ok(Math.abs(gates("last", topK(1)).q_proj! - softmax([2, 0.5, -2])[0]!) < 1e-15);
  assert.equal(Object.keys(gates("mean", topK(2))), ["v_proj", "down_proj"]);
  const dense = gates("max", { rule: "dense" });
  assert.equal(Object.keys(dense), ["q_proj", "v_proj", "down_proj"]);
  assert.ok(Math.abs(Object.values(dense).reduce((a, b) => a + b, 0) - 1) < 1e-15);
});

test("random routers send different prompts to different experts", () => {
  const adapter = routed({ pooling: "last", selection: topK(2) });
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
  const selections: Selection[] = [topK(3), topK(3, true), threshold(0.2), threshold(0.2, true), { rule: "dense" }];
  for (const selection of selections) {
    const name = JSON.stringify(selection);
    const adapter = routed({ pooling: "attention", activation: "rational", rational: { numerator: 6, denominator: 5 }, selection });
    const result = referenceMiloraLogits(base, weights, adapter, prompt, [3]);
    // Renormalised and dense gates sum to 1; the paper's top_k / threshold gates to less (or 1 when all are kept).
    const sumsToOne = selection.rule === "dense" || selection.renormalize;
    for (const d of result.routing) assert.ok(sumsToOne ? Math.abs(gateSum(d) - 1) < 1e-12 : gateSum(d) < 1 - 1e-6, `${name}: gates sum ${gateSum(d)}`);
    if (selection.rule === "top_k") assert.ok(result.routing.every((d) => Object.keys(d.experts).length === 3));
    if (selection.rule === "dense") assert.ok(result.routing.every((d) => Object.keys(d.experts).length === 7));
    const folded = foldLora(weights, adapter, result.routing);
    assert.ok(maxDiff(result.logits, referenceLogits(base, folded, [...prompt, 3])) < 1e-10, name);
  }
});

test("the paper's gates and the renormalised ones choose the same experts; only the gate values differ", () => {
  const paper = referenceMiloraLogits(base, weights, routed({ pooling: "mean", selection: topK(2) }), prompt);
  const renormalized = referenceMiloraLogits(base, weights, routed({ pooling: "mean", selection: topK(2, true) }), prompt);
  // Layer 0 reads the embeddings, the same in both: its two gates differ exactly by their sum.
  const [p0, r0] = [paper.routing[0]!, renormalized.routing[0]!];
  assert.is(chosen(p0), chosen(r0));
  for (const [m, g] of Object.entries(p0.experts)) assert.ok(Math.abs(g / gateSum(p0) - r0.experts[m as ExpertModule]!) < 1e-12);
});

test("prompt routing is decided once: decode keeps the prompt's gates even where a recompute would differ", () => {
  const adapter = routed({ pooling: "mean", selection: topK(2) });
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
  const adapter = routed({ when: "token", selection: topK(2, true) });
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
