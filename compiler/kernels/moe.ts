// Per-token Mixture-of-LoRA routing: the baselines MiLoRA is compared against (docs/language.md,
// `placement per_module | per_ffn`). A router of one slot is W [E, in]; a row's logits z = W x, p =
// softmax(z), the top k of p are kept (ties to the lower index, as torch.topk) with gates p (or p over
// the kept sum with `renormalize`); dense keeps all E with gates p.
//
//   moe_route (per_ffn, MixLoRA): one workgroup per row routes the MLP input x [rows, in] with its slot's
//     router and writes the row's choices, best first: choice[row * k + j] = { expert, weight }. A row
//     without a routed slot gets { NO_EXPERT, 1 } then { NO_EXPERT, 0 }s: one plain pass.
//     Bindings x, weight [slots, E, in], routed [slots] u32 (1: the slot routes this layer), rowAdapter
//     [rows] u32, choice (read_write); params rows.
//   moe_mix (per_ffn): y[r] = (pass 0 ? residual[r] : y[r]) + choice[r * k + pass].weight * x[r], the
//     residual stream plus the gated sum of the feed-forward passes. Bindings x (the pass's MLP
//     output), residual, choice, y; params n (rows * width), pass.
// The per_module router runs inside the LoRA shrink (lora.ts), which already reads the row and its slot.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource, vec4Rows } from "./wgsl.ts";
import { NO_ADAPTER } from "../../runtime/gpu/layouts.ts";
export { CHOICE_BYTES } from "../../runtime/gpu/layouts.ts";

/** The expert index of a choice that is not an expert: a row of no routed slot (the plain pass). */
export const NO_EXPERT = 0xffffffff;

export interface MoeSelection {
  /** E. */
  readonly experts: number;
  /** Choices kept per row: k for top_k, E for dense. */
  readonly topK: number;
  /** Gates are the kept probabilities over their sum (else the probabilities themselves). */
  readonly renormalize: boolean;
}

export const CHOICE_STRUCT = "struct Choice { expert: u32, weight: f32 }";

const WORKGROUP = 64;

function checkSelection({ experts, topK }: MoeSelection): void {
  if (!Number.isInteger(experts) || experts < 2 || experts > 64) throw new Error(`MoE kernel: experts must be an integer from 2 to 64, got ${experts}`);
  if (!Number.isInteger(topK) || topK < 1 || topK > experts) throw new Error(`MoE kernel: topK must be an integer from 1 to ${experts}, got ${topK}`);
}

/**
 * WGSL that routes the workgroup's row: the statements fill `expert_gate` (E gates, 0 for experts not
 * kept) and `expert_order` (the kept experts, best first). Runs in uniform control flow (its barriers):
 * `row`, `s` and `lid` must be in scope, `load_x(row, q)` and `load_<weight>(r, q)` declared.
 */
export function routeRowWgsl(sel: MoeSelection, inFeatures: number, weight: string): { readonly decls: string; readonly body: string } {
  checkSelection(sel);
  const { experts: E, topK: K } = sel;
  const quads = Math.ceil(inFeatures / 4);
  return {
    decls: /* wgsl */ `
var<workgroup> route_partial: array<f32, ${WORKGROUP}>;
var<workgroup> route_logits: array<f32, ${E}>;
var<workgroup> expert_gate: array<f32, ${E}>;
var<workgroup> expert_order: array<u32, ${K}>;`,
    body: /* wgsl */ `
  for (var e = 0u; e < ${E}u; e++) {
    var acc = 0.0;
    for (var q = lid; q < ${quads}u; q += ${WORKGROUP}u) { acc += dot(load_x(row, q), load_${weight}(s * ${E}u + e, q)); }
    route_partial[lid] = acc;
    workgroupBarrier();
    if (lid == 0u) {
      var sum = 0.0;
      for (var l = 0u; l < ${WORKGROUP}u; l++) { sum += route_partial[l]; }
      route_logits[e] = sum;
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    var top = route_logits[0];
    for (var e = 1u; e < ${E}u; e++) { top = max(top, route_logits[e]); }
    var total = 0.0;
    for (var e = 0u; e < ${E}u; e++) { let p = exp(route_logits[e] - top); expert_gate[e] = p; total += p; }
    var taken: array<bool, ${E}>;
    var kept = 0.0;
    for (var j = 0u; j < ${K}u; j++) {
      var best = ${E}u;
      for (var e = 0u; e < ${E}u; e++) {
        if (!taken[e] && (best == ${E}u || expert_gate[e] > expert_gate[best])) { best = e; }
      }
      taken[best] = true;
      expert_order[j] = best;
      kept += expert_gate[best];
    }
    let scale = ${sel.renormalize ? "1.0 / kept" : "1.0 / total"};
    for (var e = 0u; e < ${E}u; e++) { expert_gate[e] = select(0.0, expert_gate[e] * scale, taken[e]); }
  }
  workgroupBarrier();`,
  };
}

/** The per_ffn router: each row's k choices of feed-forward expert, best first. */
export function moeRouteKernel(c: MoeSelection & { readonly inFeatures: number }): KernelSource {
  const x = vec4Rows("x", c.inFeatures);
  const w = vec4Rows("weight", c.inFeatures);
  const route = routeRowWgsl(c, c.inFeatures, "weight");
  const K = c.topK;
  return kernelSource({
    name: "moe_route",
    constants: { inFeatures: c.inFeatures, experts: c.experts, topK: K, renormalize: c.renormalize },
    storage: [
      x.decl,
      w.decl,
      { name: "routed", access: "read", type: "array<u32>" },
      { name: "rowAdapter", access: "read", type: "array<u32>" },
      { name: "choice", access: "read_write", type: "array<Choice>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
${CHOICE_STRUCT}
${x.wgsl}
${w.wgsl}
${route.decls}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  let s = rowAdapter[row];
  if (s == ${NO_ADAPTER}u || routed[s] == 0u) {
    if (lid < ${K}u) { choice[row * ${K}u + lid] = Choice(${NO_EXPERT}u, select(0.0, 1.0, lid == 0u)); }
    return;
  }
${route.body}
  if (lid < ${K}u) {
    let e = expert_order[lid];
    choice[row * ${K}u + lid] = Choice(e, expert_gate[e]);
  }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}

/** The residual stream plus one feed-forward pass's output, weighted by the row's choice of that pass. */
export function moeMixKernel(c: { readonly width: number; readonly topK: number }): KernelSource {
  const { width, topK: K } = c;
  return kernelSource({
    name: "moe_mix",
    constants: { width, topK: K },
    storage: [
      { name: "x", access: "read", type: "array<f32>" },
      { name: "residual", access: "read", type: "array<f32>" },
      { name: "choice", access: "read", type: "array<Choice>" },
      { name: "y", access: "read_write", type: "array<f32>" },
    ],
    params: [
      { name: "n", type: "u32" },
      { name: "ffnPass", type: "u32" },
    ],
    body: /* wgsl */ `
${CHOICE_STRUCT}

@compute @workgroup_size(256)
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * 256u + lid;
  if (i >= params.n) { return; }
  let w = choice[(i / ${width}u) * ${K}u + params.ffnPass].weight;
  let before = select(y[i], residual[i], params.ffnPass == 0u);
  // a pass the row does not take (weight 0) leaves y as it was, whatever that pass computed
  y[i] = select(before + w * x[i], before, w == 0.0);
}`,
    dispatch: { grid: { param: "n", per: 256 } },
  });
}
