// MiLoRA's router for TRAINING (paper eq. 2-5, 8; docs: ../shared/docs/milora.md): the forward pass of
// one routed layer that also saves what the backward (router-train-backward.ts) needs, and the
// load-balancing loss of eq. 4-5. Separate from the inference router (router.ts): a training step
// packs whole prompt+answer sequences as rows, needs the full softmax of every decision, and writes
// gates into every row of a sequence (prompt and completion alike).
//
// Per routed layer, with H = hidden, N = experts (the layer's enabled modules, 1..8; up to 64 for a
// per_module router, moe-train.ts, which routes each row of one module's input), D = decisions:
//   prompt routing (`when prompt`): one decision per sequence s (D = S), pooled p_s from the prompt rows
//     of x: last | mean | max (elementwise) | attention (u_t = x_t . w_sa, a = softmax_t(u), p = sum a_t x_t);
//   token routing (`when token`): one decision per row (D = rows), p = that row of x (no pooling);
//   v = g(p) (none | relu | gelu, exact erf form | rational Ra of eq. 6), z = v W_r^T, P = softmax(z);
//   gates: top_k keeps P of the k largest logits (ties to the lower expert index), or with `renormalize`
//     a softmax over the chosen logits; threshold keeps P_e >= t (always holding the top-1, which alone
//     is kept when no P_e reaches t), optionally renormalised; dense keeps all.
// Noisy gating (Shazeer et al.; `noise true` in the authors' code) is NOT implemented here.
//
// Buffers (f32 unless noted):
//   x       [rows, H]      the layer's input rows (residual stream before the layer), packed sequences
//   spans   u32 [S, 3]     per sequence: first row, one past its last PROMPT row, one past its last row
//                          (prompt routing only; see routerSpans)
//   weight  [N, H]         W_r
//   pooler  [H]            w_sa (attention pooling only)
//   rational [m + 1 + n]   a_0..a_m, b_1..b_n (rational activation only)
//   pooled  [D, H]         saved: p before the activation (prompt routing only)
//   attn    [rows]         saved: the pooler's softmax weight a_t of each prompt row (attention only;
//                          rows outside prompts are not written)
//   route   [D, 3N]        saved decision record: P (N), gates G (N, 0 where not chosen), and the balance
//                          loss's gradient on P (N; written 0 here, by routerBalanceKernel later)
//   table   [rows, gateStride] the gate table the LoRA kernels read: column gateIndex0 + e of every row
//                          of a decision gets G_e (zero when not chosen); other columns are not touched.
// Determinism: every sum has a fixed order (lane-strided partial sums, then a fixed tree), no atomics.
// Values reduced across the workgroup live in workgroup memory and are re-read at each use (Mesa 22.3
// llvmpipe loses reduced values held in registers across later barriers, docs/drivers.md).
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, kernelSource, type StorageDecl } from "./wgsl.ts";

export type RouterTrainPooling = "last" | "mean" | "max" | "attention";
export type RouterTrainActivation = "none" | "relu" | "gelu" | "rational";
export type RouterTrainSelection = { readonly rule: "top_k"; readonly k: number } | { readonly rule: "threshold"; readonly threshold: number } | { readonly rule: "dense" };

export interface RouterTrainConstants {
  readonly hidden: number;
  /** N, the layer's enabled modules (1..8), in the gate table's column order; a per_module router's experts (up to 64). */
  readonly experts: number;
  readonly when: "prompt" | "token";
  /** Ignored for token routing. */
  readonly pooling: RouterTrainPooling;
  readonly activation: RouterTrainActivation;
  /** Orders m, n of the rational activation; default 6 and 5 (the paper's). */
  readonly rational?: { readonly numerator: number; readonly denominator: number };
  readonly selection: RouterTrainSelection;
  /** Gates = softmax over the chosen logits (the authors' code) instead of the paper's P. */
  readonly renormalize: boolean;
}

export const ROUTER_TRAIN_WORKGROUP = 64;
/** MiLoRA's routers have at most 8 experts (the modules); a per_module router (moe-train.ts) up to 64. */
export const ROUTER_TRAIN_MAX_EXPERTS = 64;
/** Experts reduced across the workgroup at once (workgroup memory: ROUTER_TRAIN_CHUNK x 64 floats). */
export const ROUTER_TRAIN_CHUNK = 8;
const WG = ROUTER_TRAIN_WORKGROUP;
const NEG_INF = "-3.0e38";

