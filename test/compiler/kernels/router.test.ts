// The MiLoRA router kernels (score, pool, gate into the gate table) against a float64 reference of the
// paper's router: pooling of the raw hidden states (eq. 2, the self-attention pooler of eq. 8), the
// activation on the pooled vector, TopK(softmax(g(p) W^T)) with the gates as they are or renormalised
// (eq. 3), and the rational activation (eq. 6). Bounds: pooled vectors within relative error 1e-5 of
// float64, every gate within 1e-5 absolute, the same chosen experts (inputs are drawn away from ties).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { routerGateKernel, routerPoolKernel, routerScoreKernel } from "../../../compiler/kernels/router.ts";
import type { Activation, Pooling, Selection } from "../../../compiler/model.ts";
import { GELU_RATIONAL, RATIONAL_DEFAULT_ORDERS, type RationalOrders } from "../../../compiler/rational.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { nanFilled, openGpu, randomFloats, relativeError, seeded, type Gpu } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(23);
const EXPERTS = 7;
/** Every module of a layer routed, table columns in expert order. */
const ALL_COLUMNS = { columns: [0, 1, 2, 3, 4, 5, 6], width: EXPERTS };
/** The GELU fit moved by up to ~20%, as f32 (what the kernel reads): a = rational[0..6], b = rational[7..11]. */
const RATIONAL = Float32Array.from([...GELU_RATIONAL.numerator, ...GELU_RATIONAL.denominator], (c) => c * (1 + 0.2 * (random() - 0.5)));

// erf by its Taylor series, exact to float64 rounding for the |x| < 3 these tests produce.
function erf(x: number): number {
  if (Math.abs(x) >= 3) throw new Error(`reference erf is only accurate for |x| < 3, got ${x}`);
  let term = x;
  let sum = x;
  for (let n = 1; Math.abs(term) > 1e-17 * Math.abs(sum); n++) {
    term *= (-x * x) / n;
    sum += term / (2 * n + 1);
  }
  return (2 / Math.sqrt(Math.PI)) * sum;
}

/** Ra(x) = sum_j a_j x^j / (1 + |sum_i b_i x^i|) with the coefficients of `c` split at m + 1. */
function rationalAt(x: number, c: Float32Array, orders: RationalOrders): number {
  let p = 0;
  for (let j = 0; j <= orders.numerator; j++) p += c[j]! * x ** j;
  let q = 0;
  for (let i = 1; i <= orders.denominator; i++) q += c[orders.numerator + i]! * x ** i;
  return p / (1 + Math.abs(q));
}

const ACTIVATE: Record<Activation, (x: number) => number> = {
  none: (x) => x,
  relu: (x) => Math.max(x, 0),
  gelu: (x) => 0.5 * x * (1 + erf(x / Math.SQRT2)),
  rational: (x) => rationalAt(x, RATIONAL, RATIONAL_DEFAULT_ORDERS),
};

/** The layer input of one batch and the prompt row ranges of the sequences routed in it. */
interface Batch {
  readonly hidden: number;
  readonly h: Float32Array;
  readonly ranges: readonly (readonly [number, number])[];
}

function row(b: Batch, t: number): number[] {
  return Array.from(b.h.subarray(t * b.hidden, (t + 1) * b.hidden));
}

/** Eq. 2 on the raw hidden states; attention is eq. 8: u_t = h_t . w_sa, a = softmax(u), sum a_t h_t. */
function referencePool(b: Batch, pooling: Pooling, wSa: Float32Array): number[][] {
  return b.ranges.map(([start, end]) => {
    const xs = Array.from({ length: end - start }, (_, i) => row(b, start + i));
    const columns = (f: (column: number[]) => number) => Array.from({ length: b.hidden }, (_, c) => f(xs.map((x) => x[c]!)));
    switch (pooling) {
      case "last":
        return xs[xs.length - 1]!;
      case "mean":
        return columns((col) => col.reduce((s, x) => s + x, 0) / col.length);
      case "max":
        return columns((col) => Math.max(...col));
      case "attention": {
        const weights = softmax(xs.map((x) => x.reduce((s, v, c) => s + v * wSa[c]!, 0)));
        return columns((col) => col.reduce((s, x, t) => s + weights[t]! * x, 0));
      }
    }
  });
}

