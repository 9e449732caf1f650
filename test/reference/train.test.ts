// The training reference checked two ways: its loss against the forward reference (llama.ts), and its
// gradients against central finite differences of the loss itself, for plain LoRA and each router kind.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { ROUTER_DEFAULTS } from "../../compiler/defaults.ts";
import { EXPERT_MODULES, type Adapter, type ExpertModule, type RouterConfig } from "../../compiler/model.ts";
import { peftSpec, randomAdapter } from "../../examples/random-adapter.ts";
import { mulberry32, randomCheckpointBase, randomWeights } from "../../examples/random-checkpoint.ts";
import { Tape } from "./autodiff.ts";
import { hfModuleName, moduleShape, referenceLogits, weightsFromMap } from "./llama.ts";
import { referenceMiloraLogits } from "./milora.ts";
import { IGNORE, referenceTrainLoss, type ReferenceLora, type ReferenceRouter, type ReferenceRouting, type ReferenceTrainAdapter, type TrainExample } from "./train.ts";

const paper: ReferenceRouting = { pooling: "attention", activation: "rational", selection: { rule: "top_k", k: 2 }, renormalize: false, when: "prompt" };
const base = randomCheckpointBase({ hiddenSize: 8, layers: 2, heads: 2, kvHeads: 1, intermediateSize: 12, vocabSize: 16, seed: 4 });
const weights = weightsFromMap(new Map(randomWeights(base, 4).map((t) => [t.name, Float64Array.from(t.data)])));
const random = mulberry32(99);
const values = (n: number, scale: number) => Float64Array.from({ length: n }, () => (random() * 2 - 1) * scale);

// A prompt/completion pair and a second example with a longer prompt: the routers read 3 and 4 tokens.
const batch: TrainExample[] = [
  { tokens: [1, 5, 9, 2, 7, 3], labels: [IGNORE, IGNORE, IGNORE, 2, 7, 3] },
  { tokens: [4, 4, 11, 6, 15], labels: [IGNORE, IGNORE, IGNORE, IGNORE, 15] },
];

function lora(modules: readonly ExpertModule[], rank: number): Map<string, ReferenceLora> {
  const out = new Map<string, ReferenceLora>();
  for (let layer = 0; layer < base.layers; layer++)
    for (const module of modules) {
      const [o, i] = moduleShape(base, module);
      out.set(`${layer}.${module}`, { a: values(rank * i, 0.5), b: values(o * rank, 0.5), rank, scaling: 2 });
    }
  return out;
}

function routers(pooler: boolean, rational: boolean): Map<number, ReferenceRouter> {
  return new Map(
    [0, 1].map((layer) => [
      layer,
      {
        experts: EXPERT_MODULES,
        gate: values(EXPERT_MODULES.length * base.hiddenSize, 1),
        ...(pooler ? { pooler: values(base.hiddenSize, 1) } : {}),
        ...(rational ? { rational: { numerator: values(7, 0.5), denominator: values(5, 0.5) } } : {}),
      },
    ]),
  );
}

test("the loss of the base with LoRA equals the forward reference's cross-entropy on the folded weights", () => {
  const adapter: ReferenceTrainAdapter = { lora: lora(["q_proj", "down_proj"], 2), balance: 0 };
  const got = referenceTrainLoss(base, weights, adapter, batch);
  // W + scaling * B A per module, then plain logits: an independent path to the same loss.
  const folded = new Map<string, Float64Array>();
  for (const [key, l] of adapter.lora) {
    const [layer, module] = key.split(".") as [string, ExpertModule];
    const name = `${hfModuleName(Number(layer), module)}.weight`;
    const w = weights.get(name).slice();
    const [out, inFeatures] = moduleShape(base, module);
    for (let o = 0; o < out; o++)
      for (let i = 0; i < inFeatures; i++)
        for (let j = 0; j < l.rank; j++) w[o * inFeatures + i] = w[o * inFeatures + i]! + l.scaling * l.b[o * l.rank + j]! * l.a[j * inFeatures + i]!;
    folded.set(name, w);
  }
  const foldedWeights = { get: (name: string) => folded.get(name) ?? weights.get(name) };
  let total = 0;
  let count = 0;
  for (const ex of batch) {
    const logits = referenceLogits(base, foldedWeights, ex.tokens);
    for (let t = 0; t + 1 < ex.tokens.length; t++) {
      const label = ex.labels[t + 1]!;
      if (label === IGNORE) continue;
      const row = logits[t]!;
      const max = Math.max(...row);
      total += max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0)) - row[label]!;
      count++;
    }
  }
  assert.is(got.supervised, count);
  assert.ok(Math.abs(got.lmLoss - total / count) < 1e-12, `${got.lmLoss} vs ${total / count}`);
  assert.is(got.balanceLoss, 0);
});

