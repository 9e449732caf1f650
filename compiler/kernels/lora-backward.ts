// Backward of the gated LoRA of lora.ts (t = A x, y += g * s * B t per row), for ONE adapter slot per
// dispatch (`params.slot`): training updates one adapter, so the rows of other slots (and rows without
// an adapter) are neither read nor written. A row is active when it uses that slot and its gate g for
// this module (column gateIndex of `gates`) is non-zero; with coef = g * s (s the slot's scaling):
//   dt[r]    = coef * dy[r] B                   [rows, R]   (the gradient of the saved shrink output)
//   dGate[r] = s * <dy[r], B t[r]> = s * <dy[r] B, t[r]>    (the router's gradient needs it)
//   dx[r]   += dt[r] A                          [rows, in]  (added to what the base's backward wrote)
//   dB       = sum over active rows of coef * dy[r]^T t[r]  [out, R]
//   dA       = sum over active rows of dt[r]^T x[r]         [R, in]
// Rows of the slot whose gate is 0 contribute nothing; they get dt = 0 and dGate = 0 so both buffers are
// defined on every row of the slot. Indices past the slot's rank read as zero and are written as zero
// (dt, and dA's rows and dB's columns there), so B's zero padding stays zero under any optimiser.
// Buffers as lora.ts: a [slots, R, in], b [slots, out, R], slots, rowAdapter, gates [rows, gateStride];
// dGates [rows, gateStride] gets column gateIndex; dA [R, in] and dB [out, R] are the one slot's.
// Three kernels, each deterministic (a fixed reduction order, no atomics): lora_backward_input (one
// workgroup per row: dt, dGate, dx), then lora_grad_b (reads dy, t) and lora_grad_a (reads dt, x).
// With `accumulate`, dA and dB are added to (gradient accumulation over micro-batches).
//
// Rank-gated variant (per_module, MOELoRA: lora_backward_input with `experts` E): the forward's
// t_gated[r, j] = h_{e(j)}(r) * t[r, j] (moe-train.ts's lora_rank_gate; expert e(j) = j / (rank / E),
// h read from `expertGates` at row * expertStride + expertOffset + e) went through the expand, so with
// u = dy[r] B and coef = g * s:
//   dt[r, j]         = coef * h_{e(j)} * u_j      (the gradient of the ungated t: dA and dx follow from it)
//   dExpertGates[r, e] = coef * sum over j of e of u_j t[r, j]   [rows, E] (the router's upstream gradient)
//   dGate[r]         = s * <u, t_gated>            (the module gate's, as without experts)
// and dB is lora_grad_b on t_gated (dB = coef dy^T t_gated), dA lora_grad_a on this dt.
import type { KernelSource } from "./kernel.ts";
import type { LoraConstants } from "./lora.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource, vec4Rows } from "./wgsl.ts";

/** lora_backward_input's: with `experts`, the rank-gated variant (above). */
export interface LoraBackwardInputConstants extends LoraConstants {
  readonly experts?: number;
}

export interface LoraBackwardConstants extends LoraConstants {
  /** dA, dB += instead of = (lora_grad_a and lora_grad_b only). */
  readonly accumulate: boolean;
}

const PARAMS = [
  { name: "rows", type: "u32" },
  { name: "gateStride", type: "u32" },
  { name: "gateIndex", type: "u32" },
  { name: "slot", type: "u32" },
] as const;

const SELECTION_BUFFERS = [
  { name: "slots", access: "read", type: "array<LoraSlot>" },
  { name: "rowAdapter", access: "read", type: "array<u32>" },
  { name: "gates", access: "read", type: "array<f32>" },
] as const;

const SELECTION = /* wgsl */ `
struct LoraSlot { rank: u32, scaling: f32 }

fn gate_of(row: u32) -> f32 {
  return gates[row * params.gateStride + params.gateIndex];
}

// Whether a row takes part: it uses this dispatch's slot and its gate is not zero.
fn is_live(row: u32) -> bool {
  return row < params.rows && rowAdapter[row] == params.slot && gate_of(row) != 0.0;
}`;

function checkConstants({ inFeatures, outFeatures, maxRank }: LoraConstants): void {
  for (const [name, v] of Object.entries({ inFeatures, outFeatures, maxRank }))
    if (!Number.isInteger(v) || v < 1) throw new Error(`LoRA backward: ${name} must be a positive integer, got ${v}`);
}

