// Training kernels of the per_module Mixture-of-LoRA baseline (MOELoRA / MoLoRA, docs/language.md
// `placement per_module`; docs/training.md). Each adapted module (layer l, module m) has a LoRA of
// rank r split into E experts of r / E ranks (expert e owns ranks e r/E .. (e+1) r/E - 1) and a router
// W [E, in] that reads the module's input row x of every token: z = W x, P = softmax(z), gates h (top_k
// kept P, renormalised or not, or dense). The module computes y = W_m x + s B (h_e(j) * (A x)_j)_j.
//
// The router itself is router-train.ts's forward and router-train-backward.ts's backward in token
// routing (hidden = the module's in-features, N = E, activation none), whose record `route` [rows, 3E]
// holds per row P (E), the gates h (E, 0 where not kept) and the balance loss's gradient on P (E).
// Here:
//   lora_rank_gate        t_gated[r, j] = h_e(j)(r) * t[r, j] for the expand (and for dB in the backward)
//   moe_balance_sums      one module's sums over its rows: picks_e (rows keeping e) and sum_r P_{r,e},
//                         into (or added to, in module order) the adapter's `balance` accumulator
//   moe_balance           the load-balancing loss over every routed token of every module at once, as
//                         Hugging Face's Mixtral load_balancing_loss_func computes it (docs/language.md):
//                         with T = rows x modules, f_e = picks_e / T (no gradient), P_e = sum P / T,
//                         L = E * sum_e f_e P_e; writes L and coef * dL/dP_{r,e} = coef * E * f_e / T
//   moe_balance_grad      that gradient into a module's record (the third part), for the router's backward
// Every sum has a fixed order (lane-strided partial sums, a fixed tree; modules in forward order); no
// atomics. `balance` [3E]: picks (E), P sums (E), the gradient on P (E).
//
// per_ffn (MixLoRA, docs/language.md `placement per_ffn`): one router per layer W [E, hidden] on the
// MLP's input u (the same router kernels, hidden = hidden), and each row's kept experts run one
// feed-forward pass each: G_e = Wg u + s Bg_e Ag_e u, U_e likewise, H_e = silu(G_e) U_e, D_e = Wd H_e +
// s Bd_e Ad_e H_e, the MLP output sum_e g_e D_e. Each MLP module's experts are stacked as one LoRA of
// rank E r (expert e owns ranks e r .. (e+1) r - 1), so pass p runs the stacked LoRA with t gated by a
// one-hot mask of the row's p-th kept expert (lora_rank_gate), and the balance sums and loss above take
// the layers' routers as they take per_module's modules. Here:
//   moe_ffn_pass       pass p's expert of every row: the p-th kept expert in index order (record gate
//                      != 0): mask [rows, E] one-hot (all 0 when the row keeps fewer), gate [rows] its g
//   moe_ffn_mix        y = (first pass ? residual : y) + g * D_p: the residual stream plus the pass
//   moe_ffn_scale      out = g * v per row: d(H_p) of the down product's base part, v = dy Wd (computed
//                      once per layer: every expert's D_e sees the same dy)
//   moe_ffn_gate_grad  the pass expert's gate gradient dg_e = dy . D_e = v . H_e + s (dy Bd) . t_gated
//                      (the second term the LoRA backward's dGate), into dGates [rows, E] at e
import type { KernelParam, KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource, type KernelConstants, type StorageDecl } from "./wgsl.ts";

export const MOE_TRAIN_MAX_EXPERTS = 64;
const WG = 64;
const CHUNK = 8;

/** `E`, refused unless an integer from 1 to MOE_TRAIN_MAX_EXPERTS. */
function checkExperts(E: number, what: string): number {
  if (!Number.isInteger(E) || E < 1 || E > MOE_TRAIN_MAX_EXPERTS) throw new Error(`${what}: experts must be an integer from 1 to ${MOE_TRAIN_MAX_EXPERTS}, got ${E}`);
  return E;
}