/** Per sequence (first row, prompt end, end) for packed sequences; prompts of at least one row. */
export function routerSpans(lengths: readonly number[], promptLengths: readonly number[]): Uint32Array {
  if (lengths.length !== promptLengths.length) throw new Error("routerSpans: lengths and prompt lengths differ in count");
  const out = new Uint32Array(3 * lengths.length);
  let first = 0;
  lengths.forEach((n, s) => {
    const p = promptLengths[s]!;
    if (!(Number.isInteger(p) && p >= 1 && p <= n)) throw new Error(`routerSpans: sequence ${s} has prompt ${p} of ${n} rows`);
    out.set([first, first + p, first + n], 3 * s);
    first += n;
  });
  return out;
}

/** The checked shape every router training kernel derives from its constants. */
export function routerTrainShape(c: RouterTrainConstants) {
  const { hidden: H, experts: N } = c;
  if (!Number.isInteger(H) || H < 1) throw new Error(`router train: hidden ${H} must be a positive integer`);
  if (!Number.isInteger(N) || N < 1 || N > ROUTER_TRAIN_MAX_EXPERTS) throw new Error(`router train: ${N} experts, expected 1 to ${ROUTER_TRAIN_MAX_EXPERTS}`);
  const s = c.selection;
  if (s.rule === "top_k" && !(Number.isInteger(s.k) && s.k >= 1 && s.k <= N)) throw new Error(`router train: top_k ${s.k} must be between 1 and the ${N} experts`);
  if (s.rule === "threshold" && !(s.threshold >= 0 && s.threshold <= 1)) throw new Error(`router train: threshold ${s.threshold} must be in [0, 1]`);
  const orders = c.activation === "rational" ? (c.rational ?? { numerator: 6, denominator: 5 }) : { numerator: 0, denominator: 0 };
  if (c.activation === "rational" && !(Number.isInteger(orders.numerator) && Number.isInteger(orders.denominator) && orders.numerator >= 0 && orders.denominator >= 0 && orders.numerator <= 10 && orders.denominator <= 10))
    throw new Error(`router train: rational orders ${JSON.stringify(orders)} must be integers in 0..10`);
  const coefficients = c.activation === "rational" ? orders.numerator + 1 + orders.denominator : 0;
  const prompt = c.when === "prompt";
  const attention = prompt && c.pooling === "attention";
  return { H, N, orders, coefficients, prompt, attention, recordWidth: 3 * N, chunk: Math.min(N, ROUTER_TRAIN_CHUNK) };
}

/** Floats of the `route` record buffer for `decisions` decisions. */
export function routeRecordLength(c: RouterTrainConstants, decisions: number): number {
  return decisions * 3 * c.experts;
}

/** The constants as a cache-key fragment. */
export function routerTrainKey(c: RouterTrainConstants): Record<string, string | number | boolean> {
  const { orders } = routerTrainShape(c);
  const s = c.selection;
  const selection = s.rule === "dense" ? "dense" : s.rule === "top_k" ? `top_k${s.k}` : `threshold${f32Literal(s.threshold)}`;
  return {
    hidden: c.hidden,
    experts: c.experts,
    when: c.when,
    pooling: c.when === "prompt" ? c.pooling : "-",
    activation: c.activation === "rational" ? `rational${orders.numerator}-${orders.denominator}` : c.activation,
    selection: c.renormalize ? `${selection}-renormalize` : selection,
  };
}

