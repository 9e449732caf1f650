// The per_module (MOELoRA) training kernels (compiler/kernels/moe-train.ts, and lora-backward.ts's
// rank-gated lora_backward_input) against float64 references written from the math, in the order
// runtime/training/graph.ts runs them, on fresh seeded random data:
//   lora_rank_gate: t_gated[r, j] = h_{e(j)}(r) t[r, j], h the row's expert gates (the route record's
//     second part), expert e owning ranks e rank/E .. (e+1) rank/E - 1;
//   the backward of y += g s B t_gated, t = A x: with u = B^T dy and coef = g s, dt_j = coef h_e(j) u_j,
//     dh_e = coef sum_{j of e} u_j t_j, dGate = s <u, t_gated>, dx += A^T dt, dB = sum coef dy t_gated^T
//     (lora_grad_b on t_gated), dA = sum dt x^T (lora_grad_a); the reference is itself checked against
//     central differences of its forward;
//   moe_balance_sums, moe_balance, moe_balance_grad: the load-balancing loss over every routed row of
//     every module, as Hugging Face's Mixtral load_balancing_loss_func computes it (transcribed below):
//     L = E sum_i f_i P_i, f_i the fraction of the T = rows x modules tokens keeping expert i among their
//     top k, P_i the mean softmax; its gradient, through P only, coef E f_e / T on every P_{r,e}.
// Bounds: 1e-5 relative (L2) against float64 on the f32 inputs, the project's f32 bound: every output
// is an f32 dot product over at most 301 terms or a sum over at most a few hundred rows (balance: 450
// tokens), ~sqrt(n) * 2^-24 relative. lora_rank_gate is one f32 product per element, correctly rounded
// in WGSL, so it must equal Math.fround(h * t) bit for bit; the pick counts are integers and must be
// exact, and the gradient copied into the records must be the accumulator's bits. Outputs start as
// poison (NaN, or random where a kernel adds to them): what a kernel must not write keeps its bits,
// and inputs it must not read (rows of other slots, gated-off rows, record rows past `decisions`) are
// NaN or huge. Ties: every row's logits are redrawn until the gaps between consecutive sorted logits
// that decide the top k (the first min(K, E - 1)) are at least MARGIN = 1e-3 (f32 logits err ~1e-6).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { loraBackwardInputKernel, loraGradAKernel, loraGradBKernel } from "../../../compiler/kernels/lora-backward.ts";
import { NO_ADAPTER, packLoraSlots, type LoraSlotInfo } from "../../../compiler/kernels/lora.ts";
import { loraRankGateKernel, moeBalanceGradKernel, moeBalanceKernel, moeBalanceLength, moeBalanceSumsKernel } from "../../../compiler/kernels/moe-train.ts";
import { routerTrainForwardKernel, type RouterTrainConstants } from "../../../compiler/kernels/router-train.ts";
import { softmax } from "../../reference/llama.ts";
import { nanFilled, openGpu, randomFloats, relativeError, seeded } from "./gpu-check.ts";
import { bitsOf, runSteps } from "./step-chain.ts";

const gpu = await openGpu();
const random = seeded(53);
const BOUND = 1e-5;
const MARGIN = 1e-3;

const sameBits = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  const x = new Uint32Array(Float32Array.from(a).buffer);
  const y = new Uint32Array(Float32Array.from(b).buffer);
  return x.length === y.length && x.every((v, i) => v === y[i]);
};

/** The expert owning rank j when a rank of `rank` splits into E experts: e owns e rank/E .. (e+1) rank/E - 1. */
const ownerOf = (j: number, rank: number, E: number) => Math.floor((j * E) / rank);

/** The K most probable experts, best first (ties to the lower index, as torch.topk; the margin keeps them out). */
const topk = (p: readonly number[], K: number) => [...p.keys()].sort((a, b) => p[b]! - p[a]! || a - b).slice(0, K);

/** The smallest gap between consecutive sorted logits among those deciding the top K. */
function margin(z: readonly number[], K: number): number {
  const sorted = [...z].sort((a, b) => b - a);
  let m = Infinity;
  for (let i = 0; i < Math.min(K, z.length - 1); i++) m = Math.min(m, sorted[i]! - sorted[i + 1]!);
  return m;
}

/** Logits of one row, uniform in [-2, 2), redrawn until their top-K margin is at least MARGIN. */
function drawLogits(E: number, K: number): number[] {
  for (;;) {
    const z = Array.from({ length: E }, () => 4 * random() - 2);
    if (margin(z, K) >= MARGIN) return z;
  }
}

