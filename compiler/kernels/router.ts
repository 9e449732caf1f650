// MiLoRA's per-layer router (paper eq. 2-3, appendix C eq. 8): pool the layer's input over each
// prompt, apply the activation g to the pooled vector, gate, select, and write the gates into the
// step's gate table, the layout the LoRA kernels read. One adapter's router per dispatch (each tenant
// has its own weights).
//
// Prompt routing (`when prompt`), at prefill:
//   [routerScoreKernel]  (attention pooling only) scores[t] = h[t] . w_sa  for t < rows
//   routerPoolKernel     p[i] = pool over rows [start_i, end_i) of h (attention: softmax_t(scores) weights)
//   routerGateKernel     on g(p): writes the one decision to every row of the prompt
// Per-token routing (`when token`): routerGateKernel alone, on g(h[t]), one item per row writing that
// row's gates.
//
// Gates (eq. 3): TopK(softmax(g(p) W_gate^T)): the chosen experts keep their softmax probabilities over
// all experts (they need not sum to 1), the others get 0; with `renormalize` the chosen probabilities
// are divided by their sum (the authors' code).
//
// Buffers (f32 unless noted; H = hidden, E = experts):
//   h        [rows, H]    the layer's input hidden states
//   ranges   u32 [n, 2]   (start, end) rows of item i's prompt in h; end > start
//   pooler   [H]          w_sa of the self-attention pooler
//   scores   [rows]       attention scores (only rows inside some range are read)
//   pooled   [n, H]       pooled router inputs (before the activation)
//   items    u32 [n, 3]   (input row of x, first and end table rows) for the gate kernel
//   weight   [E, H]       W_gate (logits z = g(x) W_gate^T)
//   rational [m + 1 + n]  the rational activation's a_0..a_m, b_1..b_n (activation rational only)
//   table    [rows, stride] gate table: one row per token of the step, one column per (layer, module)
import type { Activation, Pooling, Selection } from "../model.ts";
import type { RationalOrders } from "../rational.ts";
import { activationStorage, activationWgsl } from "./activation.ts";
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, kernelSource, vec4Rows } from "./wgsl.ts";

const WORKGROUP = 64;
/** The lowest finite f32, as a WGSL literal. */
const LOWEST = "-0x1.fffffep+127f";
// Most experts one gate dispatch selects among (their partial sums share workgroup memory).
const MAX_EXPERTS = 64;

// Sum or max over the workgroup; every invocation gets the result. The leading barrier lets two
// reductions run back to back on the same scratch memory.
const REDUCE = /* wgsl */ `
var<workgroup> scratch: array<f32, ${WORKGROUP}>;

fn reduce(value: f32, lid: u32, isMax: bool) -> f32 {
  workgroupBarrier();
  scratch[lid] = value;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) {
      let other = scratch[lid + stride];
      scratch[lid] = select(scratch[lid] + other, max(scratch[lid], other), isMax);
    }
  }
  return workgroupUniformLoad(&scratch[0]);
}`;

export interface RouterScoreConstants {
  readonly hidden: number;
}

