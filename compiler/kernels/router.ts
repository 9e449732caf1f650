// MiLoRA's per-layer router: pool the layer's input over each prompt, gate, select, and write the
// gates into the step's gate table, the layout the LoRA kernels read. One adapter's router per
// dispatch (each tenant has its own weights).
//
// Prompt routing (`when prompt`), at prefill:
//   [routerScoreKernel]  (attention pooling only) scores[t] = v . tanh(P act(h[t]))  for t < rows
//   routerPoolKernel     p[i] = pool over rows [start_i, end_i) of act(h)
//   routerGateKernel     on p (activation none); writes the one decision to every row of the prompt
// Per-token routing (`when token`): routerGateKernel alone, on h with the activation, one item per
// row writing that row's gates.
//
// Buffers (f32 unless noted; H = hidden, E = experts, S = pooler size):
//   h       [rows, H]    the layer's input hidden states
//   ranges  u32 [n, 2]   (start, end) rows of item i's prompt in h; end > start
//   pooler  [S, H]       P of the attentive pooler; poolerV [S]: v
//   scores  [rows]       attention scores (only rows inside some range are read)
//   pooled  [n, H]       pooled router inputs
//   items   u32 [n, 3]   (input row of x, first and end table rows) for the gate kernel
//   weight  [E, H]       W_gate (logits z = x W_gate^T)
//   table   [rows, stride] gate table: one row per token of the step, one column per (layer, module)
import type { Activation, Pooling, Selection } from "../model.ts";
import { activationWgsl } from "./activation.ts";
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, grid, kernelSource, vec4Rows } from "./wgsl.ts";

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
  readonly poolerSize: number;
  readonly activation: Activation;
}