function softmax(z: readonly number[]): number[] {
  const top = Math.max(...z);
  const e = z.map((x) => Math.exp(x - top));
  const total = e.reduce((s, x) => s + x, 0);
  return e.map((x) => x / total);
}

/** Gate logits z = g(x) W^T. */
function logits(x: readonly number[], weight: Float32Array, activation: Activation = "none"): number[] {
  const v = x.map(ACTIVATE[activation]);
  return Array.from({ length: EXPERTS }, (_, e) => v.reduce((s, a, c) => s + a * weight[e * x.length + c]!, 0));
}

/** Eq. 3: p = softmax(z); the kept experts get p_e (or p_e / sum of kept p with renormalize), others 0. */
function referenceGates(z: readonly number[], selection: Selection): number[] {
  const probs = softmax(z);
  const best = z.indexOf(Math.max(...z));
  const order = z.map((_, e) => e).sort((a, b) => z[b]! - z[a]! || a - b);
  const keep = (e: number) =>
    selection.rule === "dense" ? true : selection.rule === "top_k" ? order.indexOf(e) < selection.k : e === best || probs[e]! >= selection.threshold;
  const kept = probs.reduce((s, p, e) => s + (keep(e) ? p : 0), 0);
  const renormalize = selection.rule !== "dense" && selection.renormalize;
  return probs.map((p, e) => (keep(e) ? (renormalize ? p / kept : p) : 0));
}

/** Smallest distance from any decision boundary: to the next logit for top_k, to T for threshold. */
function margin(z: readonly number[], selection: Selection): number {
  if (selection.rule === "dense") return Infinity;
  if (selection.rule === "top_k") {
    const sorted = [...z].sort((a, b) => b - a);
    return sorted[selection.k - 1]! - sorted[selection.k]!;
  }
  return Math.min(...softmax(z).map((p) => Math.abs(p - selection.threshold)));
}

/** A threshold between the sequences' probabilities, as far from each as possible. */
function thresholdFor(zs: readonly number[][]): number {
  const probs = zs.flatMap((z) => softmax(z));
  let best = 0.15;
  for (let t = 0.08; t < 0.4; t += 0.0025)
    if (Math.min(...probs.map((p) => Math.abs(p - t))) > Math.min(...probs.map((p) => Math.abs(p - best)))) best = t;
  return best;
}

/** Runs `record` as one step with fresh buffers; returns the named buffers' contents. */
async function runStep(
  g: Gpu,
  data: Record<string, Float32Array | Uint32Array>,
  record: (buffers: Record<string, GPUBuffer>) => void,
  read: readonly string[],
): Promise<Record<string, Float32Array>> {
  const device = g.device;
  device.pushErrorScope("validation");
  const buffers = Object.fromEntries(Object.entries(data).map(([name, values]) => [name, createStorage(device, values, name)]));
  record(buffers);
  g.step.submit();
  const out: Record<string, Float32Array> = {};
  for (const name of read) out[name] = await readBuffer(device, buffers[name]!, 0, data[name]!.byteLength);
  const error = await device.popErrorScope();
  if (error) throw new Error(error.message);
  for (const b of Object.values(buffers)) b.destroy();
  return out;
}

/** Three prompts of lengths 5, 1 and 9 among other rows of a 20-row batch. */
function promptBatch(hidden: number): Batch {
  return { hidden, h: randomFloats(random, 20 * hidden, 2), ranges: [[2, 7], [7, 8], [10, 19]] };
}

