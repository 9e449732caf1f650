// Backward of the training router (router-train.ts) for one routed layer, in two kernels:
//   routerTrainBackwardKernel  one workgroup per decision: the decision's gate gradient (dGates summed
//       over its rows: all rows of the sequence for prompt routing, the row itself for token routing),
//       through the selection (chosen experts only; with renormalize the softmax over the chosen logits)
//       and the softmax (adding the balance loss's gradient on P saved in the route record) to dz; then
//       dv = dz W_r, dp = dv g'(p) (and the rational coefficients' per-decision gradients), then the
//       pooling's backward, ADDING into dx (the residual-stream gradient the layer's other gradients
//       also land in). Pooling: last -> the last prompt row; mean -> every prompt row, dp / n; max ->
//       the first prompt row holding the column's maximum; attention -> a_t dp + du_t w_sa with
//       da_t = dp . x_t, du_t = a_t (da_t - sum_t' a_t' da_t'). Token routing: dx[row] += dp.
//   routerTrainGradKernel      one invocation per column of H: dW_r[e, h] = sum_d dz_{d,e} g(p_{d,h}),
//       d w_sa[h] = sum_d (sum_t du_t x_t[h]) (centred, see the kernel), and d rational[c] = sum_d of the per-decision sums (the
//       first m + 1 + n invocations), every sum over decisions in decision order (no atomics).
// `accumulate` adds dWeight, dPooler and dRational to what they hold (micro-batch accumulation); dx is
// always added to.
//
// Buffers beyond router-train.ts's (f32):
//   dGates     [rows, gateStride] the LoRA backward's per-row gate gradients; column gateIndex0 + e is
//              read only where expert e was chosen (other values, NaN included, never reach a result)
//   dx         [rows, H]   the residual-stream gradient, added to on the decisions' prompt rows (or rows)
//   scratch    [routerScratchLength] per decision d at d * SW, SW = N + C (+ 2H for attention):
//              dz (N), the rational coefficients' gradient of this decision (C = m + 1 + n),
//              dp (H, attention), sum_t du_t x_t (H, attention, summed centred); then one float per row (du_t).
//   dWeight    [N, H]; dPooler [H] (attention); dRational [m + 1 + n] (rational)
// Values reduced across the workgroup are kept in workgroup memory and re-read where used
// (docs/drivers.md). Values one lane writes to `scratch` or `dx` and another reads are separated by
// storageBarrier().
import type { KernelSource } from "./kernel.ts";
import { ROUTER_TRAIN_WORKGROUP, routerActivationStorage, routerActivationWgsl, routerTrainKey, routerTrainShape, type RouterTrainConstants } from "./router-train.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource, type StorageDecl } from "./wgsl.ts";

const WG = ROUTER_TRAIN_WORKGROUP;

export interface RouterTrainBackwardConstants extends RouterTrainConstants {
  /** dWeight, dPooler, dRational += instead of = (routerTrainGradKernel only). */
  readonly accumulate: boolean;
}

function scratchShape(c: RouterTrainConstants) {
  const s = routerTrainShape(c);
  const width = s.N + s.coefficients + (s.attention ? 2 * s.H : 0);
  return { ...s, width, dc: s.N, dp: s.N + s.coefficients, dw: s.N + s.coefficients + s.H };
}

/** Floats of the backward's scratch buffer for `decisions` decisions over `rows` rows. */
export function routerScratchLength(c: RouterTrainConstants, decisions: number, rows: number): number {
  return decisions * scratchShape(c).width + rows;
}

/**
 * The per-decision backward (see the top of this file). One workgroup of 64 per decision.
 *   bindings: x (read), [spans (read, u32) prompt], weight (read), [pooler (read) attention],
 *             [rational (read) rational], [pooled (read) prompt], [attn (read) attention],
 *             route (read), dGates (read), scratch (read_write), dx (read_write)
 *   params:   decisions, gateStride, gateIndex0
 *   dispatch: grid(decisions)
 */