/** The gates of a row: the top K of p at p (or p over the kept sum), 0 elsewhere. */
function gatesOf(p: readonly number[], K: number, renormalize: boolean): number[] {
  const kept = topk(p, K);
  const sum = kept.reduce((s, e) => s + p[e]!, 0);
  return p.map((v, e) => (kept.includes(e) ? (renormalize ? v / sum : v) : 0));
}

// ---------------------------------------------------------------------------------------------------
// lora_rank_gate

test("lora_rank_gate: t times each rank's expert gate, read from the route record (stride 3E, offset E) or another layout; bit for bit Math.fround(h * t), every element written", async () => {
  for (const { rank, E, rows, stride, offset } of [
    { rank: 8, E: 4, rows: 70, stride: 12, offset: 4 }, // 560 elements: three workgroups, the last partial
    { rank: 2, E: 2, rows: 33, stride: 6, offset: 2 },
    { rank: 32, E: 8, rows: 9, stride: 11, offset: 3 },
  ]) {
    const t = randomFloats(random, rows * rank);
    // Gates of kept experts in (0, 1], unkept 0; the columns around them NaN (never read).
    const gates = nanFilled(rows * stride);
    for (let r = 0; r < rows; r++) for (let e = 0; e < E; e++) gates[r * stride + offset + e] = random() < 0.4 ? 0 : 1 - random();
    const got = (await runSteps(gpu, { t, gates, out: nanFilled(rows * rank) }, [[loraRankGateKernel({ rank, experts: E }), {}, { n: rows * rank, gateStride: stride, gateOffset: offset }]], ["out"])).out!;
    const want = Array.from(t, (v, i) => Math.fround(gates[Math.floor(i / rank) * stride + offset + ownerOf(i % rank, rank, E)]! * v));
    assert.ok(sameBits(got, want), `rank ${rank}, ${E} experts: h * t`);
  }
  assert.throws(() => loraRankGateKernel({ rank: 12, experts: 8 }), /rank 12 does not split into 8 experts/);
  assert.throws(() => loraRankGateKernel({ rank: 2, experts: 4 }), /does not split/);
});

// ---------------------------------------------------------------------------------------------------
// The rank-gated LoRA backward

/** One module's live rows, for the float64 reference: the slot's A [rank, in], B [out, rank], per row x, t, h [E], g, dy. */
interface GatedRows {
  readonly rank: number;
  readonly E: number;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly scaling: number;
  readonly a: ArrayLike<number>;
  readonly b: ArrayLike<number>;
  readonly x: readonly (readonly number[])[];
  readonly t: readonly (readonly number[])[];
  readonly h: readonly (readonly number[])[];
  readonly g: readonly number[];
  readonly dy: readonly (readonly number[])[];
}

/**
 * float64 forward of the rank-gated LoRA, L = sum_r <dy_r, y_r> with y_r = g_r s B (h_r(e(j)) t_rj)_j,
 * t = A x_r (or, `savedT`, the given t: the function of t whose gradient dt is).
 */
function gatedLoss(c: GatedRows, savedT = false): number {
  let loss = 0;
  c.x.forEach((x, r) => {
    const tg = Array.from({ length: c.rank }, (_, j) => {
      let s = 0;
      if (savedT) s = c.t[r]![j]!;
      else for (let k = 0; k < c.inFeatures; k++) s += c.a[j * c.inFeatures + k]! * x[k]!;
      return c.h[r]![ownerOf(j, c.rank, c.E)]! * s;
    });
    for (let o = 0; o < c.outFeatures; o++) {
      let y = 0;
      for (let j = 0; j < c.rank; j++) y += c.b[o * c.rank + j]! * tg[j]!;
      loss += c.dy[r]![o]! * c.g[r]! * c.scaling * y;
    }
  });
  return loss;
}

/** float64 gradients of that forward at the saved t (the header's formulas). */
function gatedBackward(c: GatedRows) {
  const { rank, E, inFeatures: K, outFeatures: N, scaling: s } = c;
  const dA = new Array<number>(rank * K).fill(0);
  const dB = new Array<number>(N * rank).fill(0);
  const rows = c.x.map((x, r) => {
    const t = c.t[r]!;
    const h = c.h[r]!;
    const coef = c.g[r]! * s;
    const u = Array.from({ length: rank }, (_, j) => {
      let v = 0;
      for (let o = 0; o < N; o++) v += c.dy[r]![o]! * c.b[o * rank + j]!;
      return v;
    });
    const tGated = t.map((v, j) => h[ownerOf(j, rank, E)]! * v);
    const dt = u.map((v, j) => coef * h[ownerOf(j, rank, E)]! * v);
    const dh = new Array<number>(E).fill(0);
    for (let j = 0; j < rank; j++) dh[ownerOf(j, rank, E)]! += coef * u[j]! * t[j]!;
    const dGate = s * u.reduce((sum, v, j) => sum + v * tGated[j]!, 0);
    const dx = Array.from({ length: K }, (_, k) => dt.reduce((sum, v, j) => sum + v * c.a[j * K + k]!, 0));
    for (let o = 0; o < N; o++) for (let j = 0; j < rank; j++) dB[o * rank + j]! += coef * c.dy[r]![o]! * tGated[j]!;
    for (let j = 0; j < rank; j++) for (let k = 0; k < K; k++) dA[j * K + k]! += dt[j]! * x[k]!;
    return { tGated, dt, dh, dGate, dx };
  });
  return { rows, dA, dB };
}