const WORKGROUP = 64;
const CHUNK_QUADS = 4; // ranks reduced together: 16 at a time

/**
 * Per active row: dt = coef * dy B, dGate = s * <dy B, t>, dx += dt A. One workgroup per row; each
 * invocation sums its outputs' dy[o] * B[o, 16 ranks] (strided by 64), a tree in workgroup memory
 * reduces them, and dy B stays in workgroup memory for dGate and dx (docs/drivers.md: reduced values
 * are read from workgroup memory at each use, never held in registers across barriers).
 *   bindings: dy (read, [rows, out]), t (read, [rows, R]), a, b, slots, rowAdapter, gates,
 *             dt (read_write, [rows, R]), dGates (read_write, [rows, gateStride]), dx (read_write, [rows, in])
 *   params:   rows, gateStride, gateIndex, slot
 */
export function loraBackwardInputKernel(c: LoraBackwardInputConstants): KernelSource {
  checkConstants(c);
  const { inFeatures, outFeatures, maxRank } = c;
  const E = c.experts;
  if (E !== undefined && !(Number.isInteger(E) && E >= 1 && E <= 64)) throw new Error(`LoRA backward: experts must be an integer from 1 to 64, got ${E}`);
  const a = vec4Rows("a", inFeatures);
  const b = vec4Rows("b", maxRank);
  // The rank's factor in dt, dx and dGate: its expert's gate h_e(j) in the rank-gated variant.
  const rankGate = (j: string) => (E === undefined ? "" : ` * expert_gate(row, ${j}, rank)`);
  return kernelSource({
    name: "lora_backward_input",
    constants: { inFeatures, outFeatures, maxRank, ...(E === undefined ? {} : { experts: E }) },
    storage: [
      { name: "dy", access: "read", type: "array<f32>" },
      { name: "t", access: "read", type: "array<f32>" },
      a.decl,
      b.decl,
      ...SELECTION_BUFFERS,
      ...(E === undefined ? [] : [{ name: "expertGates", access: "read", type: "array<f32>" } as const]),
      { name: "dt", access: "read_write", type: "array<f32>" },
      { name: "dGates", access: "read_write", type: "array<f32>" },
      ...(E === undefined ? [] : [{ name: "dExpertGates", access: "read_write", type: "array<f32>" } as const]),
      { name: "dx", access: "read_write", type: "array<f32>" },
    ],
    params: E === undefined ? PARAMS : [...PARAMS, { name: "expertStride", type: "u32" }, { name: "expertOffset", type: "u32" }],
    body: /* wgsl */ `
${SELECTION}
${a.wgsl}
${b.wgsl}${
  E === undefined
    ? ""
    : `

// h_e(j) of the row: the gate of the expert owning rank j (rank / E ranks each).
fn expert_gate(row: u32, j: u32, rank: u32) -> f32 {
  let e = min(j / max(1u, rank / ${E}u), ${E - 1}u);
  return expertGates[row * params.expertStride + params.expertOffset + e];
}`
}

var<workgroup> partial: array<vec4<f32>, ${CHUNK_QUADS * WORKGROUP}>;
// dy[row] B, zero past the rank.
var<workgroup> u: array<f32, ${b.quads * 4}>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows || rowAdapter[row] != params.slot) { return; }
  if (gate_of(row) == 0.0) {
    for (var j = lid; j < ${maxRank}u; j += ${WORKGROUP}u) { dt[row * ${maxRank}u + j] = 0.0; }
    if (lid == 0u) { dGates[row * params.gateStride + params.gateIndex] = 0.0; }${
      E === undefined ? "" : `
    for (var e = lid; e < ${E}u; e += ${WORKGROUP}u) { dExpertGates[row * ${E}u + e] = 0.0; }`
    }
    return;
  }
  let s = params.slot;
  let rank = min(slots[s].rank, ${maxRank}u);
  let rankQuads = (rank + 3u) / 4u;
  for (var c0 = 0u; c0 < rankQuads; c0 += ${CHUNK_QUADS}u) {
    var acc: array<vec4<f32>, ${CHUNK_QUADS}>;
    for (var o = lid; o < ${outFeatures}u; o += ${WORKGROUP}u) {
      let g = dy[row * ${outFeatures}u + o];
      for (var q = 0u; q < ${CHUNK_QUADS}u; q++) {
        if (c0 + q < rankQuads) { acc[q] += g * load_b(s * ${outFeatures}u + o, c0 + q); }
      }
    }
    for (var q = 0u; q < ${CHUNK_QUADS}u; q++) { partial[q * ${WORKGROUP}u + lid] = acc[q]; }
    for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
      workgroupBarrier();
      if (lid < stride) {
        for (var q = 0u; q < ${CHUNK_QUADS}u; q++) {
          partial[q * ${WORKGROUP}u + lid] += partial[q * ${WORKGROUP}u + lid + stride];
        }
      }
    }
    workgroupBarrier();
    if (lid < ${CHUNK_QUADS}u && c0 + lid < rankQuads) {
      let v = partial[lid * ${WORKGROUP}u];
      let j = (c0 + lid) * 4u;
      let inRank = vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(rank);
      let masked = select(vec4<f32>(0.0), v, inRank);
      u[j] = masked.x;
      u[j + 1u] = masked.y;
      u[j + 2u] = masked.z;
      u[j + 3u] = masked.w;
    }
    workgroupBarrier();
  }
  let coef = gate_of(row) * slots[s].scaling;
  for (var j = lid; j < ${maxRank}u; j += ${WORKGROUP}u) {
    var v = 0.0;
    if (j < rank) { v = coef * u[j]${rankGate("j")}; }
    dt[row * ${maxRank}u + j] = v;
  }
  if (lid == 0u) {
    var sum = 0.0;
    for (var j = 0u; j < rank; j++) { sum += t[row * ${maxRank}u + j]${rankGate("j")} * u[j]; }
    dGates[row * params.gateStride + params.gateIndex] = slots[s].scaling * sum;
  }${
    E === undefined
      ? ""
      : `
  // Each expert's gate gradient: its ranks' u_j t_j, summed in rank order.
  let expertRank = max(1u, rank / ${E}u);
  for (var e = lid; e < ${E}u; e += ${WORKGROUP}u) {
    var sum = 0.0;
    let last = select(min((e + 1u) * expertRank, rank), rank, e == ${E - 1}u);
    for (var j = e * expertRank; j < last; j++) { sum += t[row * ${maxRank}u + j] * u[j]; }
    dExpertGates[row * ${E}u + e] = coef * sum;
  }`
  }
  for (var q = lid; q < ${a.quads}u; q += ${WORKGROUP}u) {
    var acc = vec4<f32>(0.0);
    for (var j = 0u; j < rank; j++) { acc += (coef * u[j]${rankGate("j")}) * load_a(s * ${maxRank}u + j, q); }
    let k = q * 4u;
    let at = row * ${inFeatures}u + k;
    dx[at] += acc.x;
    if (k + 1u < ${inFeatures}u) { dx[at + 1u] += acc.y; }
    if (k + 2u < ${inFeatures}u) { dx[at + 2u] += acc.z; }
    if (k + 3u < ${inFeatures}u) { dx[at + 3u] += acc.w; }
  }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}

/**
 * C[p, q] (+)= sum over active rows r of coef(r) * U[r, p] * V[r, q], q < the slot's rank (zero past
 * it, up to R columns), written as C[p, q] (row width R) or, `transposed`, C[q, p] (row width P).
 * Deterministic: each element is one invocation's running sum over the rows in order.
 * Tiled for a small R: a tile of QT in {16, 32, 64} columns of q (the smallest holding R, else 64) by
 * PT = 1024 / QT rows of p, 256 invocations each owning 4 p by 4 q, staging ROWS = 1024 / PT rows of
 * U and V at a time (ROWS * PT = 1024 floats of U: one vec4 per invocation).
 */
function rowOuterProduct(o: {
  name: string;
  c: LoraBackwardConstants;
  u: string;
  /** Columns of U, named in the key by `width`. */
  P: number;
  width: "inFeatures" | "outFeatures";
  v: string;
  transposed: boolean;
  /** WGSL of the factor a row's U is scaled by, given the row's expression. */
  coef: (row: string) => string;
  out: string;
}): KernelSource {
  checkConstants(o.c);
  const { maxRank: R, accumulate } = o.c;
  const { P } = o;
  const QT = R <= 16 ? 16 : R <= 32 ? 32 : 64;
  const TX = QT / 4; // invocations along q
  const TY = 256 / TX; // invocations along p
  const PT = TY * 4;
  const ROWS = 1024 / PT;
  const u = vec4Rows(o.u, P);
  const v = vec4Rows(o.v, R);
  const at = o.transposed ? `q * ${P}u + p` : `p * ${R}u + q`;
  return kernelSource({
    name: o.name,
    constants: { [o.width]: P, maxRank: R, accumulate },
    storage: [u.decl, v.decl, ...SELECTION_BUFFERS, { name: o.out, access: "read_write", type: "array<f32>" }],
    params: PARAMS,
    body: /* wgsl */ `
${SELECTION}
${u.wgsl}
${v.wgsl}

var<workgroup> uTile: array<vec4<f32>, ${ROWS * TY}>; // [${ROWS} rows][${TY} quads of p]
var<workgroup> vTile: array<vec4<f32>, ${ROWS * TX}>; // [${ROWS} rows][${TX} quads of q]

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let rank = min(slots[params.slot].rank, ${R}u);
  let pQuad0 = wg.y * ${TY}u;
  let qQuad0 = wg.x * ${TX}u;
  let tx = lid % ${TX}u;
  let ty = lid / ${TX}u;
  var acc: array<vec4<f32>, 4>;
  for (var r0 = 0u; r0 < params.rows; r0 += ${ROWS}u) {
    // Inactive rows stage zeros and are never read (their t or dt may hold anything).
    let uRow = r0 + lid / ${TY}u;
    let uQuad = pQuad0 + lid % ${TY}u;
    var uv = vec4<f32>(0.0);
    if (is_live(uRow) && uQuad < ${u.quads}u) { uv = ${o.coef("uRow")} * load_${o.u}(uRow, uQuad); }
    uTile[lid] = uv;
    if (lid < ${ROWS * TX}u) {
      let vRow = r0 + lid / ${TX}u;
      let vQuad = qQuad0 + lid % ${TX}u;
      var vv = vec4<f32>(0.0);
      if (is_live(vRow) && vQuad < ${v.quads}u) {
        let inRank = vec4<u32>(vQuad * 4u) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(rank);
        vv = select(vec4<f32>(0.0), load_${o.v}(vRow, vQuad), inRank);
      }
      vTile[lid] = vv;
    }
    workgroupBarrier();
    for (var r = 0u; r < ${ROWS}u; r++) {
      let a = uTile[r * ${TY}u + ty];
      let b = vTile[r * ${TX}u + tx];
      acc[0] += a.x * b;
      acc[1] += a.y * b;
      acc[2] += a.z * b;
      acc[3] += a.w * b;
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 4u; i++) {
    let p = (pQuad0 + ty) * 4u + i;
    if (p >= ${P}u) { break; }
    for (var j = 0u; j < 4u; j++) {
      let q = (qQuad0 + tx) * 4u + j;
      if (q < ${R}u) {
        let at = ${at};
        ${o.out}[at] = acc[i][j]${accumulate ? ` + ${o.out}[at]` : ""};
      }
    }
  }
}`,
    // Every element is written even for zero rows (a gradient of nothing is zero).
    dispatch: { groups: [Math.ceil(R / QT), Math.ceil(P / PT), 1] },
  });
}

/**
 * dB [out, R] (+)= sum over active rows of g * s * dy[r]^T t[r].
 *   bindings: dy (read, [rows, out]), t (read, [rows, R]), slots, rowAdapter, gates, dB (read_write)
 *   params:   rows, gateStride, gateIndex, slot
 */
export function loraGradBKernel(c: LoraBackwardConstants): KernelSource {
  return rowOuterProduct({ name: "lora_grad_b", c, u: "dy", P: c.outFeatures, width: "outFeatures", v: "t", transposed: false, coef: (row) => `(gate_of(${row}) * slots[params.slot].scaling)`, out: "dB" });
}

/**
 * dA [R, in] (+)= sum over active rows of dt[r]^T x[r].
 *   bindings: x (read, [rows, in]), dt (read, [rows, R]), slots, rowAdapter, gates, dA (read_write)
 *   params:   rows, gateStride, gateIndex, slot
 */
export function loraGradAKernel(c: LoraBackwardConstants): KernelSource {
  return rowOuterProduct({ name: "lora_grad_a", c, u: "x", P: c.inFeatures, width: "inFeatures", v: "dt", transposed: true, coef: () => "1.0", out: "dA" });
}
