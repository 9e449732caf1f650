// The training reference's per-token baselines (test/reference/train.ts), per_module (MOELoRA / MoLoRA:
// a router per module over its rank's slices) and per_ffn (MixLoRA: a router per layer over the MLP
// modules' stacked experts), checked before the device is compared with it: its loss and every routing
// decision against the forward per-token reference (test/reference/moe-lora.ts, written separately from
// the math), its gradients of every lora_A, lora_B and router W against central finite differences of
// its own loss, and its balance loss on routers whose value is known. CPU only. (The file lives with the
// training tests it serves.)
import { test } from "uvu";
import * as assert from "uvu/assert";
import { EXPERT_MODULES, FFN_MODULES, type ExpertModule, type MoeRouting } from "../../../compiler/model.ts";
import { randomAdapter } from "../../../examples/random-adapter.ts";
import { randomCheckpointBase, randomWeights } from "../../../examples/random-checkpoint.ts";
import { moeRouterKey } from "../../../runtime/formats/adapter.ts";
import { weightsFromMap } from "../../reference/llama.ts";
import { referenceMoeLogits } from "../../reference/moe-lora.ts";
import { IGNORE, referenceTrainLoss, type ReferenceTrainAdapter, type TrainExample } from "../../reference/train.ts";
import { DENSE, PLACEMENTS, closestCall, moeSpec, referenceMoeAdapter, topK, type Placement } from "./reference-adapters.ts";

const base = randomCheckpointBase({ hiddenSize: 8, layers: 2, heads: 2, kvHeads: 1, intermediateSize: 12, vocabSize: 16, seed: 4 });
const weights = weightsFromMap(new Map(randomWeights(base, 4).map((t) => [t.name, Float64Array.from(t.data)])));

const batch: TrainExample[] = [
  { tokens: [1, 5, 9, 2, 7, 3], labels: [IGNORE, IGNORE, IGNORE, 2, 7, 3] },
  { tokens: [4, 4, 11, 6, 15], labels: [IGNORE, IGNORE, IGNORE, IGNORE, 15] },
];

/** What a test's random adapter differs in. */
interface AdapterOptions {
  readonly experts?: number;
  readonly rank?: number;
  readonly balance?: number;
  readonly modules?: readonly ExpertModule[];
  readonly seed?: number;
}

/** A random adapter of `placement` (4 experts of rank 4 split per module, or 4 experts of rank 2 per MLP module, unless given). */
function adapterOf(placement: Placement, selection: MoeRouting["selection"], o: AdapterOptions = {}) {
  const rank = o.rank ?? (placement === "per_ffn" ? 2 : 4);
  const spec = moeSpec({ placement, base, modules: o.modules ?? EXPERT_MODULES, rank, experts: o.experts ?? 4, selection, balance: o.balance ?? 0.1 });
  return randomAdapter({ spec, seed: o.seed ?? 3, scale: 0.5, routerScale: 2 });
}

/** The reference's view of a random adapter of `placement`, with the balance coefficient and dropout given. */
const viewOf = (placement: Placement, selection: MoeRouting["selection"], o: AdapterOptions, extra: Pick<ReferenceTrainAdapter, "balance" | "dropout">): ReferenceTrainAdapter => ({
  ...referenceMoeAdapter(adapterOf(placement, selection, o)),
  ...extra,
});

const cross = (row: Float64Array, label: number) => {
  const max = Math.max(...row);
  return max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0)) - row[label]!;
};