test("with routers, the loss and the gates equal the forward MiLoRA reference's (milora.ts) on the same adapter", () => {
  const config: RouterConfig = { ...ROUTER_DEFAULTS, noise: false, balance: 0.01, pooling: "attention", activation: "rational", rational: { numerator: 6, denominator: 5 }, selection: { rule: "top_k", k: 2, renormalize: false } };
  const spec: Adapter = { ...peftSpec({ base, modules: EXPERT_MODULES, rank: 2, alpha: 4, seed: 0 }), router: config };
  const adapter = randomAdapter({ spec, seed: 3 });
  const got = referenceTrainLoss(base, weights, {
    lora: new Map([...adapter.lora].map(([key, w]): [string, ReferenceLora] => [key, { a: Float64Array.from(w.a), b: Float64Array.from(w.b), rank: w.rank, scaling: w.scaling }])),
    routers: new Map(
      [...adapter.router!].map(([layer, r]): [number, ReferenceRouter] => [
        layer,
        { experts: r.experts, gate: Float64Array.from(r.gate), pooler: Float64Array.from(r.pooler!), rational: { numerator: Float64Array.from(r.rational!.numerator), denominator: Float64Array.from(r.rational!.denominator) } },
      ]),
    ),
    routing: paper,
    balance: 0,
  }, batch);
  let total = 0;
  let count = 0;
  batch.forEach((ex, s) => {
    const prompt = ex.labels.findIndex((l) => l !== IGNORE);
    const forward = referenceMiloraLogits(base, weights, adapter, ex.tokens.slice(0, prompt), ex.tokens.slice(prompt));
    for (const d of forward.routing) {
      const gates = got.gates.get(d.layer)![s]!;
      EXPERT_MODULES.forEach((m, e) => assert.ok(Math.abs((d.experts[m] ?? 0) - gates[e]!) < 1e-12, `sequence ${s} layer ${d.layer} ${m}`));
    }
    for (let t = 0; t + 1 < ex.tokens.length; t++) {
      const label = ex.labels[t + 1]!;
      if (label === IGNORE) continue;
      const row = forward.logits[t]!;
      const max = Math.max(...row);
      total += max + Math.log(row.reduce((a, v) => a + Math.exp(v - max), 0)) - row[label]!;
      count++;
    }
  });
  assert.ok(Math.abs(got.lmLoss - total / count) < 1e-10, `${got.lmLoss} vs ${total / count}`);
});

/** Central differences of the loss in a few elements of every trainable tensor, against the tape's gradient. */
function checkGradients(adapter: ReferenceTrainAdapter, what: string): void {
  const result = referenceTrainLoss(base, weights, adapter, batch);
  const lossWith = (mutate: () => void, undo: () => void) => {
    mutate();
    const l = referenceTrainLoss(base, weights, adapter, batch).loss;
    undo();
    return l;
  };
  const h = 1e-5;
  const check = (name: string, tensor: Float64Array, grad: Float64Array) => {
    for (const i of [0, Math.floor(tensor.length / 2), tensor.length - 1]) {
      const v = tensor[i]!;
      const up = lossWith(() => (tensor[i] = v + h), () => (tensor[i] = v));
      const down = lossWith(() => (tensor[i] = v - h), () => (tensor[i] = v));
      const numeric = (up - down) / (2 * h);
      // Central differences err by O(h^2) ~ 1e-10 times third derivatives; float64 rounding adds ~1e-11 / h.
      assert.ok(Math.abs(numeric - grad[i]!) <= 1e-6 * Math.max(1, Math.abs(numeric)), `${what}: ${name}[${i}] tape ${grad[i]} vs differences ${numeric}`);
    }
  };
  for (const [key, l] of adapter.lora) {
    check(`${key}.lora_A`, l.a as Float64Array, result.lora.get(key)!.a);
    check(`${key}.lora_B`, l.b as Float64Array, result.lora.get(key)!.b);
  }
  for (const [layer, r] of adapter.routers ?? []) {
    const g = result.routers.get(layer)!;
    check(`router ${layer} gate`, r.gate, g.gate);
    if (r.pooler) check(`router ${layer} pooler`, r.pooler, g.pooler!);
    if (r.rational) {
      check(`router ${layer} numerator`, r.rational.numerator, g.numerator!);
      check(`router ${layer} denominator`, r.rational.denominator, g.denominator!);
    }
  }
}