/** Attention-pooling scores of every row: v . tanh(P act(h[t])). */
export function routerScoreKernel({ hidden, poolerSize, activation }: RouterScoreConstants): KernelSource {
  const h = vec4Rows("h", hidden);
  const pooler = vec4Rows("pooler", hidden);
  const perInvocation = Math.ceil(poolerSize / WORKGROUP);
  return kernelSource({
    name: "router_score",
    constants: { hidden, poolerSize, activation },
    storage: [
      h.decl,
      pooler.decl,
      { name: "poolerV", access: "read", type: "array<f32>" },
      { name: "scores", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
${h.wgsl}
${pooler.wgsl}
${activationWgsl(activation)}
${REDUCE}

var<workgroup> chunk: array<vec4<f32>, ${WORKGROUP}>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  // act(h[row]) is staged a chunk at a time and shared by the pooler rows of every invocation.
  var acc: array<f32, ${perInvocation}>;
  for (var q0 = 0u; q0 < ${h.quads}u; q0 += ${WORKGROUP}u) {
    let q = q0 + lid;
    chunk[lid] = select(vec4<f32>(0.0), activate(load_h(row, min(q, ${h.quads - 1}u))), q < ${h.quads}u);
    workgroupBarrier();
    let width = min(${WORKGROUP}u, ${h.quads}u - q0);
    for (var k = 0u; k < ${perInvocation}u; k++) {
      let j = lid + k * ${WORKGROUP}u;
      if (j < ${poolerSize}u) {
        for (var c = 0u; c < width; c++) { acc[k] += dot(chunk[c], load_pooler(j, q0 + c)); }
      }
    }
    workgroupBarrier();
  }
  var score = 0.0;
  for (var k = 0u; k < ${perInvocation}u; k++) {
    let j = lid + k * ${WORKGROUP}u;
    // tanh saturates to 1 in f32 beyond 10; clamping keeps every implementation's tanh finite.
    if (j < ${poolerSize}u) { score += poolerV[j] * tanh(clamp(acc[k], -10.0, 10.0)); }
  }
  let total = reduce(score, lid, false);
  if (lid == 0u) { scores[row] = total; }
}`,
    dispatch: (p) => grid(p.rows ?? 0),
  });
}

export interface RouterPoolConstants {
  readonly hidden: number;
  readonly pooling: Pooling;
  readonly activation: Activation;
}

// Each pooling as WGSL over act(h[t]) for t in [start, end), column quad q; `loop` runs per row.
const POOLED: Record<Pooling, { init: string; loop?: string; finish: string }> = {
  last: { init: "activate(load_h(end - 1u, q))", finish: "acc" },
  mean: { init: "vec4<f32>(0.0)", loop: "acc += activate(load_h(t, q));", finish: "acc / f32(end - start)" },
  max: { init: `vec4<f32>(${LOWEST})`, loop: "acc = max(acc, activate(load_h(t, q)));", finish: "acc" },
  attention: {
    init: "vec4<f32>(0.0)",
    loop: "acc += exp(scores[t] - top) * activate(load_h(t, q));",
    finish: "acc / total",
  },
};

/** pooled[i] = the pooling of act(h) over rows [start_i, end_i); 64 invocations own 256 columns. */
export function routerPoolKernel({ hidden, pooling, activation }: RouterPoolConstants): KernelSource {
  const h = vec4Rows("h", hidden);
  const blocks = Math.ceil(h.quads / WORKGROUP);
  const attention = pooling === "attention";
  const way = POOLED[pooling];
  return kernelSource({
    name: "router_pool",
    constants: { hidden, pooling, activation },
    storage: [
      h.decl,
      { name: "ranges", access: "read", type: "array<u32>" },
      ...(attention ? [{ name: "scores", access: "read" as const, type: "array<f32>" }] : []),
      { name: "pooled", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "count", type: "u32" }],
    body: /* wgsl */ `
${h.wgsl}
${activationWgsl(activation)}
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
    dispatch: (p) => grid((p.count ?? 0) * blocks),
  });
}

export interface RouterGateConstants {
  readonly hidden: number;
  /** Table column (module index within the layer) of each of the router's experts, in gate order. */
  readonly columns: readonly number[];
  /** Columns per layer in the gate table. */
  readonly width: number;
  readonly selection: Selection;
  /** `none` on pooled inputs (the pool applied it); the router's activation for per-token routing. */
  readonly activation: Activation;
}

// Marks `chosen[e]` for the experts the rule keeps; z holds the logits.
function chooseWgsl(selection: Selection, experts: number): string {
  switch (selection.rule) {
    case "dense":
      return "for (var e = 0u; e < E; e++) { chosen[e] = true; }";
    case "top_k":
      if (!Number.isInteger(selection.k) || selection.k < 1 || selection.k > experts)
        throw new Error(`router gate: top_k ${selection.k} must be between 1 and the ${experts} experts`);
      // Repeated argmax with a strict comparison: among equal logits the lower index wins.
      return `for (var n = 0u; n < ${selection.k}u; n++) {
      var best = E;
      for (var e = 0u; e < E; e++) {
        if (!chosen[e] && (best == E || z[e] > z[best])) { best = e; }
      }
      chosen[best] = true;
    }`;
    case "threshold":
      // Softmax over all, keep probabilities >= T, and always the (lowest-index) argmax.
      return `var best = 0u;
    for (var e = 1u; e < E; e++) { if (z[e] > z[best]) { best = e; } }
    var sum = 0.0;
    for (var e = 0u; e < E; e++) { sum += exp(z[e] - z[best]); }
    for (var e = 0u; e < E; e++) { chosen[e] = e == best || exp(z[e] - z[best]) / sum >= ${f32Literal(selection.threshold)}; }`;
  }
}

/**
 * For each item (in, first, end): the gates g = selection(softmax) of act(x[in]) W_gate^T, written to
 * table rows [first, end) at columns base + columns[e]; the layer's other columns are set to 0 there.
 * params: count (items), stride (table columns), base (the layer's first column).
 */
export function routerGateKernel({ hidden, columns, width, selection, activation }: RouterGateConstants): KernelSource {
  const experts = columns.length;
  if (experts < 1 || experts > MAX_EXPERTS) throw new Error(`router gate: ${experts} experts, expected 1 to ${MAX_EXPERTS}`);
  if (columns.some((c) => !Number.isInteger(c) || c < 0 || c >= width) || new Set(columns).size !== experts)
    throw new Error(`router gate: expert columns [${columns.join(", ")}] must be distinct columns below ${width}`);
  // For each column of the layer, the expert that fills it (E for none: gate 0).
  const expertOf = Array.from({ length: width }, (_, c) => (columns.includes(c) ? columns.indexOf(c) : experts));
  const x = vec4Rows("x", hidden);
  const weight = vec4Rows("weight", hidden);
  const rule = selection.rule === "top_k" ? `top_k${selection.k}` : selection.rule === "threshold" ? `threshold${selection.threshold}` : "dense";
  return kernelSource({
    name: "router_gate",
    constants: { hidden, columns: columns.join("-"), width, selection: rule, activation },
    storage: [
      x.decl,
      { name: "items", access: "read", type: "array<u32>" },
      weight.decl,
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
${activationWgsl(activation)}

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
    var chosen: array<bool, E>;
    ${chooseWgsl(selection, experts)}
    // Softmax over the chosen experts alone (the maximum of z is always among them).
    var top = ${LOWEST};
    for (var e = 0u; e < E; e++) { if (chosen[e]) { top = max(top, z[e]); } }
    var total = 0.0;
    for (var e = 0u; e < E; e++) { if (chosen[e]) { total += exp(z[e] - top); } }
    for (var c = 0u; c < WIDTH; c++) {
      let e = EXPERT_OF[c];
      columnGate[c] = select(0.0, exp(z[min(e, E - 1u)] - top) / total, e < E && chosen[min(e, E - 1u)]);
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
    dispatch: (p) => grid(p.count ?? 0),
  });
}