// Phi (the standard normal CDF) in f32 through erfc(z), z = |x| / sqrt(2): below z = 1 as 1 - erf with
// erf(z) = 2/sqrt(pi) e^(-z^2) z sum_n (2z^2)^n / (2n+1)!! (all terms positive, 15 terms nested from the
// highest; truncation < 1e-9), from 1 on by Laplace's continued fraction erfc(z) = e^(-z^2)/sqrt(pi) /
// (z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))) with 40 levels evaluated from the bottom (truncation < 3e-7
// relative at z = 1, far less above). e^(-z^2) = e^(-x^2/2) is taken from x, split as
// e^(-xh^2/2) e^(-(x - xh)(x + xh)/2) with xh = |x| rounded down to 1/16 (xh^2 exact) and the first
// factor's argument reduced by ln 2, so neither the rounding of z, of x^2 nor of exp's own scaling
// reaches the exponent. Measured against float64 (the router-train test,
// x in [-12, 12] by 0.001, Mesa 22.3 llvmpipe): |gelu error| <= 1e-7 (1 + |x|), relative error in the
// negative tail x in [-8, -1] <= 1.8e-6 (largest just below z = 1, where erfc is 1 - erf), |gelu' error|
// <= 2.6e-7. (Abramowitz-Stegun 7.1.26, 1.5e-7 absolute, would do
// near 0 but is a 100% error of Phi(-5.5) = 1.9e-8.)
const ERF_WGSL = /* wgsl */ `
// e^(-y) for 0 <= y <= 100 with the argument reduced first (Cody-Waite: y = k ln2 + r, |r| <= ln2 / 2,
// ln2 in two parts, the first exact times k), as exp(y) itself may be exp2(y log2(e)) with the
// product's rounding (relative 2^-24 of y) in the exponent.
fn exp_neg(y: f32) -> f32 {
  let k = round(y * 1.4426950408889634);
  let r = (y - k * 0.693145751953125) - k * 1.4286068203094173e-6;
  return ldexp(exp(-r), -i32(k));
}

// e^(-a^2 / 2) for 0 <= a <= 14.
fn exp_neg_half_sq(a: f32) -> f32 {
  let ah = floor(a * 16.0) * 0.0625;
  return exp_neg(0.5 * (ah * ah)) * exp(-0.5 * ((a - ah) * (a + ah)));
}

// erfc(z) for z >= 0, given e = e^(-z^2).
fn erfc_with(z: f32, e: f32) -> f32 {
  if (z < 1.0) {
    let z2 = 2.0 * z * z;
    var r = 1.0;
    for (var n = 15; n >= 1; n--) { r = 1.0 + r * (z2 / f32(2 * n + 1)); }
    return 1.0 - (1.1283791670955126 * e) * z * r;
  }
  var cf = z;
  for (var k = 40; k >= 1; k--) { cf = z + (f32(k) * 0.5) / cf; }
  return e / (1.7724538509055159 * cf);
}

fn normal_cdf(x: f32) -> f32 {
  let a = min(abs(x), 14.0);
  let c = 0.5 * erfc_with(a * 0.70710678118654752, exp_neg_half_sq(a));
  return select(c, 1.0 - c, x > 0.0);
}

fn normal_pdf(x: f32) -> f32 {
  return 0.3989422804014327 * exp_neg_half_sq(min(abs(x), 14.0));
}`;

/**
 * WGSL of the activation g, elementwise on f32: `fn act(x) -> f32` and `fn act_grad(x) -> f32` (dg/dx);
 * for rational also `fn rat_parts(x) -> RatParts` (P, P', Q, Q' of Ra = P / (1 + |Q|)) reading the
 * `rational` binding: a_0..a_m at [0, m], b_1..b_n at [m + 1, m + n]. relu's derivative is 0 at 0.
 */
export function routerActivationWgsl(activation: RouterTrainActivation, orders = { numerator: 6, denominator: 5 }): string {
  switch (activation) {
    case "none":
      return "fn act(x: f32) -> f32 { return x; }\nfn act_grad(x: f32) -> f32 { return 1.0; }";
    case "relu":
      return "fn act(x: f32) -> f32 { return max(x, 0.0); }\nfn act_grad(x: f32) -> f32 { return select(0.0, 1.0, x > 0.0); }";
    case "gelu":
      return `${ERF_WGSL}
fn act(x: f32) -> f32 { return x * normal_cdf(x); }
fn act_grad(x: f32) -> f32 { return normal_cdf(x) + x * normal_pdf(x); }`;
    case "rational": {
      const { numerator: m, denominator: n } = orders;
      return /* wgsl */ `
struct RatParts { p: f32, dp: f32, q: f32, dq: f32 }

// Horner: P = a_m x^m + ... + a_0 with P'; Q = x R(x), R = b_n x^(n-1) + ... + b_1, Q' = R + x R'.
fn rat_parts(x: f32) -> RatParts {
  var p = rational[${m}];
  var dp = 0.0;
  for (var j = ${m - 1}; j >= 0; j--) {
    dp = dp * x + p;
    p = p * x + rational[j];
  }
  var q = 0.0;
  var dq = 0.0;
  if (${n}u > 0u) {
    var r = rational[${m + n}];
    var dr = 0.0;
    for (var i = ${n - 1}; i >= 1; i--) {
      dr = dr * x + r;
      r = r * x + rational[${m} + i];
    }
    q = x * r;
    dq = r + x * dr;
  }
  return RatParts(p, dp, q, dq);
}

fn act(x: f32) -> f32 {
  let t = rat_parts(x);
  return t.p / (1.0 + abs(t.q));
}

// dRa/dx = P'/den - P sign(Q) Q' / den^2, den = 1 + |Q| (sign(0) = 0, as the reference's |.|).
fn act_grad(x: f32) -> f32 {
  let t = rat_parts(x);
  let den = 1.0 + abs(t.q);
  return t.dp / den - t.p * sign(t.q) * t.dq / (den * den);
}`;
    }
  }
}