// The threshold rules get their T per case (thresholdFor), away from every probability.
const SELECTIONS: readonly Selection[] = [
  { rule: "top_k", k: 2, renormalize: false },
  { rule: "threshold", threshold: 0, renormalize: false },
  { rule: "top_k", k: 3, renormalize: true },
  { rule: "dense" },
  { rule: "threshold", threshold: 0, renormalize: true },
];
const POOLINGS: readonly Pooling[] = ["last", "mean", "max", "attention"];
const ACTIVATIONS: readonly Activation[] = ["none", "relu", "gelu", "rational"];
const gateActivation = (activation: Activation) => ({ activation, ...(activation === "rational" ? { rational: RATIONAL_DEFAULT_ORDERS } : {}) });

test("prompt routing: every pooling, activation and selection, score -> pool -> gate into every prompt row of the table", async () => {
  let n = 0;
  for (const pooling of POOLINGS) {
    for (const activation of ACTIVATIONS) {
      const hidden = n % 2 === 0 ? 21 : 32; // unaligned and vec4-aligned rows
      const batch = promptBatch(hidden);
      const wSa = randomFloats(random, hidden, 0.5);
      const want = referencePool(batch, pooling, wSa);
      // Redraw the gate until no sequence sits within 2e-3 of a selection boundary.
      let selection = SELECTIONS[n % SELECTIONS.length]!;
      let weight = randomFloats(random, EXPERTS * hidden);
      for (let tries = 0; ; tries++) {
        const zs = want.map((p) => logits(p, weight, activation));
        if (selection.rule === "threshold") selection = { ...selection, threshold: thresholdFor(zs) };
        if (Math.min(...zs.map((z) => margin(z, selection))) > 2e-3) break;
        assert.ok(tries < 50, "could not draw a gate without near-ties");
        weight = randomFloats(random, EXPERTS * hidden);
      }
      n++;

      // Rows 0, 1, 8, 9, 19 belong to other sequences: their gates must stay as they were.
      const rows = 20;
      const count = batch.ranges.length;
      const tableBefore = randomFloats(random, rows * EXPERTS);
      const attention = pooling === "attention";
      const rational = activation === "rational";
      const got = await runStep(
        gpu,
        {
          h: batch.h,
          pooler: wSa,
          scores: nanFilled(rows),
          ranges: Uint32Array.from(batch.ranges.flat()),
          pooled: nanFilled(count * hidden),
          items: Uint32Array.from(batch.ranges.flatMap(([start, end], i) => [i, start, end])),
          weight,
          rational: RATIONAL,
          table: tableBefore.slice(),
        },
        (b) => {
          if (attention) gpu.step.dispatch(routerScoreKernel({ hidden }), { h: b.h!, pooler: b.pooler!, scores: b.scores! }, { rows });
          gpu.step.dispatch(
            routerPoolKernel({ hidden, pooling }),
            { h: b.h!, ranges: b.ranges!, pooled: b.pooled!, ...(attention ? { scores: b.scores! } : {}) },
            { count },
          );
          const gate = routerGateKernel({ hidden, ...ALL_COLUMNS, selection, ...gateActivation(activation) });
          gpu.step.dispatch(gate, { x: b.pooled!, items: b.items!, weight: b.weight!, ...(rational ? { rational: b.rational! } : {}), table: b.table! }, { count, stride: EXPERTS, base: 0 });
        },
        ["pooled", "table"],
      );
      const name = `${pooling}/${activation}/${JSON.stringify(selection)}`;
      const poolError = relativeError(got.pooled!, want.flat());
      assert.ok(poolError < 1e-5, `${name}: pooled error ${poolError}`);
      const gateRow = (source: Float32Array, r: number) => Array.from(source.subarray(r * EXPERTS, (r + 1) * EXPERTS));
      for (let r = 0; r < rows; r++) {
        const i = batch.ranges.findIndex(([start, end]) => r >= start && r < end);
        if (i < 0) {
          assert.equal(gateRow(got.table!, r), gateRow(tableBefore, r), `${name}: row ${r} is not routed here and must be untouched`);
          continue;
        }
        const gates = referenceGates(logits(want[i]!, weight, activation), selection);
        const gotGates = gateRow(got.table!, r);
        assert.equal(gotGates.map((x) => x > 0), gates.map((x) => x > 0), `${name}: row ${r} (sequence ${i}) chose other experts`);
        gates.forEach((x, e) => assert.ok(Math.abs(gotGates[e]! - x) < 1e-5, `${name}: row ${r} gate ${e}: ${gotGates[e]} vs ${x}`));
      }
    }
  }
});