/** `width`, refused unless a positive integer. */
function checkWidth(width: number, what: string): number {
  if (!Number.isInteger(width) || width < 1) throw new Error(`${what}: width ${width}`);
  return width;
}

/** An f32 storage buffer (every buffer here is one). */
const f32 = (name: string, access: StorageDecl["access"] = "read"): StorageDecl => ({ name, access, type: "array<f32>" });
const u32 = (name: string): KernelParam => ({ name, type: "u32" });

/** A kernel of one thread per element i < params.n (256 a workgroup) running `statement`; `params` follow n. */
function perElement(name: string, constants: KernelConstants, storage: readonly StorageDecl[], statement: string, params: readonly KernelParam[] = []): KernelSource {
  return kernelSource({
    name,
    constants,
    storage,
    params: [u32("n"), ...params],
    body: /* wgsl */ `
@compute @workgroup_size(256)
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * 256u + lid;
  if (i >= params.n) { return; }
  ${statement}
}`,
    dispatch: { grid: { param: "n", per: 256 } },
  });
}

/**
 * WGSL folding the WG lanes' partial sums into lane 0 by a fixed tree: `add(other)` adds lane
 * lid + stride's values (index `other`) to lane lid's; ends with a barrier, so lane 0 may read the sums.
 */
function treeSum(add: (other: string) => string): string {
  return `for (var stride = ${WG / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { ${add("lid + stride")} }
  }
  workgroupBarrier();`;
}

/** Floats of the balance accumulator of an adapter with E experts per module. */
export function moeBalanceLength(experts: number): number {
  return 3 * experts;
}

/**
 * t_gated = t with rank j of each row times its expert's gate.
 *   bindings: t (read, [rows, rank]), gates (read: row r's expert e at r * gateStride + gateOffset + e),
 *             out (read_write, [rows, rank])
 *   params:   n (rows * rank), gateStride, gateOffset
 *   dispatch: grid(n / 256)
 */
export function loraRankGateKernel(c: { readonly rank: number; readonly experts: number }): KernelSource {
  const { rank } = c;
  const E = checkExperts(c.experts, "LoRA rank gate");
  if (!Number.isInteger(rank) || rank < E || rank % E !== 0) throw new Error(`LoRA rank gate: rank ${rank} does not split into ${E} experts`);
  return perElement(
    "lora_rank_gate",
    { rank, experts: E },
    [f32("t"), f32("gates"), f32("out", "read_write")],
    `let row = i / ${rank}u;
  let e = (i % ${rank}u) / ${rank / E}u;
  out[i] = gates[row * params.gateStride + params.gateOffset + e] * t[i];`,
    [u32("gateStride"), u32("gateOffset")],
  );
}

/**
 * One module's picks and probability sums over its `decisions` rows (route record [rows, 3E]), stored
 * into `balance` (first module of the step: `first` = 1) or added to it (the next modules, in order).
 *   bindings: route (read), balance (read_write, [3E])
 *   params:   decisions, first
 *   dispatch: [1, 1, 1]
 */