test("the float64 reference of the rank-gated backward is the gradient of its forward (central differences)", () => {
  const rank = 6;
  const E = 3;
  const inFeatures = 5;
  const outFeatures = 4;
  const rows = 3;
  const vec = (n: number) => Array.from({ length: n }, () => 2 * random() - 1);
  const a = vec(rank * inFeatures);
  const x = Array.from({ length: rows }, () => vec(inFeatures));
  const c: GatedRows = {
    rank, E, inFeatures, outFeatures, scaling: 1.7, a, b: vec(outFeatures * rank), x,
    t: x.map((xr) => Array.from({ length: rank }, (_, j) => xr.reduce((s, v, k) => s + v * a[j * inFeatures + k]!, 0))),
    h: Array.from({ length: rows }, () => [0.6, 0, 0.4]),
    g: [0.8, 1.3, 0.5],
    dy: Array.from({ length: rows }, () => vec(outFeatures)),
  };
  const want = gatedBackward(c);
  // L is linear in each parameter alone, so a central difference is exact up to rounding.
  const eps = 1e-3;
  const diff = (perturb: (c: GatedRows, d: number) => GatedRows, savedT = false) => (gatedLoss(perturb(c, eps), savedT) - gatedLoss(perturb(c, -eps), savedT)) / (2 * eps);
  const at = <T>(xs: readonly T[], i: number, f: (v: T) => T) => xs.map((v, k) => (k === i ? f(v) : v));
  const close = (got: number, wantValue: number, what: string) => assert.ok(Math.abs(got - wantValue) <= 1e-8 * (1 + Math.abs(wantValue)), `${what}: ${got} vs ${wantValue}`);
  for (let r = 0; r < rows; r++) {
    for (let k = 0; k < inFeatures; k++) close(diff((d, e) => ({ ...d, x: at(d.x, r, (xr) => at(xr, k, (v) => v + e)) })), want.rows[r]!.dx[k]!, `dx[${r}, ${k}]`);
    for (let e = 0; e < E; e++) close(diff((d, step) => ({ ...d, h: at(d.h, r, (hr) => at(hr, e, (v) => v + step)) })), want.rows[r]!.dh[e]!, `dh[${r}, ${e}]`);
    close(diff((d, e) => ({ ...d, g: at(d.g, r, (v) => v + e) })), want.rows[r]!.dGate, `dGate[${r}]`);
  }
  for (let i = 0; i < rank * inFeatures; i++) close(diff((d, e) => ({ ...d, a: at(Array.from(d.a), i, (v) => v + e) })), want.dA[i]!, `dA[${i}]`);
  for (let i = 0; i < outFeatures * rank; i++) close(diff((d, e) => ({ ...d, b: at(Array.from(d.b), i, (v) => v + e) })), want.dB[i]!, `dB[${i}]`);
  // dt is the gradient of the ungated t: L as a function of the saved t, h and the rest fixed.
  for (let r = 0; r < rows; r++)
    for (let j = 0; j < rank; j++)
      close(diff((d, e) => ({ ...d, t: at(d.t, r, (tr) => at(tr, j, (v) => v + e)) }), true), want.rows[r]!.dt[j]!, `dt[${r}, ${j}]`);
});