test("gradients of plain LoRA on every module match finite differences", () => {
  // B starts at zero in training; random B here so that A's gradient is not zero too.
  checkGradients({ lora: lora(EXPERT_MODULES, 2), balance: 0 }, "plain LoRA");
});

test("gradients of MiLoRA as in the paper (attention pooler, rational activation, top-2 probabilities, balance loss)", () => {
  checkGradients({ lora: lora(EXPERT_MODULES, 2), routers: routers(true, true), routing: paper, balance: 0.01 }, "paper");
});

test("gradients with renormalised gates, mean pooling and GELU; with threshold, max pooling and ReLU", () => {
  checkGradients({ lora: lora(EXPERT_MODULES, 1), routers: routers(false, false), routing: { ...paper, pooling: "mean", activation: "gelu", renormalize: true }, balance: 0.1 }, "renormalised");
  checkGradients(
    { lora: lora(EXPERT_MODULES, 1), routers: routers(false, false), routing: { ...paper, pooling: "max", activation: "relu", selection: { rule: "threshold", threshold: 0.1 } }, balance: 0.1 },
    "threshold",
  );
});

test("gradients of per-token routing (the baseline) with the last-token router input", () => {
  checkGradients({ lora: lora(["q_proj", "v_proj", "up_proj"], 2), routers: routers(false, false), routing: { ...paper, pooling: "last", activation: "none", when: "token" }, balance: 0.01 }, "token");
});

test("the balance loss is N * sum f_i P_i per layer, averaged: 1 when routing is uniform", () => {
  // Zero router weights give uniform probabilities 1/N, so sum_i f_i P_i = 1/N whatever f is.
  const flat = routers(false, false);
  for (const r of flat.values()) (r.gate as Float64Array).fill(0);
  const got = referenceTrainLoss(base, weights, { lora: lora(["q_proj"], 1), routers: flat, routing: { ...paper, pooling: "mean", activation: "none" }, balance: 1 }, batch);
  assert.ok(Math.abs(got.balanceLoss - 1) < 1e-12, `${got.balanceLoss}`);
  assert.ok(Math.abs(got.loss - got.lmLoss - 1) < 1e-12);
  // Top-2 of equal probabilities: the two lowest expert indices, each keeping probability 1/7.
  for (const gates of got.gates.values()) for (const g of gates) assert.equal(g.map((x) => +x.toFixed(12)), [1 / 7, 1 / 7, 0, 0, 0, 0, 0].map((x) => +x.toFixed(12)));
});

test("the tape's chain rule on a small expression with shared subterms", () => {
  const t = new Tape();
  const [x, y] = [t.leaf(0.7), t.leaf(-1.3)];
  const u = t.mul(x, y);
  const f = t.add(t.exp(u), t.div(t.sqrt(t.shift(t.mul(x, x), 1)), t.sigmoid(y))); // e^(xy) + sqrt(x^2 + 1) / sigmoid(y)
  const g = t.backward(f);
  const s = 1 / (1 + Math.exp(1.3));
  assert.ok(Math.abs(g[x]! - (-1.3 * Math.exp(-0.91) + 0.7 / Math.sqrt(1.49) / s)) < 1e-12);
  assert.ok(Math.abs(g[y]! - (0.7 * Math.exp(-0.91) - (Math.sqrt(1.49) * (1 - s)) / s)) < 1e-12);
});

test.run();