export function moeBalanceSumsKernel(c: { readonly experts: number }): KernelSource {
  const E = checkExperts(c.experts, "MoE balance sums");
  const CH = Math.min(E, CHUNK);
  return kernelSource({
    name: "moe_balance_sums",
    constants: { experts: E },
    storage: [f32("route"), f32("balance", "read_write")],
    params: [u32("decisions"), u32("first")],
    body: /* wgsl */ `
const E = ${E}u;
const RW = ${3 * E}u;

// Rows 0..CH-1: picks of CH experts; rows CH..2CH-1: their P sums.
var<workgroup> partial: array<f32, ${2 * CH * WG}>;

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32) {
  let D = params.decisions;
  var picks: array<f32, E>;
  var sums: array<f32, E>;
  for (var d = lid; d < D; d += ${WG}u) {
    for (var e = 0u; e < E; e++) {
      sums[e] += route[d * RW + e];
      picks[e] += select(0.0, 1.0, route[d * RW + E + e] != 0.0);
    }
  }
  for (var e0 = 0u; e0 < E; e0 += ${CH}u) {
    for (var k = 0u; k < ${CH}u; k++) {
      if (e0 + k < E) {
        partial[k * ${WG}u + lid] = picks[e0 + k];
        partial[(${CH}u + k) * ${WG}u + lid] = sums[e0 + k];
      }
    }
    ${treeSum((other) => `for (var k = 0u; k < ${2 * CH}u; k++) { partial[k * ${WG}u + lid] += partial[k * ${WG}u + ${other}]; }`)}
    if (lid == 0u) {
      for (var k = 0u; k < ${CH}u; k++) {
        let e = e0 + k;
        if (e < E) {
          let p = partial[k * ${WG}u];
          let s = partial[(${CH}u + k) * ${WG}u];
          balance[e] = select(balance[e] + p, p, params.first != 0u);
          balance[E + e] = select(balance[E + e] + s, s, params.first != 0u);
        }
      }
    }
    workgroupBarrier();
  }
}`,
    dispatch: { groups: [1, 1, 1] },
  });
}

/**
 * The joint balance loss from the accumulated sums: L = E * sum_e (picks_e / T) (Psum_e / T) into
 * loss[lossIndex], and coef * E * picks_e / T^2 (the gradient on each P_{r,e}) into balance[2E + e].
 *   bindings: balance (read_write, [3E]), loss (read_write)
 *   params:   decisions (T: rows x routed modules), lossIndex, coef
 *   dispatch: [1, 1, 1]
 */
export function moeBalanceKernel(c: { readonly experts: number }): KernelSource {
  const E = checkExperts(c.experts, "MoE balance");
  return kernelSource({
    name: "moe_balance",
    constants: { experts: E },
    storage: [f32("balance", "read_write"), f32("loss", "read_write")],
    params: [u32("decisions"), u32("lossIndex"), { name: "coef", type: "f32" }],
    body: /* wgsl */ `
const E = ${E}u;

@compute @workgroup_size(1)
fn main() {
  let inv = 1.0 / f32(max(params.decisions, 1u));
  var l = 0.0;
  for (var e = 0u; e < E; e++) {
    let f = balance[e] * inv;
    l += f * (balance[E + e] * inv);
    balance[2u * E + e] = params.coef * f32(E) * f * inv;
  }
  loss[params.lossIndex] = f32(E) * l;
}`,
    dispatch: { groups: [1, 1, 1] },
  });
}

/**
 * The balance loss's gradient on P into the third part of every row of a module's route record.
 *   bindings: balance (read, [3E]), route (read_write, [rows, 3E])
 *   params:   n (rows * E)
 *   dispatch: grid(n / 256)
 */
export function moeBalanceGradKernel(c: { readonly experts: number }): KernelSource {
  const E = checkExperts(c.experts, "MoE balance gradient");
  return perElement(
    "moe_balance_grad",
    { experts: E },
    [f32("balance"), f32("route", "read_write")],
    `route[(i / ${E}u) * ${3 * E}u + ${2 * E}u + i % ${E}u] = balance[${2 * E}u + i % ${E}u];`,
  );
}

/**
 * Pass `ffnPass`'s expert of every row: the ffnPass-th expert (in index order) whose gate in the route
 * record [rows, 3E] is not zero. mask[row] gets 1 there and 0 elsewhere (all 0 when the row keeps fewer
 * experts, e.g. a kept probability that underflowed to 0), gate[row] that gate (or 0).
 *   bindings: route (read), mask (read_write, [rows, E]), gate (read_write, [rows])
 *   params:   rows, ffnPass
 *   dispatch: grid(rows / 64)
 */