for (const [placement, what, selection, modules] of [
  ["per_module", "top_k 2 renormalised", topK(2, true), EXPERT_MODULES],
  ["per_module", "top_k 2", topK(2, false), EXPERT_MODULES],
  ["per_module", "dense", DENSE, EXPERT_MODULES],
  ["per_ffn", "top_k 2 renormalised", topK(2, true), EXPERT_MODULES],
  ["per_ffn", "top_k 2", topK(2, false), EXPERT_MODULES],
  ["per_ffn", "dense", DENSE, EXPERT_MODULES],
  ["per_ffn", "top_k 2 renormalised, gate_proj and down_proj only", topK(2, true), ["q_proj", "gate_proj", "down_proj"]],
] as const) {
  test(`${placement} ${what}: the loss and every decision equal the forward per-token reference's (moe-lora.ts)`, () => {
    const adapter = adapterOf(placement, selection, { modules });
    const got = referenceTrainLoss(base, weights, { ...referenceMoeAdapter(adapter), balance: 0 }, batch);
    let total = 0;
    let count = 0;
    batch.forEach((ex, s) => {
      const forward = referenceMoeLogits(base, weights, adapter, ex.tokens);
      for (const d of forward.experts) {
        // per_ffn routes each layer's MLP input once; per_module each module's input.
        if (placement === "per_ffn") assert.is(d.at, "ffn");
        const mine = got.moeDecisions.find((m) => m.example === s && m.key === `${d.layer}.${d.at}` && m.position === d.position);
        assert.ok(mine, `example ${s} layer ${d.layer} ${d.at} position ${d.position} has a decision`);
        const gates = new Array<number>(d.probabilities.length).fill(0);
        d.experts.forEach((e, i) => (gates[e] = d.gates[i]!));
        gates.forEach((g, e) => assert.ok(Math.abs(g - mine!.gates[e]!) < 1e-12, `example ${s} ${d.layer}.${d.at} position ${d.position} expert ${e}: ${mine!.gates[e]} vs ${g}`));
      }
      assert.is(got.moeDecisions.filter((m) => m.example === s).length, forward.experts.length);
      if (placement === "per_ffn") assert.is(forward.experts.length, ex.tokens.length * base.layers);
      for (let t = 0; t + 1 < ex.tokens.length; t++) {
        if (ex.labels[t + 1] === IGNORE) continue;
        total += cross(forward.logits[t]!, ex.labels[t + 1]!);
        count++;
      }
    });
    assert.ok(Math.abs(got.lmLoss - total / count) < 1e-10, `${got.lmLoss} vs ${total / count}`);
  });
}

/** The central difference of `loss` in element i of `tensor` with step h (the element restored after). */
function centralDifference(loss: () => number, tensor: Float64Array, i: number, h: number): number {
  const v = tensor[i]!;
  tensor[i] = v + h;
  const up = loss();
  tensor[i] = v - h;
  const down = loss();
  tensor[i] = v;
  return (up - down) / (2 * h);
}

/**
 * The elements of a tensor whose differences are checked: the ends and a few between; per_ffn's include
 * one in every expert's slice of a stacked MLP LoRA.
 */
const picks = (placement: Placement, n: number): readonly number[] =>
  placement === "per_ffn"
    ? [...new Set([0, Math.floor(n / 3), Math.floor(n / 2) + 1, Math.floor((2 * n) / 3), n - 1])]
    : [0, Math.floor(n / 3), Math.floor((2 * n) / 3), n - 1];

/** Central differences of the loss in a few elements of every trainable tensor, against the tape's gradient. */
function checkGradients(adapter: ReferenceTrainAdapter, what: string): void {
  const placement = adapter.moe!.placement ?? "per_module";
  const result = referenceTrainLoss(base, weights, adapter, batch);
  // Finite differences step across no routing decision: every kept/dropped gap is far above h.
  const gap = closestCall(result.moeDecisions);
  assert.ok(gap > 1e-3, `${what}: the closest routing call (logit gap ${gap}) is clear of the differences' step`);
  const loss = () => referenceTrainLoss(base, weights, adapter, batch).loss;
  let worst = 0;
  const check = (name: string, tensor: Float64Array, grad: Float64Array) => {
    for (const i of picks(placement, tensor.length)) {
      const numeric = centralDifference(loss, tensor, i, 1e-5);
      const err = Math.abs(numeric - grad[i]!) / Math.max(1, Math.abs(numeric));
      worst = Math.max(worst, err);
      assert.ok(err <= 1e-6, `${what}: ${name}[${i}] tape ${grad[i]} vs differences ${numeric}`);
    }
  };
  for (const [key, l] of adapter.lora) {
    check(`${key}.lora_A`, l.a, result.lora.get(key)!.a);
    check(`${key}.lora_B`, l.b, result.lora.get(key)!.b);
  }
  for (const [key, w] of adapter.moe!.routers) check(`${key}.router`, w, result.moeRouters.get(key)!);
  // The router gradients are not all zero: the routers take part.
  assert.ok([...result.moeRouters.values()].some((g) => g.some((v) => v !== 0)), `${what}: router gradients`);
  if (placement === "per_ffn") checkExpertSlices(adapter, result, what);
  console.log(`${what}: worst finite-difference disagreement ${worst.toExponential(1)}`);
}