/** Storage of the activation's coefficients (rational only). */
export function routerActivationStorage(activation: RouterTrainActivation): StorageDecl[] {
  return activation === "rational" ? [{ name: "rational", access: "read", type: "array<f32>" }] : [];
}

// lid 0's choice of experts given z (logits), ex = exp(z - z[best]), prob; sets chosen[].
function chooseWgsl(s: RouterTrainSelection): string {
  switch (s.rule) {
    case "dense":
      return "for (var e = 0u; e < N; e++) { chosen[e] = true; }";
    case "top_k":
      // Repeated argmax of the logits with a strict comparison: the lower index wins ties.
      return `for (var n = 0u; n < ${s.k}u; n++) {
      var pick = N;
      for (var e = 0u; e < N; e++) {
        if (!chosen[e] && (pick == N || z[e] > z[pick])) { pick = e; }
      }
      chosen[pick] = true;
    }`;
    case "threshold":
      // P_e >= t; the argmax always passes when any expert does, and is kept alone when none does.
      return `for (var e = 0u; e < N; e++) { chosen[e] = e == best || prob[e] >= ${f32Literal(s.threshold)}; }`;
  }
}

/**
 * The training forward of one routed layer: one workgroup of 64 per decision.
 *   bindings: x (read), [spans (read, u32) prompt], weight (read), [pooler (read) attention],
 *             [rational (read) rational], [pooled (read_write) prompt], [attn (read_write) attention],
 *             route (read_write), table (read_write)
 *   params:   decisions (S, or rows for token routing), gateStride, gateIndex0
 *   dispatch: grid(decisions)
 */