export function moeFfnPassKernel(c: { readonly experts: number }): KernelSource {
  const E = checkExperts(c.experts, "MoE feed-forward pass");
  return kernelSource({
    name: "moe_ffn_pass",
    constants: { experts: E },
    storage: [f32("route"), f32("mask", "read_write"), f32("gate", "read_write")],
    params: [u32("rows"), u32("ffnPass")],
    body: /* wgsl */ `
@compute @workgroup_size(${WG})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP} * ${WG}u + lid;
  if (row >= params.rows) { return; }
  var seen = 0u;
  var g = 0.0;
  for (var e = 0u; e < ${E}u; e++) {
    let h = route[row * ${3 * E}u + ${E}u + e];
    var m = 0.0;
    if (h != 0.0) {
      if (seen == params.ffnPass) {
        m = 1.0;
        g = h;
      }
      seen++;
    }
    mask[row * ${E}u + e] = m;
  }
  gate[row] = g;
}`,
    dispatch: { grid: { param: "rows", per: WG } },
  });
}

/**
 * y[r] = (first ? residual[r] : y[r]) + gate[r] * x[r] for rows of `width` values; a row of gate 0 keeps
 * what it had (its pass's x is never read into it).
 *   bindings: x (read), residual (read), gate (read, [rows]), y (read_write)
 *   params:   n (rows * width), first
 *   dispatch: grid(n / 256)
 */
export function moeFfnMixKernel(c: { readonly width: number }): KernelSource {
  const width = checkWidth(c.width, "MoE feed-forward mix");
  return perElement(
    "moe_ffn_mix",
    { width },
    [f32("x"), f32("residual"), f32("gate"), f32("y", "read_write")],
    `let g = gate[i / ${width}u];
  let before = select(y[i], residual[i], params.first != 0u);
  y[i] = select(before + g * x[i], before, g == 0.0);`,
    [u32("first")],
  );
}

/**
 * out[r] = gate[r] * v[r] for rows of `width` values.
 *   bindings: v (read), gate (read, [rows]), out (read_write)
 *   params:   n (rows * width)
 *   dispatch: grid(n / 256)
 */
export function moeFfnScaleKernel(c: { readonly width: number }): KernelSource {
  const width = checkWidth(c.width, "MoE feed-forward scale");
  return perElement("moe_ffn_scale", { width }, [f32("v"), f32("gate"), f32("out", "read_write")], `out[i] = gate[i / ${width}u] * v[i];`);
}

/**
 * The gate gradient of each row's pass expert e (mask's one): dGates[r, e] = v[r] . h[r] (+ lora[r]),
 * v = dy Wd and h = H_e of the row ([rows, width]), lora the down LoRA's s (dy Bd) . t_gated. Rows
 * whose mask is all 0 are not written. One workgroup per row: lane-strided sums, then a fixed tree.
 *   bindings: v (read), h (read), mask (read, [rows, E]), [lora (read, [rows])], dGates (read_write, [rows, E])
 *   params:   rows
 *   dispatch: grid(rows)
 */
export function moeFfnGateGradKernel(c: { readonly width: number; readonly experts: number; readonly lora: boolean }): KernelSource {
  const { lora } = c;
  const E = checkExperts(c.experts, "MoE feed-forward gate gradient");
  const width = checkWidth(c.width, "MoE feed-forward gate gradient");
  return kernelSource({
    name: "moe_ffn_gate_grad",
    constants: { width, experts: E, lora },
    storage: [f32("v"), f32("h"), f32("mask"), ...(lora ? [f32("lora")] : []), f32("dGates", "read_write")],
    params: [u32("rows")],
    body: /* wgsl */ `
var<workgroup> partial: array<f32, ${WG}>;

@compute @workgroup_size(${WG})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  var acc = 0.0;
  for (var c = lid; c < ${width}u; c += ${WG}u) { acc += v[row * ${width}u + c] * h[row * ${width}u + c]; }
  partial[lid] = acc;
  ${treeSum((other) => `partial[lid] += partial[${other}];`)}
  if (lid == 0u) {
    for (var e = 0u; e < ${E}u; e++) {
      if (mask[row * ${E}u + e] != 0.0) { dGates[row * ${E}u + e] = partial[0]${lora ? " + lora[row]" : ""}; }
    }
  }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}