export function routerTrainBackwardKernel(c: RouterTrainConstants): KernelSource {
  const { H, N, orders, coefficients: C, prompt, attention, recordWidth: RW, width: SW, dc, dp, dw, chunk: CH } = scratchShape(c);
  const renormalize = c.renormalize && c.selection.rule !== "dense";
  const storage: StorageDecl[] = [
    { name: "x", access: "read", type: "array<f32>" },
    ...(prompt ? [{ name: "spans", access: "read", type: "array<u32>" } as const] : []),
    { name: "weight", access: "read", type: "array<f32>" },
    ...(attention ? [{ name: "pooler", access: "read", type: "array<f32>" } as const] : []),
    ...routerActivationStorage(c.activation),
    ...(prompt ? [{ name: "pooled", access: "read", type: "array<f32>" } as const] : []),
    ...(attention ? [{ name: "attn", access: "read", type: "array<f32>" } as const] : []),
    { name: "route", access: "read", type: "array<f32>" },
    { name: "dGates", access: "read", type: "array<f32>" },
    { name: "scratch", access: "read_write", type: "array<f32>" },
    { name: "dx", access: "read_write", type: "array<f32>" },
  ];
  const rational = c.activation === "rational";
  const { numerator: m, denominator: n } = orders;
  const reduceRows = Math.max(CH, C, 1);
  // dp of column h given p and dv; for rational also this lane's coefficient partial sums.
  const activationBackward = rational
    ? `let parts = rat_parts(p);
    let den = 1.0 + abs(parts.q);
    let sq = sign(parts.q);
    let ga = dv / den;
    let gb = -dv * parts.p * sq / (den * den);
    var pw = 1.0;
    for (var j = 0u; j <= ${m}u; j++) {
      cacc[j] += ga * pw;
      pw *= p;
    }
    pw = p;
    for (var i = 1u; i <= ${n}u; i++) {
      cacc[${m}u + i] += gb * pw;
      pw *= p;
    }
    let dpv = dv * (parts.dp / den - parts.p * sq * parts.dq / (den * den));`
    : "let dpv = dv * act_grad(p);";
  const poolingBackward = !prompt
    ? "dx[d * H + h] += dpv;"
    : {
        last: "dx[(pend - 1u) * H + h] += dpv;",
        mean: `let share = dpv * (1.0 / f32(pend - first));
    for (var t = first; t < pend; t++) { dx[t * H + h] += share; }`,
        // The first row holding the maximum, found by the forward's comparisons.
        max: `var top = first;
    var best = x[first * H + h];
    for (var t = first + 1u; t < pend; t++) {
      let v = x[t * H + h];
      if (v > best) {
        best = v;
        top = t;
      }
    }
    dx[top * H + h] += dpv;`,
        attention: `scratch[d * SW + ${dp}u + h] = dpv;`,
      }[c.pooling];
  return kernelSource({
    name: "router_train_backward",
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
const SW = ${SW}u;
${routerActivationWgsl(c.activation, orders)}

var<workgroup> partial: array<f32, ${reduceRows * WG}>;
var<workgroup> gateGrad: array<f32, N>;
var<workgroup> dz: array<f32, N>;
var<workgroup> attnSum: f32;

// Tree-sums rows 0..count-1 of partial (each WG long) into their first element.
fn tree(lid: u32, count: u32) {
  for (var stride = ${WG / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) {
      for (var k = 0u; k < count; k++) { partial[k * ${WG}u + lid] += partial[k * ${WG}u + lid + stride]; }
    }
  }
  workgroupBarrier();
}

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
  // The decision's gate gradient: its rows' dGates summed in row order per lane, then a tree.
  var g: array<f32, N>;
  for (var r = first + lid; r < end; r += ${WG}u) {
    for (var e = 0u; e < N; e++) { g[e] += dGates[r * params.gateStride + params.gateIndex0 + e]; }
  }
  for (var e0 = 0u; e0 < N; e0 += ${CH}u) {
    for (var k = 0u; k < ${CH}u; k++) {
      if (e0 + k < N) { partial[k * ${WG}u + lid] = g[e0 + k]; }
    }
    tree(lid, ${CH}u);
    if (lid == 0u) {
      for (var k = 0u; k < ${CH}u; k++) {
        if (e0 + k < N) { gateGrad[e0 + k] = partial[k * ${WG}u]; }
      }
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    var prob: array<f32, N>;
    var gate: array<f32, N>;
    var dg: array<f32, N>;
    var db: array<f32, N>;
    var sb = 0.0;
    for (var e = 0u; e < N; e++) {
      prob[e] = route[d * RW + e];
      gate[e] = route[d * RW + N + e];
      // Unchosen experts (gate 0) take no gradient, whatever dGates holds there.
      dg[e] = select(0.0, gateGrad[e], gate[e] != 0.0);
      db[e] = route[d * RW + 2u * N + e];
      sb += prob[e] * db[e];
    }
${
  renormalize
    ? `    // G = softmax over the chosen logits: dz = G (dG - <G, dG>) on the chosen; the balance term on P.
    var sg = 0.0;
    for (var e = 0u; e < N; e++) { sg += gate[e] * dg[e]; }
    for (var e = 0u; e < N; e++) {
      dz[e] = select(0.0, gate[e] * (dg[e] - sg), gate[e] != 0.0) + prob[e] * (db[e] - sb);
    }`
    : `    // G = P on the chosen: dP = dG + the balance term, dz = P (dP - <P, dP>).
    var sp = 0.0;
    for (var e = 0u; e < N; e++) { sp += prob[e] * (dg[e] + db[e]); }
    for (var e = 0u; e < N; e++) { dz[e] = prob[e] * ((dg[e] + db[e]) - sp); }`
}
    for (var e = 0u; e < N; e++) { scratch[d * SW + e] = dz[e]; }
  }
  workgroupBarrier();
${rational ? `  var cacc: array<f32, ${C}>;` : ""}
  for (var h = lid; h < H; h += ${WG}u) {
    let p = ${prompt ? "pooled[d * H + h]" : "x[d * H + h]"};
    var dv = 0.0;
    for (var e = 0u; e < N; e++) { dv += dz[e] * weight[e * H + h]; }
    ${activationBackward}
    ${poolingBackward}
  }
${
  rational
    ? `  for (var k = 0u; k < ${C}u; k++) { partial[k * ${WG}u + lid] = cacc[k]; }
  tree(lid, ${C}u);
  if (lid == 0u) {
    for (var k = 0u; k < ${C}u; k++) { scratch[d * SW + ${dc}u + k] = partial[k * ${WG}u]; }
  }
  workgroupBarrier();`
    : ""
}
${
  attention
    ? `  // Attention pooler: da_t = dp . x_t per prompt row (one lane per row), du_t = a_t (da_t - <a, da>).
  storageBarrier();
  workgroupBarrier();
  let rowBase = params.decisions * SW;
  var lane = 0.0;
  for (var t = first + lid; t < pend; t += ${WG}u) {
    var da = 0.0;
    for (var k = 0u; k < H; k++) { da += scratch[d * SW + ${dp}u + k] * x[t * H + k]; }
    scratch[rowBase + t] = da;
    lane += attn[t] * da;
  }
  partial[lid] = lane;
  tree(lid, 1u);
  if (lid == 0u) { attnSum = partial[0]; }
  workgroupBarrier();
  for (var t = first + lid; t < pend; t += ${WG}u) { scratch[rowBase + t] = attn[t] * (scratch[rowBase + t] - attnSum); }
  storageBarrier();
  workgroupBarrier();
  // dx_t += a_t dp + du_t w_sa; this decision's share of d w_sa = sum_t du_t x_t, summed as
  // sum_t du_t (x_t - p) (equal, as sum_t du_t = 0), so a component common to the prompt's rows does
  // not cancel in f32.
  for (var h = lid; h < H; h += ${WG}u) {
    let dpv = scratch[d * SW + ${dp}u + h];
    let w = pooler[h];
    let center = pooled[d * H + h];
    var acc = 0.0;
    for (var t = first; t < pend; t++) {
      let du = scratch[rowBase + t];
      dx[t * H + h] += attn[t] * dpv + du * w;
      acc += du * (x[t * H + h] - center);
    }
    scratch[d * SW + ${dw}u + h] = acc;
  }`
    : ""
}
}`,
    dispatch: { grid: { param: "decisions" } },
  });
}

/**
 * The parameter gradients summed over decisions (see the top of this file): one invocation per column.
 *   bindings: [pooled (read) prompt | x (read) token], [rational (read) rational], scratch (read),
 *             dWeight (read_write), [dPooler (read_write) attention], [dRational (read_write) rational]
 *   params:   decisions
 *   dispatch: [ceil(max(H, m + 1 + n) / 64), 1, 1]
 */
export function routerTrainGradKernel(c: RouterTrainBackwardConstants): KernelSource {
  const { H, N, orders, coefficients: C, prompt, attention, width: SW, dc, dw } = scratchShape(c);
  const rational = c.activation === "rational";
  const add = (buffer: string, at: string) => (c.accumulate ? ` + ${buffer}[${at}]` : "");
  const source = prompt ? "pooled" : "x";
  return kernelSource({
    name: "router_train_grad",
    constants: { ...routerTrainKey(c), accumulate: c.accumulate },
    storage: [
      { name: source, access: "read", type: "array<f32>" },
      ...routerActivationStorage(c.activation),
      { name: "scratch", access: "read", type: "array<f32>" },
      { name: "dWeight", access: "read_write", type: "array<f32>" },
      ...(attention ? [{ name: "dPooler", access: "read_write", type: "array<f32>" } as const] : []),
      ...(rational ? [{ name: "dRational", access: "read_write", type: "array<f32>" } as const] : []),
    ],
    params: [{ name: "decisions", type: "u32" }],
    body: /* wgsl */ `
const H = ${H}u;
const N = ${N}u;
const SW = ${SW}u;
${routerActivationWgsl(c.activation, orders)}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  let h = id.x;
  let D = params.decisions;
  if (h < H) {
    var acc: array<f32, N>;
    var pool = 0.0;
    for (var d = 0u; d < D; d++) {
      let v = act(${source}[d * H + h]);
      for (var e = 0u; e < N; e++) { acc[e] += scratch[d * SW + e] * v; }
${attention ? `      pool += scratch[d * SW + ${dw}u + h];` : ""}
    }
    for (var e = 0u; e < N; e++) { dWeight[e * H + h] = acc[e]${add("dWeight", "e * H + h")}; }
${attention ? `    dPooler[h] = pool${add("dPooler", "h")};` : ""}
  }
${
  rational
    ? `  if (h < ${C}u) {
    var s = 0.0;
    for (var d = 0u; d < D; d++) { s += scratch[d * SW + ${dc}u + h]; }
    dRational[h] = s${add("dRational", "h")};
  }`
    : ""
}
}`,
    dispatch: { groups: [Math.ceil(Math.max(H, C) / WG), 1, 1] },
  });
}