export function routerTrainForwardKernel(c: RouterTrainConstants): KernelSource {
  const { H, N, orders, prompt, attention, recordWidth: RW, chunk: CH } = routerTrainShape(c);
  const pooling = c.pooling;
  const storage: StorageDecl[] = [
    { name: "x", access: "read", type: "array<f32>" },
    ...(prompt ? [{ name: "spans", access: "read", type: "array<u32>" } as const] : []),
    { name: "weight", access: "read", type: "array<f32>" },
    ...(attention ? [{ name: "pooler", access: "read", type: "array<f32>" } as const] : []),
    ...routerActivationStorage(c.activation),
    ...(prompt ? [{ name: "pooled", access: "read_write", type: "array<f32>" } as const] : []),
    ...(attention ? [{ name: "attn", access: "read_write", type: "array<f32>" } as const] : []),
    { name: "route", access: "read_write", type: "array<f32>" },
    { name: "table", access: "read_write", type: "array<f32>" },
  ];
  // p for column h of this decision, given first / pend (the prompt rows) and, for attention, attn[].
  const pooledValue: Record<RouterTrainPooling, string> = {
    last: "p = x[(pend - 1u) * H + h];",
    mean: `var s = 0.0;
      for (var t = first; t < pend; t++) { s += x[t * H + h]; }
      p = s * (1.0 / f32(pend - first));`,
    max: `p = x[first * H + h];
      for (var t = first + 1u; t < pend; t++) { p = max(p, x[t * H + h]); }`,
    attention: `var s = 0.0;
      for (var t = first; t < pend; t++) { s += attn[t] * x[t * H + h]; }
      p = s;`,
  };
  const attentionWeights = /* wgsl */ `
  // Scores u_t = x_t . w_sa, one lane per prompt row (dot in column order), then softmax over the prompt.
  var laneMax = ${NEG_INF};
  for (var t = first + lid; t < pend; t += ${WG}u) {
    var u = 0.0;
    for (var k = 0u; k < H; k++) { u += x[t * H + k] * pooler[k]; }
    attn[t] = u;
    laneMax = max(laneMax, u);
  }
  partial[lid] = laneMax;
  for (var stride = ${WG / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { partial[lid] = max(partial[lid], partial[lid + stride]); }
  }
  workgroupBarrier();
  if (lid == 0u) { stats[0] = partial[0]; }
  workgroupBarrier();
  var laneSum = 0.0;
  for (var t = first + lid; t < pend; t += ${WG}u) { laneSum += exp(attn[t] - stats[0]); }
  partial[lid] = laneSum;
  for (var stride = ${WG / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { partial[lid] += partial[lid + stride]; }
  }
  workgroupBarrier();
  if (lid == 0u) { stats[1] = stats[0] + log(partial[0]); }
  workgroupBarrier();
  // Each lane turns its own rows' scores into weights a_t = exp(u_t - lse); then all lanes read all.
  for (var t = first + lid; t < pend; t += ${WG}u) { attn[t] = exp(attn[t] - stats[1]); }
  storageBarrier();
  workgroupBarrier();`;
  const renormalize = c.renormalize && c.selection.rule !== "dense";
  return kernelSource({
    name: "router_train_forward",
    constants: routerTrainKey(c),
    storage,
    params: [
      { name: "decisions", type: "u32" },
      { name: "gateStride", type: "u32" },
      { name: "gateIndex0", type: "u32" },
    ],
    body: /* wgsl */ `
const H = ${H}u;
const N = ${N}u;
const RW = ${RW}u;
${routerActivationWgsl(c.activation, orders)}

var<workgroup> partial: array<f32, ${Math.max(CH, 1) * WG}>;
var<workgroup> stats: array<f32, 2>;
var<workgroup> logits: array<f32, N>;
var<workgroup> gateOut: array<f32, N>;

@compute @workgroup_size(${WG})
fn main(${GROUP_BUILTINS}) {
  let d = ${LINEAR_GROUP};
  if (d >= params.decisions) { return; }
${
  prompt
    ? `  let first = spans[3u * d];
  let pend = spans[3u * d + 1u];
  let end = spans[3u * d + 2u];`
    : `  let first = d;
  let end = d + 1u;`
}
${attention ? attentionWeights : ""}
  // Pooled value (prompt) or the row itself (token), activation, and this lane's share of the logits.
  var acc: array<f32, N>;
  for (var h = lid; h < H; h += ${WG}u) {
    var p = 0.0;
${prompt ? `    {\n      ${pooledValue[pooling]}\n    }\n    pooled[d * H + h] = p;` : "    p = x[d * H + h];"}
    let v = act(p);
    for (var e = 0u; e < N; e++) { acc[e] += v * weight[e * H + h]; }
  }
  // The lanes' partial logits tree-summed, ${CH} experts at a time.
  for (var e0 = 0u; e0 < N; e0 += ${CH}u) {
    for (var k = 0u; k < ${CH}u; k++) {
      if (e0 + k < N) { partial[k * ${WG}u + lid] = acc[e0 + k]; }
    }
    for (var stride = ${WG / 2}u; stride > 0u; stride /= 2u) {
      workgroupBarrier();
      if (lid < stride) {
        for (var k = 0u; k < ${CH}u; k++) { partial[k * ${WG}u + lid] += partial[k * ${WG}u + lid + stride]; }
      }
    }
    workgroupBarrier();
    if (lid == 0u) {
      for (var k = 0u; k < ${CH}u; k++) {
        if (e0 + k < N) { logits[e0 + k] = partial[k * ${WG}u]; }
      }
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    var z: array<f32, N>;
    for (var e = 0u; e < N; e++) { z[e] = logits[e]; }
    var best = 0u;
    for (var e = 1u; e < N; e++) { if (z[e] > z[best]) { best = e; } }
    var ex: array<f32, N>;
    var total = 0.0;
    for (var e = 0u; e < N; e++) {
      ex[e] = exp(z[e] - z[best]);
      total += ex[e];
    }
    var prob: array<f32, N>;
    for (var e = 0u; e < N; e++) { prob[e] = ex[e] / total; }
    var chosen: array<bool, N>;
    ${chooseWgsl(c.selection)}
${
  renormalize
    ? `    var kept = 0.0;
    for (var e = 0u; e < N; e++) { if (chosen[e]) { kept += ex[e]; } }
    for (var e = 0u; e < N; e++) { gateOut[e] = select(0.0, ex[e] / kept, chosen[e]); }`
    : `    for (var e = 0u; e < N; e++) { gateOut[e] = select(0.0, prob[e], chosen[e]); }`
}
    for (var e = 0u; e < N; e++) {
      route[d * RW + e] = prob[e];
      route[d * RW + N + e] = gateOut[e];
      route[d * RW + 2u * N + e] = 0.0;
    }
  }
  workgroupBarrier();
  // The decision's gates into every one of its rows (prompt and completion).
  let cells = (end - first) * N;
  for (var i = lid; i < cells; i += ${WG}u) {
    table[(first + i / N) * params.gateStride + params.gateIndex0 + i % N] = gateOut[i % N];
  }
}`,
    dispatch: { grid: { param: "decisions" } },
  });
}

