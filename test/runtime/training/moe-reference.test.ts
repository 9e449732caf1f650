// The training reference's per_module (MOELoRA / MoLoRA) part (test/reference/train.ts), checked before
// the device is compared with it: its loss and every routing decision against the forward per-token
// reference (test/reference/moe-lora.ts, written separately from the math), its gradients of every
// lora_A, lora_B and router W against central finite differences of its own loss, and its balance loss
// on routers whose value is known. CPU only. (The file lives with the training tests it serves.)
import { test } from "uvu";
import * as assert from "uvu/assert";
import { EXPERT_MODULES, type ExpertModule, type MoeRouting } from "../../../compiler/model.ts";
import { randomAdapter } from "../../../examples/random-adapter.ts";
import { randomCheckpointBase, randomWeights } from "../../../examples/random-checkpoint.ts";
import { moeRouterKey } from "../../../runtime/formats/adapter.ts";
import { weightsFromMap } from "../../reference/llama.ts";
import { referenceMoeLogits } from "../../reference/moe-lora.ts";
import { IGNORE, referenceTrainLoss, type ReferenceTrainAdapter, type TrainExample } from "../../reference/train.ts";
import { DENSE, closestCall, moeSpec, referenceMoeAdapter, topK } from "./moe-common.ts";

const base = randomCheckpointBase({ hiddenSize: 8, layers: 2, heads: 2, kvHeads: 1, intermediateSize: 12, vocabSize: 16, seed: 4 });
const weights = weightsFromMap(new Map(randomWeights(base, 4).map((t) => [t.name, Float64Array.from(t.data)])));

const batch: TrainExample[] = [
  { tokens: [1, 5, 9, 2, 7, 3], labels: [IGNORE, IGNORE, IGNORE, 2, 7, 3] },
  { tokens: [4, 4, 11, 6, 15], labels: [IGNORE, IGNORE, IGNORE, IGNORE, 15] },
];

function adapterOf(selection: MoeRouting["selection"], o: { experts?: number; rank?: number; balance?: number; modules?: readonly ExpertModule[]; seed?: number } = {}) {
  const spec = moeSpec({ base, modules: o.modules ?? EXPERT_MODULES, rank: o.rank ?? 4, experts: o.experts ?? 4, selection, balance: o.balance ?? 0.1 });
  return randomAdapter({ spec, seed: o.seed ?? 3, scale: 0.5, routerScale: 2 });
}

const cross = (row: Float64Array, label: number) => {
  const max = Math.max(...row);
  return max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0)) - row[label]!;
};

for (const [what, selection] of [["top_k 2 renormalised", topK(2, true)], ["top_k 2", topK(2, false)], ["dense", DENSE]] as const) {
  test(`per_module ${what}: the loss and every decision equal the forward per-token reference's (moe-lora.ts)`, () => {
    const adapter = adapterOf(selection);
    const got = referenceTrainLoss(base, weights, { ...referenceMoeAdapter(adapter), balance: 0 }, batch);
    let total = 0;
    let count = 0;
    batch.forEach((ex, s) => {
      const forward = referenceMoeLogits(base, weights, adapter, ex.tokens);
      for (const d of forward.experts) {
        const mine = got.moeDecisions.find((m) => m.example === s && m.key === `${d.layer}.${d.at}` && m.position === d.position);
        assert.ok(mine, `example ${s} layer ${d.layer} ${d.at} position ${d.position} has a decision`);
        const gates = new Array<number>(d.probabilities.length).fill(0);
        d.experts.forEach((e, i) => (gates[e] = d.gates[i]!));
        gates.forEach((g, e) => assert.ok(Math.abs(g - mine!.gates[e]!) < 1e-12, `example ${s} ${d.layer}.${d.at} position ${d.position} expert ${e}: ${mine!.gates[e]} vs ${g}`));
      }
      assert.is(got.moeDecisions.filter((m) => m.example === s).length, forward.experts.length);
      for (let t = 0; t + 1 < ex.tokens.length; t++) {
        if (ex.labels[t + 1] === IGNORE) continue;
        total += cross(forward.logits[t]!, ex.labels[t + 1]!);
        count++;
      }
    });
    assert.ok(Math.abs(got.lmLoss - total / count) < 1e-10, `${got.lmLoss} vs ${total / count}`);
  });
}