test("per-token routing: each row of the adapter routes on its own activated hidden state (gelu and rational)", async () => {
  const hidden = 40;
  const rows = 11;
  const h = randomFloats(random, rows * hidden, 2);
  const routed = [0, 1, 2, 5, 6, 9]; // other rows belong to other tenants and keep their gates
  for (const [activation, selection] of [
    ["gelu", { rule: "top_k", k: 3, renormalize: true }],
    ["rational", { rule: "top_k", k: 3, renormalize: false }],
  ] as const) {
    const z = (weight: Float32Array) => routed.map((r) => logits(row({ hidden, h, ranges: [] }, r), weight, activation));
    let weight = randomFloats(random, EXPERTS * hidden);
    while (Math.min(...z(weight).map((zr) => margin(zr, selection))) <= 2e-3) weight = randomFloats(random, EXPERTS * hidden);
    const { table } = await runStep(
      gpu,
      { h, items: Uint32Array.from(routed.flatMap((r) => [r, r, r + 1])), weight, rational: RATIONAL, table: nanFilled(rows * EXPERTS) },
      (b) =>
        gpu.step.dispatch(
          routerGateKernel({ hidden, ...ALL_COLUMNS, selection, ...gateActivation(activation) }),
          { x: b.h!, items: b.items!, weight: b.weight!, ...(activation === "rational" ? { rational: b.rational! } : {}), table: b.table! },
          { count: routed.length, stride: EXPERTS, base: 0 },
        ),
      ["table"],
    );
    const logitsByRow = z(weight);
    for (let r = 0; r < rows; r++) {
      const got = Array.from(table!.subarray(r * EXPERTS, (r + 1) * EXPERTS));
      const i = routed.indexOf(r);
      if (i < 0) {
        assert.ok(got.every(Number.isNaN), `row ${r} is not routed here and must be untouched`);
        continue;
      }
      const want = referenceGates(logitsByRow[i]!, selection);
      assert.equal(got.map((x) => x > 0), want.map((x) => x > 0), `${activation}: row ${r} chose other experts`);
      assert.is(got.filter((x) => x > 0).length, 3);
      want.forEach((x, e) => assert.ok(Math.abs(got[e]! - x) < 1e-5, `${activation}: row ${r} gate ${e}: ${got[e]} vs ${x}`));
    }
  }
});