/**
 * The load-balancing loss of one routed layer (eq. 4-5) over its D decisions, one workgroup:
 *   L = N * sum_i f_i * mean_d P_{d,i},  f_i = (decisions whose argmax P is i, lower index on ties) / D,
 * f without gradient. Writes L to loss[lossIndex] and coef * dL/dP_{d,i} = coef * N * f_i / D into the
 * third part of each decision's route record (the backward adds it to the gates' gradient on P).
 * coef = balance / routedLayers (the total loss is balance * mean over routed layers of L).
 *   bindings: route (read_write, [D, 3N]), loss (read_write, f32)
 *   params:   decisions, lossIndex, coef
 *   dispatch: [1, 1, 1]
 */
export function routerBalanceKernel(c: { readonly experts: number }): KernelSource {
  const N = c.experts;
  // MiLoRA's routers only (a layer's modules); per_module routers balance jointly (moe-train.ts).
  if (!Number.isInteger(N) || N < 1 || N > 8) throw new Error(`router balance: ${N} experts, expected 1 to 8`);
  return kernelSource({
    name: "router_balance",
    constants: { experts: N },
    storage: [
      { name: "route", access: "read_write", type: "array<f32>" },
      { name: "loss", access: "read_write", type: "array<f32>" },
    ],
    params: [
      { name: "decisions", type: "u32" },
      { name: "lossIndex", type: "u32" },
      { name: "coef", type: "f32" },
    ],
    body: /* wgsl */ `
const N = ${N}u;
const RW = ${3 * N}u;

// Rows 0..N-1: argmax counts (exact integers in f32); rows N..2N-1: sums of P.
var<workgroup> partial: array<f32, ${2 * N * WG}>;
var<workgroup> dp: array<f32, N>;

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32) {
  let D = params.decisions;
  var count: array<f32, N>;
  var sum: array<f32, N>;
  for (var d = lid; d < D; d += ${WG}u) {
    var top = 0u;
    for (var e = 0u; e < N; e++) {
      let p = route[d * RW + e];
      sum[e] += p;
      if (p > route[d * RW + top]) { top = e; }
    }
    count[top] += 1.0;
  }
  for (var e = 0u; e < N; e++) {
    partial[e * ${WG}u + lid] = count[e];
    partial[(N + e) * ${WG}u + lid] = sum[e];
  }
  for (var stride = ${WG / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) {
      for (var k = 0u; k < 2u * N; k++) { partial[k * ${WG}u + lid] += partial[k * ${WG}u + lid + stride]; }
    }
  }
  workgroupBarrier();
  if (lid == 0u) {
    let inv = 1.0 / f32(max(D, 1u));
    var l = 0.0;
    for (var e = 0u; e < N; e++) {
      let f = partial[e * ${WG}u] * inv;
      l += f * (partial[(N + e) * ${WG}u] * inv);
      dp[e] = params.coef * f32(N) * f * inv;
    }
    loss[params.lossIndex] = f32(N) * l;
  }
  workgroupBarrier();
  for (var i = lid; i < D * N; i += ${WG}u) {
    route[(i / N) * RW + 2u * N + i % N] = dp[i % N];
  }
}`,
    dispatch: { groups: [1, 1, 1] },
  });
}