/** Central differences of the loss in a few elements of every trainable tensor, against the tape's gradient. */
function checkGradients(adapter: ReferenceTrainAdapter, what: string): void {
  const result = referenceTrainLoss(base, weights, adapter, batch);
  // Finite differences step across no routing decision: every kept/dropped gap is far above h.
  const gap = closestCall(result.moeDecisions);
  assert.ok(gap > 1e-3, `${what}: the closest routing call (logit gap ${gap}) is clear of the differences' step`);
  const lossWith = (mutate: () => void, undo: () => void) => {
    mutate();
    const l = referenceTrainLoss(base, weights, adapter, batch).loss;
    undo();
    return l;
  };
  const h = 1e-5;
  let worst = 0;
  const check = (name: string, tensor: Float64Array, grad: Float64Array) => {
    for (const i of [0, Math.floor(tensor.length / 3), Math.floor((2 * tensor.length) / 3), tensor.length - 1]) {
      const v = tensor[i]!;
      const up = lossWith(() => (tensor[i] = v + h), () => (tensor[i] = v));
      const down = lossWith(() => (tensor[i] = v - h), () => (tensor[i] = v));
      const numeric = (up - down) / (2 * h);
      const err = Math.abs(numeric - grad[i]!) / Math.max(1, Math.abs(numeric));
      worst = Math.max(worst, err);
      assert.ok(err <= 1e-6, `${what}: ${name}[${i}] tape ${grad[i]} vs differences ${numeric}`);
    }
  };
  for (const [key, l] of adapter.lora) {
    check(`${key}.lora_A`, l.a as Float64Array, result.lora.get(key)!.a);
    check(`${key}.lora_B`, l.b as Float64Array, result.lora.get(key)!.b);
  }
  for (const [key, w] of adapter.moe!.routers) check(`${key}.router`, w, result.moeRouters.get(key)!);
  // The router gradients are not all zero: the routers take part.
  assert.ok([...result.moeRouters.values()].some((g) => g.some((v) => v !== 0)), `${what}: router gradients`);
  console.log(`${what}: worst finite-difference disagreement ${worst.toExponential(1)}`);
}

test("gradients of per_module top_k 2 of 4 renormalised, with the balance loss, match finite differences", () => {
  checkGradients({ ...referenceMoeAdapter(adapterOf(topK(2, true))), balance: 0.1 }, "top_k renormalised + balance");
});

test("gradients of per_module plain top_k 2 of 4 with the balance loss, and without it", () => {
  checkGradients({ ...referenceMoeAdapter(adapterOf(topK(2, false))), balance: 0.5 }, "top_k + balance");
  checkGradients({ ...referenceMoeAdapter(adapterOf(topK(1, false), { seed: 7 })), balance: 0 }, "top_k 1, no balance");
});

test("gradients of per_module dense over 2 experts, and with LoRA dropout on a few modules", () => {
  checkGradients({ ...referenceMoeAdapter(adapterOf(DENSE, { experts: 2 })), balance: 0.1 }, "dense");
  const keeps = (layer: number, module: ExpertModule, example: number, position: number, column: number) => (layer * 31 + EXPERT_MODULES.indexOf(module) * 7 + example * 5 + position * 3 + column) % 4 !== 0;
  checkGradients(
    { ...referenceMoeAdapter(adapterOf(topK(2, true), { modules: ["q_proj", "o_proj", "down_proj"], seed: 11 })), balance: 0.1, dropout: { p: 0.25, keeps } },
    "dropout",
  );
});

test("the balance loss is Mixtral's E * sum f_i P_i over every module's tokens: k with zero routers, E dense, and by hand", () => {
  // Zero routers: p = 1/E everywhere, top-k keeps experts 0..k-1 (ties to the lower index): f = 1 on them.
  const zero = adapterOf(topK(3, true), { experts: 4 });
  for (const w of zero.moeRouters!.values()) w.fill(0);
  const flat = referenceTrainLoss(base, weights, { ...referenceMoeAdapter(zero), balance: 1 }, batch);
  assert.ok(Math.abs(flat.balanceLoss - 3) < 1e-12, `${flat.balanceLoss}`);
  assert.ok(Math.abs(flat.loss - flat.lmLoss - 3) < 1e-12);
  for (const d of flat.moeDecisions) assert.equal(d.gates.map((g) => +g.toFixed(12)), [1 / 3, 1 / 3, 1 / 3, 0].map((g) => +g.toFixed(12)));
  // Dense: every expert kept by every token, so E whatever the routers do.
  const dense = referenceTrainLoss(base, weights, { ...referenceMoeAdapter(adapterOf(DENSE, { experts: 4 })), balance: 1 }, batch);
  assert.ok(Math.abs(dense.balanceLoss - 4) < 1e-12, `${dense.balanceLoss}`);
  // Random routers: recomputed here from the decisions (picks over all modules' tokens jointly).
  const random = referenceTrainLoss(base, weights, { ...referenceMoeAdapter(adapterOf(topK(2, false))), balance: 1 }, batch);
  const T = random.moeDecisions.length;
  assert.is(T, (6 + 5) * base.layers * EXPERT_MODULES.length);
  let l = 0;
  for (let i = 0; i < 4; i++) {
    const f = random.moeDecisions.filter((d) => d.gates[i] !== 0).length / T;
    const P = random.moeDecisions.reduce((s, d) => s + d.probabilities[i]!, 0) / T;
    l += f * P;
  }
  assert.ok(Math.abs(random.balanceLoss - 4 * l) < 1e-12, `${random.balanceLoss} vs ${4 * l}`);
  // The router keys are the modules'.
  assert.equal([...random.moeRouters.keys()].sort(), zero.spec.experts.map((e) => `${e.layer}.${e.module}`).sort());
  assert.ok(zero.moeRouters!.has(moeRouterKey(0, "q_proj")));
});

test.run();