/**
 * per_ffn: an expert's slice of a stacked MLP LoRA's A has a gradient only if some token keeps it, and
 * has one when a token that predicts a supervised label keeps it (its output reaches the loss in every layer).
 */
function checkExpertSlices(adapter: ReferenceTrainAdapter, result: ReturnType<typeof referenceTrainLoss>, what: string): void {
  const predicts = (d: { example: number; position: number }) => batch[d.example]!.labels[d.position + 1] !== undefined && batch[d.example]!.labels[d.position + 1] !== IGNORE;
  for (const [key, l] of adapter.lora) {
    const [layer, module] = key.split(".") as [string, ExpertModule];
    if (!FFN_MODULES.includes(module)) continue;
    const E = adapter.moe!.experts;
    const inF = l.a.length / l.rank;
    const r = l.rank / E;
    const grad = result.lora.get(key)!.a;
    for (let e = 0; e < E; e++) {
      const keeping = result.moeDecisions.filter((d) => d.key === `${layer}.ffn` && d.gates[e] !== 0);
      const moved = grad.subarray(e * r * inF, (e + 1) * r * inF).some((v) => v !== 0);
      if (moved) assert.ok(keeping.length > 0, `${what}: ${key} expert ${e} has a gradient but no token keeps it`);
      if (keeping.some(predicts)) assert.ok(moved, `${what}: ${key} expert ${e} is kept by a supervised token but has no gradient`);
    }
  }
}

/** A dropout mask of a quarter of every module's input elements, by a fixed pattern. */
const keeps = (layer: number, module: ExpertModule, example: number, position: number, column: number) => (layer * 31 + EXPERT_MODULES.indexOf(module) * 7 + example * 5 + position * 3 + column) % 4 !== 0;

/**
 * The balance loss on known routers: zero routers (p = 1/E everywhere, top-3 keeps experts 0..2, ties to
 * the lower index: f = 1 on them) give k = 3; dense (every expert kept by every token) gives E = 4
 * whatever the routers do; random routers give E sum f_i P_i recomputed here from the decisions (picks
 * over all `decisionsPerToken` routed inputs of each token jointly). Returns the two adapters' results.
 */
function checkBalance(placement: Placement, decisionsPerToken: number) {
  const zero = adapterOf(placement, topK(3, true), { experts: 4 });
  for (const w of zero.moeRouters!.values()) w.fill(0);
  const flat = referenceTrainLoss(base, weights, { ...referenceMoeAdapter(zero), balance: 1 }, batch);
  assert.ok(Math.abs(flat.balanceLoss - 3) < 1e-12, `${flat.balanceLoss}`);
  assert.ok(Math.abs(flat.loss - flat.lmLoss - 3) < 1e-12);
  for (const d of flat.moeDecisions) assert.equal(d.gates.map((g) => +g.toFixed(12)), [1 / 3, 1 / 3, 1 / 3, 0].map((g) => +g.toFixed(12)));
  const dense = referenceTrainLoss(base, weights, viewOf(placement, DENSE, { experts: 4 }, { balance: 1 }), batch);
  assert.ok(Math.abs(dense.balanceLoss - 4) < 1e-12, `${dense.balanceLoss}`);
  const random = referenceTrainLoss(base, weights, viewOf(placement, topK(2, false), {}, { balance: 1 }), batch);
  const T = random.moeDecisions.length;
  assert.is(T, (6 + 5) * base.layers * decisionsPerToken);
  let l = 0;
  for (let i = 0; i < 4; i++) {
    const f = random.moeDecisions.filter((d) => d.gates[i] !== 0).length / T;
    const P = random.moeDecisions.reduce((s, d) => s + d.probabilities[i]!, 0) / T;
    l += f * P;
  }
  assert.ok(Math.abs(random.balanceLoss - 4 * l) < 1e-12, `${random.balanceLoss} vs ${4 * l}`);
  return { zero, random };
}