interface BackwardCase {
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** The trained slot's rank, also the layout's (the graph's t is [rows, rank]). */
  readonly rank: number;
  readonly E: number;
  /** Experts kept per row (top K of P). */
  readonly K: number;
  readonly renormalize: boolean;
  readonly slots: readonly LoraSlotInfo[];
  readonly slot: number;
  readonly rowAdapter: readonly number[];
  readonly offRows: readonly number[];
  readonly gateStride: number;
  readonly gateIndex: number;
  readonly accumulate: boolean;
}

async function checkBackward(name: string, c: BackwardCase) {
  const { inFeatures: IN, outFeatures: OUT, rank: R, E, slot } = c;
  const rows = c.rowAdapter.length;
  const RW = 3 * E;
  const live = (r: number) => c.rowAdapter[r] === slot && !c.offRows.includes(r);
  const mine = (r: number) => c.rowAdapter[r] === slot;
  const a = randomFloats(random, c.slots.length * R * IN);
  const b = randomFloats(random, c.slots.length * OUT * R);
  c.slots.forEach((s, k) => {
    a.fill(NaN, (k * R + s.rank) * IN, (k + 1) * R * IN);
    for (let o = 0; o < OUT; o++) b.fill(0, (k * OUT + o) * R + s.rank, (k * OUT + o + 1) * R);
  });
  const gates = Float32Array.from({ length: rows * c.gateStride }, () => 0.25 + random());
  for (const r of c.offRows) gates[r * c.gateStride + c.gateIndex] = 0;
  // Inputs the kernels must not read on other rows are NaN there: x, dy, t, the record.
  const x = randomFloats(random, rows * IN);
  const dy = randomFloats(random, rows * OUT);
  const t = nanFilled(rows * R);
  const record = nanFilled(rows * RW);
  for (let r = 0; r < rows; r++) {
    if (!live(r)) {
      x.fill(NaN, r * IN, (r + 1) * IN);
      dy.fill(NaN, r * OUT, (r + 1) * OUT);
      continue;
    }
    for (let j = 0; j < R; j++) {
      let s = 0;
      for (let k = 0; k < IN; k++) s += x[r * IN + k]! * a[(slot * R + j) * IN + k]!;
      t[r * R + j] = s;
    }
    const p = softmax(drawLogits(E, c.K));
    record.set(p, r * RW);
    record.set(gatesOf(p, c.K, c.renormalize), r * RW + E);
  }
  const prior = {
    dt: randomFloats(random, rows * R),
    dGates: randomFloats(random, rows * c.gateStride),
    dExpertGates: randomFloats(random, rows * E),
    dx: randomFloats(random, rows * IN),
    dA: c.accumulate ? randomFloats(random, R * IN) : nanFilled(R * IN),
    dB: c.accumulate ? randomFloats(random, OUT * R) : nanFilled(OUT * R),
  };
  const lora = { inFeatures: IN, outFeatures: OUT, maxRank: R };
  const params = { rows, gateStride: c.gateStride, gateIndex: c.gateIndex, slot };
  const got = await runSteps(
    gpu,
    { x, dy, t, a, b, slots: new Uint32Array(packLoraSlots(c.slots).buffer), rowAdapter: Uint32Array.from(c.rowAdapter), gates, record, tGated: nanFilled(rows * R), ...prior },
    [
      [loraRankGateKernel({ rank: R, experts: E }), { gates: "record", out: "tGated" }, { n: rows * R, gateStride: RW, gateOffset: E }],
      [loraBackwardInputKernel({ ...lora, experts: E }), { expertGates: "record" }, { ...params, expertStride: RW, expertOffset: E }],
      [loraGradBKernel({ ...lora, accumulate: c.accumulate }), { t: "tGated" }, params],
      [loraGradAKernel({ ...lora, accumulate: c.accumulate }), {}, params],
    ],
    ["tGated", "dt", "dGates", "dExpertGates", "dx", "dA", "dB"],
  );

  const liveRows = [...c.rowAdapter.keys()].filter(live);
  const rowOf = (v: ArrayLike<number>, width: number, r: number) => Array.from({ length: width }, (_, i) => v[r * width + i]!);
  const { scaling } = c.slots[slot]!;
  const want = gatedBackward({
    rank: R, E, inFeatures: IN, outFeatures: OUT, scaling,
    a: a.subarray(slot * R * IN, (slot + 1) * R * IN),
    b: Array.from({ length: OUT * R }, (_, i) => b[slot * OUT * R + i]!),
    x: liveRows.map((r) => rowOf(x, IN, r)),
    t: liveRows.map((r) => rowOf(t, R, r)),
    h: liveRows.map((r) => rowOf(record, RW, r).slice(E, 2 * E)),
    g: liveRows.map((r) => gates[r * c.gateStride + c.gateIndex]!),
    dy: liveRows.map((r) => rowOf(dy, OUT, r)),
  });
  const pairs: Record<string, [number[], number[]]> = { tGated: [[], []], dt: [[], []], dGate: [[], []], dExpertGates: [[], []], dx: [[], []] };
  const add = (key: string, gotV: ArrayLike<number>, wantV: ArrayLike<number>) => {
    pairs[key]![0].push(...Array.from(gotV));
    pairs[key]![1].push(...Array.from(wantV));
  };
  for (let r = 0; r < rows; r++) {
    const i = liveRows.indexOf(r);
    const gateAt = r * c.gateStride + c.gateIndex;
    // Other columns of dGates belong to other modules.
    for (let col = 0; col < c.gateStride; col++)
      if (col !== c.gateIndex) assert.is(bitsOf(got.dGates![r * c.gateStride + col]!), bitsOf(prior.dGates[r * c.gateStride + col]!), `${name}: dGates[${r}, ${col}] is another module's`);
    if (i >= 0) {
      const w = want.rows[i]!;
      add("tGated", got.tGated!.subarray(r * R, (r + 1) * R), w.tGated);
      add("dt", got.dt!.subarray(r * R, (r + 1) * R), w.dt);
      add("dGate", [got.dGates![gateAt]!], [w.dGate]);
      add("dExpertGates", got.dExpertGates!.subarray(r * E, (r + 1) * E), w.dh);
      add("dx", Array.from({ length: IN }, (_, k) => got.dx![r * IN + k]! - prior.dx[r * IN + k]!), w.dx);
      continue;
    }
    const untouched = (key: "dt" | "dExpertGates" | "dx", width: number) =>
      assert.ok(sameBits(got[key]!.subarray(r * width, (r + 1) * width), prior[key].subarray(r * width, (r + 1) * width)), `${name}: row ${r}: ${key} untouched`);
    untouched("dx", IN);
    if (mine(r)) {
      // A gated-off row of the slot: zero gradients, defined on every row of the slot.
      assert.equal(Array.from(got.dt!.subarray(r * R, (r + 1) * R)), new Array(R).fill(0), `${name}: gated-off row ${r}: dt = 0`);
      assert.equal(Array.from(got.dExpertGates!.subarray(r * E, (r + 1) * E)), new Array(E).fill(0), `${name}: gated-off row ${r}: dExpertGates = 0`);
      assert.is(got.dGates![gateAt], 0, `${name}: gated-off row ${r}: dGate = 0`);
    } else {
      untouched("dt", R);
      untouched("dExpertGates", E);
      assert.is(bitsOf(got.dGates![gateAt]!), bitsOf(prior.dGates[gateAt]!), `${name}: row ${r} of another slot: dGate untouched`);
    }
  }
  const errors: Record<string, number> = {};
  assert.ok(sameBits(pairs.tGated![0], pairs.tGated![1].map(Math.fround)), `${name}: t_gated is h * t bit for bit`);
  for (const key of ["dt", "dGate", "dExpertGates", "dx"]) errors[key] = relativeError(pairs[key]![0], pairs[key]![1]);
  const added = (v: Float32Array, before: Float32Array) => (c.accumulate ? Array.from(v, (g, i) => g - before[i]!) : v);
  errors.dA = relativeError(added(got.dA!, prior.dA), want.dA);
  errors.dB = relativeError(added(got.dB!, prior.dB), want.dB);
  console.log(`${name}: ${Object.entries(errors).map(([k, v]) => `${k} ${v.toExponential(1)}`).join(", ")}`);
  for (const [k, v] of Object.entries(errors)) assert.ok(v < BOUND, `${name}: ${k} relative error ${v} >= ${BOUND}`);
}

test("rank-gated backward (lora_rank_gate, lora_backward_input with experts, lora_grad_b on t_gated, lora_grad_a), as the graph runs it: 4 experts of rank 2, top 2 renormalised, odd sizes, rows of another slot, without adapter and gated off; accumulating", async () => {
  await checkBackward("E 4 rank 8", {
    inFeatures: 37,
    outFeatures: 45,
    rank: 8,
    E: 4,
    K: 2,
    renormalize: true,
    slots: [{ rank: 8, scaling: 2 }, { rank: 5, scaling: 0.5 }],
    slot: 0,
    rowAdapter: [0, 0, 1, 0, NO_ADAPTER, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, NO_ADAPTER, 0, 0, 1, 0],
    offRows: [3, 8, 14],
    gateStride: 7,
    gateIndex: 5,
    accumulate: true,
  });
});

test("rank-gated backward: 8 experts of rank 4 (the MOELoRA setting), top 4 plain, 301 in-features (more quads than lanes), 70 out; slot 1 trained; overwriting dA, dB", async () => {
  await checkBackward("E 8 rank 32", {
    inFeatures: 301,
    outFeatures: 70,
    rank: 32,
    E: 8,
    K: 4,
    renormalize: false,
    slots: [{ rank: 16, scaling: 1 }, { rank: 32, scaling: 0.25 }],
    slot: 1,
    rowAdapter: Array.from({ length: 40 }, (_, r) => (r % 7 === 3 ? 0 : r % 11 === 5 ? NO_ADAPTER : 1)),
    offRows: [2, 17, 30],
    gateStride: 3,
    gateIndex: 0,
    accumulate: false,
  });
});

test("rank-gated backward: 2 experts of rank 1, dense", async () => {
  await checkBackward("E 2 rank 2 dense", {
    inFeatures: 16,
    outFeatures: 20,
    rank: 2,
    E: 2,
    K: 2,
    renormalize: false,
    slots: [{ rank: 2, scaling: 1.5 }],
    slot: 0,
    rowAdapter: [0, 0, 0, NO_ADAPTER, 0, 0, 0],
    offRows: [5],
    gateStride: 1,
    gateIndex: 0,
    accumulate: true,
  });
});

// ---------------------------------------------------------------------------------------------------
// The joint balance loss

/**
 * Hugging Face transformers' Mixtral `load_balancing_loss_func` (no attention mask), transcribed, with
 * `routing_weights` (softmax of the concatenated gate logits, [T, E]) and the top_k picks given:
 *   expert_mask = one_hot(selected_experts, E)             # [T, K, E]
 *   tokens_per_expert = mean(expert_mask, dim=0)           # [K, E]
 *   router_prob_per_expert = mean(routing_weights, dim=0)  # [E]
 *   overall_loss = sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))
 *   return overall_loss * num_experts
 * `selected` comes from topk, which carries no gradient: the loss's gradient flows through P alone.
 */
function mixtralLoss(routingWeights: readonly (readonly number[])[], selected: readonly (readonly number[])[], E: number) {
  const T = routingWeights.length;
  const K = selected[0]!.length;
  const tokensPerExpert = Array.from({ length: K }, (_, k) => Array.from({ length: E }, (_, e) => selected.filter((s) => s[k] === e).length / T));
  const routerProb = Array.from({ length: E }, (_, e) => routingWeights.reduce((s, p) => s + p[e]!, 0) / T);
  let overall = 0;
  for (let k = 0; k < K; k++) for (let e = 0; e < E; e++) overall += tokensPerExpert[k]![e]! * routerProb[e]!;
  // d loss / d P[t][e]: E * sum_k tokens_per_expert[k][e] / T, the same for every token.
  const dP = Array.from({ length: E }, (_, e) => (E * tokensPerExpert.reduce((s, row) => s + row[e]!, 0)) / T);
  return { loss: overall * E, dP, picks: Array.from({ length: E }, (_, e) => selected.reduce((n, s) => n + s.filter((v) => v === e).length, 0)), probSums: routerProb.map((v) => v * T) };
}

test("the Mixtral loss transcription: its gradient on P is the central difference of the loss (picks fixed); a uniform router gives K", () => {
  const E = 5;
  const K = 2;
  const P = Array.from({ length: 9 }, () => softmax(drawLogits(E, K)));
  const selected = P.map((p) => topk(p, K));
  const { loss, dP } = mixtralLoss(P, selected, E);
  const eps = 1e-4;
  for (const [t, e] of [[0, 0], [3, 4], [8, 2]] as const) {
    const bump = (d: number) => mixtralLoss(P.map((p, i) => (i === t ? p.map((v, j) => (j === e ? v + d : v)) : p)), selected, E).loss;
    assert.ok(Math.abs((bump(eps) - bump(-eps)) / (2 * eps) - dP[e]!) < 1e-9, `dL/dP[${t}, ${e}]`);
  }
  assert.ok(loss > 0);
  // Every expert equally likely and equally often kept: L = K.
  const uniform = Array.from({ length: 10 }, () => new Array(E).fill(1 / E));
  const cyclic = uniform.map((_, t) => [t % E, (t + 1) % E]);
  assert.ok(Math.abs(mixtralLoss(uniform, cyclic, E).loss - K) < 1e-12);
});

interface BalanceCase {
  readonly E: number;
  readonly K: number;
  readonly renormalize: boolean;
  readonly modules: number;
  readonly rows: number;
}

/** moe_balance_sums per module (the first storing), moe_balance over T = rows x modules, moe_balance_grad per module. */
function balanceSteps(E: number, modules: number, rows: number, lossIndex: number, coef: number) {
  return [
    ...Array.from({ length: modules }, (_, m) => [moeBalanceSumsKernel({ experts: E }), { route: `route${m}` }, { decisions: rows, first: m === 0 ? 1 : 0 }] as const),
    [moeBalanceKernel({ experts: E }), {}, { decisions: rows * modules, lossIndex, coef }] as const,
    ...Array.from({ length: modules }, (_, m) => [moeBalanceGradKernel({ experts: E }), { route: `route${m}` }, { n: rows * E }] as const),
  ];
}

/** Checks the accumulator, the loss and every record after balanceSteps against mixtralLoss. */
function checkBalance(
  name: string,
  c: BalanceCase,
  coef: number,
  lossIndex: number,
  got: Record<string, Float32Array>,
  before: readonly Float32Array[],
  P: readonly (readonly number[])[],
  selected: readonly (readonly number[])[],
  lossBefore: Float32Array,
) {
  const { E, rows } = c;
  const RW = 3 * E;
  const want = mixtralLoss(P, selected, E);
  const balance = got.balance!;
  assert.equal(Array.from(balance.subarray(0, E)), want.picks, `${name}: picks per expert, exact`);
  assert.is(want.picks.reduce((a, b) => a + b, 0), c.K * rows * c.modules, `${name}: the f_i sum to K`);
  const errors: Record<string, number> = {
    probSums: relativeError(balance.subarray(E, 2 * E), want.probSums),
    loss: relativeError([got.loss![lossIndex]!], [want.loss]),
    grad: relativeError(balance.subarray(2 * E, 3 * E), want.dP.map((v) => coef * v)),
  };
  for (let i = 0; i < got.loss!.length; i++) if (i !== lossIndex) assert.is(bitsOf(got.loss![i]!), bitsOf(lossBefore[i]!), `${name}: loss[${i}] is another's`);
  if (c.K === E) assert.ok(Math.abs(got.loss![lossIndex]! - E) < 1e-5 * E, `${name}: dense: L = E`);
  // Each record: P and the gates unchanged, the gradient part the accumulator's bits on the `rows`
  // rows, rows past them untouched.
  before.forEach((rec, m) => {
    const after = got[`route${m}`]!;
    for (let r = 0; r < rec.length / RW; r++)
      for (let i = 0; i < RW; i++) {
        const at = r * RW + i;
        const wantBits = r < rows && i >= 2 * E ? bitsOf(balance[i]!) : bitsOf(rec[at]!);
        if (bitsOf(after[at]!) !== wantBits) assert.unreachable(`${name}: module ${m}, record row ${r}, column ${i}: ${after[at]} (${r < rows && i >= 2 * E ? "the gradient" : "untouched"})`);
      }
  });
  console.log(`${name}: ${Object.entries(errors).map(([k, v]) => `${k} ${v.toExponential(1)}`).join(", ")}`);
  for (const [k, v] of Object.entries(errors)) assert.ok(v < BOUND, `${name}: ${k} relative error ${v} >= ${BOUND}`);
}

for (const c of [
  { E: 2, K: 1, renormalize: true, modules: 3, rows: 150 },
  { E: 5, K: 2, renormalize: false, modules: 3, rows: 150 },
  { E: 8, K: 4, renormalize: true, modules: 2, rows: 61 },
  { E: 13, K: 3, renormalize: true, modules: 4, rows: 100 }, // a partial chunk of the sums' 8-expert reduction
  { E: 64, K: 8, renormalize: false, modules: 2, rows: 70 },
  { E: 8, K: 8, renormalize: false, modules: 3, rows: 90 }, // dense
] satisfies BalanceCase[]) {
  const label = `${c.E} experts, ${c.K === c.E ? "dense" : `top ${c.K}${c.renormalize ? " renormalised" : ""}`}, ${c.modules} modules of ${c.rows} rows`;
  test(`balance loss (moe_balance_sums, moe_balance, moe_balance_grad), ${label}: Mixtral's loss and gradient on P within 1e-5, picks exact`, async () => {
    const { E, K, modules, rows } = c;
    const RW = 3 * E;
    const extra = 7; // record rows past `decisions` (the graph's records have maxRows): never read
    const coef = 0.37;
    const lossIndex = 1;
    const P: number[][] = [];
    const selected: number[][] = [];
    const records = Array.from({ length: modules }, () => {
      const rec = nanFilled((rows + extra) * RW);
      for (let r = 0; r < rows; r++) {
        const p = Array.from(Float32Array.from(softmax(drawLogits(E, K)))); // the record's f32 P is the routing weights
        rec.set(p, r * RW);
        rec.set(gatesOf(p, K, c.renormalize), r * RW + E);
        P.push(p);
        selected.push(topk(p, K));
      }
      rec.fill(1000, rows * RW); // counted by mistake, these would show
      return rec;
    });
    const lossBefore = randomFloats(random, 4);
    const data = Object.fromEntries([...records.map((r, m) => [`route${m}`, r] as const), ["balance", nanFilled(moeBalanceLength(E))], ["loss", lossBefore]]);
    const got = await runSteps(gpu, data, balanceSteps(E, modules, rows, lossIndex, coef), ["balance", "loss", ...records.map((_, m) => `route${m}`)]);
    checkBalance(label, c, coef, lossIndex, got, records, P, selected, lossBefore);
  });
}

test("the per_module forward and balance as the graph runs them: each module's router (router_train_forward, token routing, no activation) then its sums, the joint loss, the gradient into each record; 3 modules (in 37, 37, 90), 8 experts, top 4 renormalised, 150 rows", async () => {
  const E = 8;
  const K = 4;
  const rows = 150;
  const ins = [37, 37, 90];
  const coef = 0.01;
  const lossIndex = 0;
  const constants = (hidden: number): RouterTrainConstants => ({ hidden, experts: E, when: "token", pooling: "last", activation: "none", selection: { rule: "top_k", k: K }, renormalize: true });
  const P: number[][] = [];
  const selected: number[][] = [];
  const gatesWant: number[] = [];
  const data: Record<string, Float32Array> = { balance: nanFilled(moeBalanceLength(E)), loss: nanFilled(2) };
  ins.forEach((H, m) => {
    const w = randomFloats(random, E * H, 3 / Math.sqrt(H));
    const x = new Float32Array(rows * H);
    for (let r = 0; r < rows; r++)
      for (;;) {
        const row = randomFloats(random, H);
        const z = Array.from({ length: E }, (_, e) => row.reduce((s, v, k) => s + v * w[e * H + k]!, 0));
        if (margin(z, K) < MARGIN) continue;
        x.set(row, r * H);
        const p = softmax(z);
        P.push(p);
        selected.push(topk(p, K));
        gatesWant.push(...gatesOf(p, K, true));
        break;
      }
    Object.assign(data, { [`x${m}`]: x, [`w${m}`]: w, [`route${m}`]: nanFilled(rows * 3 * E), [`table${m}`]: nanFilled(rows * E) });
  });
  const steps = [
    ...ins.flatMap((H, m) => [
      [routerTrainForwardKernel(constants(H)), { x: `x${m}`, weight: `w${m}`, route: `route${m}`, table: `table${m}` }, { decisions: rows, gateStride: E, gateIndex0: 0 }] as const,
      [moeBalanceSumsKernel({ experts: E }), { route: `route${m}` }, { decisions: rows, first: m === 0 ? 1 : 0 }] as const,
    ]),
    [moeBalanceKernel({ experts: E }), {}, { decisions: rows * ins.length, lossIndex, coef }] as const,
    ...ins.map((_, m) => [moeBalanceGradKernel({ experts: E }), { route: `route${m}` }, { n: rows * E }] as const),
  ];
  const got = await runSteps(gpu, data, steps, ["balance", "loss", ...ins.map((_, m) => `route${m}`)]);
  const RW = 3 * E;
  const part = (from: number) => ins.flatMap((_, m) => Array.from({ length: rows * E }, (_, i) => got[`route${m}`]![Math.floor(i / E) * RW + from + (i % E)]!));
  const probError = relativeError(part(0), P.flat());
  const gateError = relativeError(part(E), gatesWant);
  console.log(`graph order: router P ${probError.toExponential(1)}, gates ${gateError.toExponential(1)}`);
  assert.ok(probError < BOUND && gateError < BOUND, "the routers' records");
  const want = mixtralLoss(P, selected, E);
  assert.equal(Array.from(got.balance!.subarray(0, E)), want.picks, "picks per expert, exact");
  const errors = {
    probSums: relativeError(got.balance!.subarray(E, 2 * E), want.probSums),
    loss: relativeError([got.loss![lossIndex]!], [want.loss]),
    grad: relativeError(part(2 * E), Array.from({ length: ins.length * rows * E }, (_, i) => coef * want.dP[i % E]!)),
  };
  console.log(`graph order: ${Object.entries(errors).map(([k, v]) => `${k} ${v.toExponential(1)}`).join(", ")}`);
  for (const [k, v] of Object.entries(errors)) assert.ok(v < BOUND, `graph order: ${k} relative error ${v}`);
});

test("the balance kernels refuse expert counts out of range", () => {
  assert.throws(() => moeBalanceSumsKernel({ experts: 65 }), /experts must be an integer from 1 to 64/);
  assert.throws(() => moeBalanceKernel({ experts: 0 }), /experts must be an integer from 1 to 64/);
  assert.throws(() => moeBalanceGradKernel({ experts: 2.5 }), /experts must be an integer from 1 to 64/);
});

test.after(() => gpu.context.destroy());
test.run();