test("a router over 3 of the 7 modules fills layer 1's columns of its rows: its experts' gates, 0 elsewhere", async () => {
  const hidden = 8;
  const columns = [6, 1, 4]; // experts 0, 1, 2 are down_proj, k_proj, gate_proj
  const stride = 14; // two layers of 7 columns
  const weight = randomFloats(random, columns.length * hidden);
  const x = randomFloats(random, 2 * hidden, 2);
  const table = randomFloats(random, 4 * stride, 5);
  // Item 0 (x row 0) covers rows 0 and 1, item 1 (x row 1) row 3; row 2 is another sequence's.
  const items = Uint32Array.from([0, 0, 2, 1, 3, 4]);
  const got = await runStep(
    gpu,
    { x, items, weight, table },
    (b) =>
      gpu.step.dispatch(
        routerGateKernel({ hidden, columns, width: 7, selection: { rule: "dense" }, activation: "none" }),
        { x: b.x!, items: b.items!, weight: b.weight!, table: b.table! },
        { count: 2, stride, base: 7 },
      ),
    ["table"],
  );
  const want = Float64Array.from(table);
  [[0, 0], [0, 1], [1, 3]].forEach(([item, r]) => {
    const z = Array.from({ length: columns.length }, (_, e) => {
      let sum = 0;
      for (let c = 0; c < hidden; c++) sum += x[item! * hidden + c]! * weight[e * hidden + c]!;
      return sum;
    });
    const gates = softmax(z);
    for (let c = 0; c < 7; c++) want[r! * stride + 7 + c] = columns.includes(c) ? gates[columns.indexOf(c)]! : 0;
  });
  got.table!.forEach((v, i) => assert.ok(Math.abs(v - want[i]!) < 1e-6, `table cell ${i}: ${v} vs ${want[i]}`));
});

test("top_k breaks exact ties toward the lower expert index; the paper's gates are the probabilities over all", async () => {
  const hidden = 4;
  // Logits [1, 3, 3, 0, 3, 2, 3] for x = e0: the three 3s at 1, 2, 4 win over the one at 6.
  const weight = new Float32Array(EXPERTS * hidden);
  [1, 3, 3, 0, 3, 2, 3].forEach((z, e) => (weight[e * hidden] = z));
  const { table } = await runStep(
    gpu,
    { x: Float32Array.from([1, 0, 0, 0]), items: Uint32Array.from([0, 0, 1]), weight, table: nanFilled(EXPERTS) },
    (b) =>
      gpu.step.dispatch(
        routerGateKernel({ hidden, ...ALL_COLUMNS, selection: { rule: "top_k", k: 3, renormalize: true }, activation: "none" }),
        { x: b.x!, items: b.items!, weight: b.weight!, table: b.table! },
        { count: 1, stride: EXPERTS, base: 0 },
      ),
    ["table"],
  );
  assert.equal(Array.from(table!, (g) => Math.round(g * 1e6) / 1e6), [0, 0.333333, 0.333333, 0, 0.333333, 0, 0]);
  const paper = await runStep(
    gpu,
    { x: Float32Array.from([1, 0, 0, 0]), items: Uint32Array.from([0, 0, 1]), weight, table: nanFilled(EXPERTS) },
    (b) =>
      gpu.step.dispatch(
        routerGateKernel({ hidden, ...ALL_COLUMNS, selection: { rule: "top_k", k: 3, renormalize: false }, activation: "none" }),
        { x: b.x!, items: b.items!, weight: b.weight!, table: b.table! },
        { count: 1, stride: EXPERTS, base: 0 },
      ),
    ["table"],
  );
  // softmax([1, 3, 3, 0, 3, 2, 3]) at the three winners: e^3 / (e + 4 e^3 + 1 + e^2).
  const p = Math.exp(3) / (Math.exp(1) + 4 * Math.exp(3) + 1 + Math.exp(2));
  Array.from(paper.table!).forEach((g, e) => assert.ok(Math.abs(g - ([1, 2, 4].includes(e) ? p : 0)) < 1e-6, `gate ${e}: ${g}`));
});

test("gate kernels refuse a top_k larger than the experts, and expert columns repeated or outside the layer", () => {
  const gate = (columns: number[], selection: Selection) => routerGateKernel({ hidden: 8, columns, width: 7, selection, activation: "none" });
  assert.throws(() => gate([0, 1, 2], { rule: "top_k", k: 4, renormalize: false }), /top_k 4 must be between 1 and the 3 experts/);
  assert.throws(() => gate([1, 1], { rule: "dense" }), /distinct columns below 7/);
  assert.throws(() => gate([7], { rule: "dense" }), /distinct columns below 7/);
});

test.after(() => gpu.context.destroy());
test.run();