/** Each placement's gradient tests: a test's name and the adapters it checks, each a label, the selection, the adapter's options and the balance and dropout. */
const GRADIENT_TESTS: Record<Placement, readonly (readonly [string, readonly (readonly [string, MoeRouting["selection"], AdapterOptions, Pick<ReferenceTrainAdapter, "balance" | "dropout">])[]])[]> = {
  per_module: [
    ["gradients of per_module top_k 2 of 4 renormalised, with the balance loss, match finite differences", [["top_k renormalised + balance", topK(2, true), {}, { balance: 0.1 }]]],
    [
      "gradients of per_module plain top_k 2 of 4 with the balance loss, and without it",
      [
        ["top_k + balance", topK(2, false), {}, { balance: 0.5 }],
        ["top_k 1, no balance", topK(1, false), { seed: 7 }, { balance: 0 }],
      ],
    ],
    [
      "gradients of per_module dense over 2 experts, and with LoRA dropout on a few modules",
      [
        ["dense", DENSE, { experts: 2 }, { balance: 0.1 }],
        ["dropout", topK(2, true), { modules: ["q_proj", "o_proj", "down_proj"], seed: 11 }, { balance: 0.1, dropout: { p: 0.25, keeps } }],
      ],
    ],
  ],
  per_ffn: [
    ["gradients of per_ffn top_k 2 of 4 renormalised, with the balance loss, match finite differences", [["top_k renormalised + balance", topK(2, true), {}, { balance: 0.1 }]]],
    [
      "gradients of per_ffn plain top_k 2 of 4 with the balance loss, and top_k 1 without it",
      [
        ["top_k + balance", topK(2, false), {}, { balance: 0.5 }],
        ["top_k 1, no balance", topK(1, false), { seed: 7 }, { balance: 0 }],
      ],
    ],
    [
      "gradients of per_ffn dense over 3 experts, a partial MLP (gate_proj and down_proj), and LoRA dropout",
      [
        ["dense", DENSE, { experts: 3 }, { balance: 0.1 }],
        ["gate_proj + down_proj", topK(2, true), { modules: ["v_proj", "gate_proj", "down_proj"], seed: 5 }, { balance: 0.1 }],
        ["dropout", topK(2, true), { modules: ["q_proj", "up_proj", "down_proj"], seed: 11 }, { balance: 0.1, dropout: { p: 0.25, keeps } }],
      ],
    ],
  ],
};

for (const placement of PLACEMENTS) {
  for (const [name, adapters] of GRADIENT_TESTS[placement]) {
    test(name, () => {
      for (const [what, selection, o, extra] of adapters) checkGradients(viewOf(placement, selection, o, extra), `${placement} ${what}`);
    });
  }
}

test("the balance loss is Mixtral's E * sum f_i P_i over every module's tokens: k with zero routers, E dense, and by hand", () => {
  const { zero, random } = checkBalance("per_module", EXPERT_MODULES.length);
  // The router keys are the modules'.
  assert.equal([...random.moeRouters.keys()].sort(), zero.spec.experts.map((e) => `${e.layer}.${e.module}`).sort());
  assert.ok(zero.moeRouters!.has(moeRouterKey(0, "q_proj")));
});

test("the per_ffn balance loss is Mixtral's E * sum f_i P_i over every layer's tokens: k with zero routers, E dense, and by hand", () => {
  const { random } = checkBalance("per_ffn", 1);
  assert.equal([...random.moeRouters.keys()].sort(), ["0.ffn", "1.ffn"]);
});

test.run();