/** Self-attention pooler scores of every row (eq. 8): u_t = h[t] . w_sa, one workgroup per row. */
export function routerScoreKernel({ hidden }: RouterScoreConstants): KernelSource {
  const h = vec4Rows("h", hidden);
  const pooler = vec4Rows("pooler", hidden);
  return kernelSource({
    name: "router_score",
    constants: { hidden },
    storage: [h.decl, pooler.decl, { name: "scores", access: "read_write", type: "array<f32>" }],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
${h.wgsl}
${pooler.wgsl}
${REDUCE}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  var acc = 0.0;
  for (var q = lid; q < ${h.quads}u; q += ${WORKGROUP}u) { acc += dot(load_h(row, q), load_pooler(0u, q)); }
  let total = reduce(acc, lid, false);
  if (lid == 0u) { scores[row] = total; }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}

export interface RouterPoolConstants {
  readonly hidden: number;
  readonly pooling: Pooling;
}

// Each pooling as WGSL over h[t] for t in [start, end), column quad q; `loop` runs per row.
const POOLED: Record<Pooling, { init: string; loop?: string; finish: string }> = {
  last: { init: "load_h(end - 1u, q)", finish: "acc" },
  mean: { init: "vec4<f32>(0.0)", loop: "acc += load_h(t, q);", finish: "acc / f32(end - start)" },
  max: { init: `vec4<f32>(${LOWEST})`, loop: "acc = max(acc, load_h(t, q));", finish: "acc" },
  attention: {
    init: "vec4<f32>(0.0)",
    loop: "acc += exp(scores[t] - top) * load_h(t, q);",
    finish: "acc / total",
  },
};

/** pooled[i] = the pooling of h over rows [start_i, end_i); 64 invocations own 256 columns. */
export function routerPoolKernel({ hidden, pooling }: RouterPoolConstants): KernelSource {
  const h = vec4Rows("h", hidden);
  const blocks = Math.ceil(h.quads / WORKGROUP);
  const attention = pooling === "attention";
  const way = POOLED[pooling];
  return kernelSource({
    name: "router_pool",
    constants: { hidden, pooling },
    storage: [
      h.decl,
      { name: "ranges", access: "read", type: "array<u32>" },
      ...(attention ? [{ name: "scores", access: "read" as const, type: "array<f32>" }] : []),
      { name: "pooled", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "count", type: "u32" }],
    body: /* wgsl */ `
${h.wgsl}
${attention ? REDUCE : ""}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let g = ${LINEAR_GROUP};
  let item = g / ${blocks}u;
  if (item >= params.count) { return; }
  let start = ranges[2u * item];
  let end = ranges[2u * item + 1u];
  let q = min((g % ${blocks}u) * ${WORKGROUP}u + lid, ${h.quads - 1}u);
${
  attention
    ? `  // Softmax over the prompt's scores, computed by every workgroup of the item (a few reads each).
  var localTop = ${LOWEST};
  for (var t = start + lid; t < end; t += ${WORKGROUP}u) { localTop = max(localTop, scores[t]); }
  let top = reduce(localTop, lid, true);
  var localTotal = 0.0;
  for (var t = start + lid; t < end; t += ${WORKGROUP}u) { localTotal += exp(scores[t] - top); }
  let total = reduce(localTotal, lid, false);`
    : ""
}
  if (end <= start) { return; }
  var acc = ${way.init};
${way.loop ? `  for (var t = start; t < end; t++) { ${way.loop} }` : ""}
  let value = ${way.finish};
  let column = ((g % ${blocks}u) * ${WORKGROUP}u + lid) * 4u;
  for (var c = 0u; c < 4u; c++) {
    if (column + c < ${hidden}u) { pooled[item * ${hidden}u + column + c] = value[c]; }
  }
}`,
    dispatch: { grid: { param: "count", times: blocks } },
  });
}

export interface RouterGateConstants {
  readonly hidden: number;
  /** Table column (module index within the layer) of each of the router's experts, in gate order. */
  readonly columns: readonly number[];
  /** Columns per layer in the gate table. */
  readonly width: number;
  readonly selection: Selection;
  /** g, applied to the kernel's input row (a pooled prompt, or one token's state) before the logits. */
  readonly activation: Activation;
  /** The rational activation's orders (activation `rational` only). */
  readonly rational?: RationalOrders;
}

/** The selection as a kernel-name constant: `top_k2`, `threshold0.2-renormalize`, `dense`. */
export function selectionKey(selection: Selection): string {
  if (selection.rule === "dense") return "dense";
  const rule = selection.rule === "top_k" ? `top_k${selection.k}` : `threshold${selection.threshold}`;
  return selection.renormalize ? `${rule}-renormalize` : rule;
}

/** The activation as a kernel-name constant: `gelu`, `rational6-5`. */
export function activationKey(activation: Activation, rational?: RationalOrders): string {
  return activation === "rational" ? `rational${rational?.numerator}-${rational?.denominator}` : activation;
}

// Marks `chosen[e]` for the experts the rule keeps; z holds the logits, prob the softmax over all.
function chooseWgsl(selection: Selection, experts: number): string {
  switch (selection.rule) {
    case "dense":
      return "for (var e = 0u; e < E; e++) { chosen[e] = true; }";
    case "top_k":
      if (!Number.isInteger(selection.k) || selection.k < 1 || selection.k > experts)
        throw new Error(`router gate: top_k ${selection.k} must be between 1 and the ${experts} experts`);
      // Repeated argmax with a strict comparison: among equal logits the lower index wins.
      return `for (var n = 0u; n < ${selection.k}u; n++) {
      var pick = E;
      for (var e = 0u; e < E; e++) {
        if (!chosen[e] && (pick == E || z[e] > z[pick])) { pick = e; }
      }
      chosen[pick] = true;
    }`;
    case "threshold":
      // Probabilities >= T, and always the (lowest-index) argmax.
      return `for (var e = 0u; e < E; e++) { chosen[e] = e == best || prob[e] >= ${f32Literal(selection.threshold)}; }`;
  }
}

/**
 * For each item (in, first, end): the gates of g(x[in]) W_gate^T by the selection (see the top of this
 * file), written to table rows [first, end) at columns base + columns[e]; the layer's other columns are
 * set to 0 there. params: count (items), stride (table columns), base (the layer's first column).
 */
export function routerGateKernel({ hidden, columns, width, selection, activation, rational }: RouterGateConstants): KernelSource {
  const experts = columns.length;
  if (experts < 1 || experts > MAX_EXPERTS) throw new Error(`router gate: ${experts} experts, expected 1 to ${MAX_EXPERTS}`);
  if (columns.some((c) => !Number.isInteger(c) || c < 0 || c >= width) || new Set(columns).size !== experts)
    throw new Error(`router gate: expert columns [${columns.join(", ")}] must be distinct columns below ${width}`);
  // For each column of the layer, the expert that fills it (E for none: gate 0).
  const expertOf = Array.from({ length: width }, (_, c) => (columns.includes(c) ? columns.indexOf(c) : experts));
  const x = vec4Rows("x", hidden);
  const weight = vec4Rows("weight", hidden);
  const renormalize = selection.rule !== "dense" && selection.renormalize;
  return kernelSource({
    name: "router_gate",
    constants: { hidden, columns: columns.join("-"), width, selection: selectionKey(selection), activation: activationKey(activation, rational) },
    storage: [
      x.decl,
      { name: "items", access: "read", type: "array<u32>" },
      weight.decl,
      ...activationStorage(activation),
      { name: "table", access: "read_write", type: "array<f32>" },
    ],
    params: [
      { name: "count", type: "u32" },
      { name: "stride", type: "u32" },
      { name: "base", type: "u32" },
    ],
    body: /* wgsl */ `
${x.wgsl}
${weight.wgsl}
${activationWgsl(activation, rational)}

const E = ${experts}u;
const WIDTH = ${width}u;
const EXPERT_OF = array<u32, WIDTH>(${expertOf.map((e) => `${e}u`).join(", ")});
var<workgroup> partial: array<f32, ${experts * WORKGROUP}>;
var<workgroup> columnGate: array<f32, WIDTH>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let item = ${LINEAR_GROUP};
  if (item >= params.count) { return; }
  let inRow = items[3u * item];
  var acc: array<f32, E>;
  for (var q = lid; q < ${x.quads}u; q += ${WORKGROUP}u) {
    let v = activate(load_x(inRow, q));
    for (var e = 0u; e < E; e++) { acc[e] += dot(v, load_weight(e, q)); }
  }
  for (var e = 0u; e < E; e++) { partial[e * ${WORKGROUP}u + lid] = acc[e]; }
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) {
      for (var e = 0u; e < E; e++) { partial[e * ${WORKGROUP}u + lid] += partial[e * ${WORKGROUP}u + lid + stride]; }
    }
  }
  workgroupBarrier();
  if (lid == 0u) {
    var z: array<f32, E>;
    for (var e = 0u; e < E; e++) { z[e] = partial[e * ${WORKGROUP}u]; }
    // Softmax over all experts; best is the lowest-index argmax.
    var best = 0u;
    for (var e = 1u; e < E; e++) { if (z[e] > z[best]) { best = e; } }
    var total = 0.0;
    for (var e = 0u; e < E; e++) { total += exp(z[e] - z[best]); }
    var prob: array<f32, E>;
    for (var e = 0u; e < E; e++) { prob[e] = exp(z[e] - z[best]) / total; }
    var chosen: array<bool, E>;
    ${chooseWgsl(selection, experts)}
${
  renormalize
    ? `    // renormalize: the chosen probabilities divided by their sum (a softmax over the chosen logits).
    var kept = 0.0;
    for (var e = 0u; e < E; e++) { if (chosen[e]) { kept += exp(z[e] - z[best]); } }
    for (var e = 0u; e < E; e++) { prob[e] = exp(z[e] - z[best]) / kept; }`
    : "    // The paper's gates: the chosen experts' probabilities over all experts, as they are."
}
    for (var c = 0u; c < WIDTH; c++) {
      let e = EXPERT_OF[c];
      columnGate[c] = select(0.0, prob[min(e, E - 1u)], e < E && chosen[min(e, E - 1u)]);
    }
  }
  workgroupBarrier();
  // Every row of the item (a whole prompt, or one token) gets the same gates.
  let first = items[3u * item + 1u];
  let cells = (items[3u * item + 2u] - first) * WIDTH;
  for (var i = lid; i < cells; i += ${WORKGROUP}u) {
    table[(first + i / WIDTH) * params.stride + params.base + i % WIDTH] = columnGate[i % WIDTH];
  }
}`,
    dispatch: { grid: { param: "count" } },
  });
}
