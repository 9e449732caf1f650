// Batched, gated multi-adapter LoRA for one (layer, module): y[r] += g[r] * s * B (A x[r]), as two
// kernels: the shrink t = A x (the plan's `lora_shrink` op, before the module's base product), and the
// expand, run after the base product has written y (at decode the matvec's epilogue does it instead,
// matvec.ts). Rows are the tokens of several sequences, each with its own adapter slot and gate, so
// one dispatch serves a batch that mixes tenants and routing. The shrink serves a group of modules that
// read the same input (`modules`: q/k/v as one, gate/up as one; a group of one otherwise), one
// dispatch reading x once for all of them (below).
//
// Buffers (f32 unless noted; `in` = inFeatures, `out` = outFeatures, R = maxRank):
//   x          [rows, in]           the module's input
//   a          [slots, R, in]       lora_A of every resident adapter slot, rows past a slot's rank unused
//   b          [slots, out, R]      lora_B likewise, zero past the slot's rank
//   slots      [slots] LoraSlot     { rank: u32, scaling: f32 } (8 bytes each; see packLoraSlots)
//   rowAdapter [rows] u32           slot of each row, NO_ADAPTER for none
//   gates      [rows, gateStride]   gate of each row and expert module; this module's is column gateIndex
//   t          [rows, R]            shrink's output: t[r, j] = x[r] . a[slot, j] for j < rank
//   y          [rows, out]          expand adds g * scaling * t[r] . b[slot, o] to y[r, o]
// params: rows, gateStride, gateIndex (so every module of one shape shares a pipeline).
//
// DoRA (Liu et al. 2024; PEFT's use_dora), an expand variant: a DoRA module computes
// d[o] * (W x + scaling * B A x)[o] with d = m / ||W + scaling * B A||_row, precomputed per slot at load.
// With a gate g it adds g times that module's change of the base output, so g = 0 is the base and
// g = 1 is PEFT's DoRA (docs/formats.md, "DoRA"):
//   y[r, o] += g * (d[o] - 1) * (W x)[r, o] + g * d[o] * scaling * t[r] . b[slot, o]
//   dora       [slots, out]         d of every slot's output rows; 1 for a plain LoRA slot (then the
//                                   first term is skipped and y gets exactly what plain LoRA adds)
//   residual   [rows, out]          (o_proj, down_proj) what the base product added y to: there y holds
//                                   residual + W x, so W x is y - residual
//
// A group shrink (`modules` M > 1) runs (rows, M) workgroups, each one module's t for one row exactly as
// a group of one does; the group's buffers are module-major, each module's region padded to 256 bytes
// (runtime/gpu/layouts.ts LORA_REGION_BYTES), so the per-module kernels (expand, the epilogue matvec) bind
// one module's region as a buffer range and stay as they are. WebGPU's default limit of 8 storage
// buffers a stage is why the group has one A and one slots buffer, not one per module:
//   a          [M][aRows, in]       module m's A at rows m * aRows (params.aRows), [slots, R, in] first
//   slots      [M][slotStride]      module m's LoraSlot of slot s at m * slotStride + s (rank 0: no LoRA there)
//   t          [M][tStride]         module m's [rows, loraRowColumns] at words m * tStride
//   gates      column gateIndex + m is module m's gate (a group's modules are consecutive in gate order)
// The MoE variants serve groups of one: "route" reads one module's router (per_module routes each
// module with its own), and per_ffn's "pass" shrinks run one module at a time in the feed-forward passes.
//
// A row is active when it has a slot and a non-zero gate (a group shrink: a (row, module) pair, each
// module its own gate column); inactive rows are neither read nor written (y stays bit-identical, t's
// values keep whatever they held; with the row info the row's slot word says NO_ADAPTER, which the
// epilogue reads in place of rowAdapter and gates) and their workgroups stop before any weight read:
// modules that routing switched off cost a few index reads. Each workgroup serves one row (shrink)
// or one row's block of 256 columns (expand), so the rows of a decode batch, each of its own tenant,
// run side by side on separate workgroups instead of one after another in a shared row tile (which
// on llvmpipe, one workgroup per core, made a mixed-tenant batch cost 2-3x a one-tenant one).
import type { KernelSource } from "./kernel.ts";
import { CHOICE_STRUCT, NO_EXPERT, routeRowWgsl, type MoeSelection } from "./moe.ts";

export { NO_ADAPTER, packLoraSlots, type LoraSlotInfo } from "../../runtime/gpu/layouts.ts";
import { loraRowColumns } from "../../runtime/gpu/layouts.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource, vec4Rows } from "./wgsl.ts";

export interface LoraConstants {
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly maxRank: number;
  /**
   * The engine's t layout (loraRowColumns): each row's values are followed by the row's LoRA info
   * (ROW_INFO: slot, gate, scaling, rank; slot NO_ADAPTER for an inactive row), which the shrink writes
   * and a LoRA matvec's epilogue (matvec.ts) reads in place of slots, rowAdapter and gates. Without it,
   * t is [rows, maxRank] (the training graph's, which keeps t for the backward pass).
   */
  readonly rowInfo?: boolean;
}



/**
 * The shrink kernel's. Mixture-of-LoRA variants (moe.ts) gate each rank j of a slot's LoRA by its
 * expert e(j) = j / (rank / E), writing t[r, j] = gate_e(j) * (x[r] . a[slot, j]):
 * - `moe: "route"` (per_module, MOELoRA): the kernel routes the row itself with its slot's router
 *   `router` [slots, E, in] (slots whose `routed` flag is 0 get every gate 1: plain LoRA);
 * - `moe: "pass"` (per_ffn, MixLoRA): the row's choice number `pass` (moe_route's output) picks one
 *   expert, gate 1; a choice of weight 0 zeroes the row's t; NO_EXPERT (a row of no routed slot) keeps
 *   every rank.
 */
export interface LoraShrinkConstants extends LoraConstants {
  readonly moe?: "route" | "pass";
  readonly experts?: number;
  readonly topK?: number;
  readonly renormalize?: boolean;
  /**
   * Modules of the group sharing this input, one dispatch for all (default 1). Above 1 the kernel
   * takes the group's strides as params (aRows, slotStride, tStride: the slot count and the engine's
   * rows are runtime quantities) and dispatches rows * modules workgroups.
   */
  readonly modules?: number;
}

/** The expand kernel's: with `dora` it applies each slot's DoRA factors; `residual` says y holds residual + W x. */
export interface LoraExpandConstants extends LoraConstants {
  readonly dora?: boolean;
  readonly residual?: boolean;
}

const WORKGROUP = 64;
// Expand: columns per invocation, 64 apart; fewer, fuller workgroups cost less to launch on llvmpipe.
const COLUMNS_PER_INVOCATION = 4;
const LANES = 8; // shrink: invocations splitting K for one rank index
const RANKS_PER_STEP = WORKGROUP / LANES;

const PARAMS = [
  { name: "rows", type: "u32" },
  { name: "gateStride", type: "u32" },
  { name: "gateIndex", type: "u32" },
] as const;

// Shared by both kernels: which rows are active (for a group shrink, which (row, module) pairs).
function rowSelection(grouped: boolean): string {
  return /* wgsl */ `
struct LoraSlot { rank: u32, scaling: f32 }
const NO_ADAPTER = 0xffffffffu;

fn active_slot(row: u32${grouped ? ", m: u32" : ""}) -> u32 {
  if (row >= params.rows) { return NO_ADAPTER; }
  let s = rowAdapter[row];
  if (s == NO_ADAPTER || gates[row * params.gateStride + params.gateIndex${grouped ? " + m" : ""}] == 0.0) { return NO_ADAPTER; }
  return s;
}`;
}
const ROW_SELECTION = rowSelection(false);
const GROUP_PARAMS = [
  { name: "aRows", type: "u32" },
  { name: "slotStride", type: "u32" },
  { name: "tStride", type: "u32" },
] as const;

const SELECTION_BUFFERS = [
  { name: "slots", access: "read", type: "array<LoraSlot>" },
  { name: "rowAdapter", access: "read", type: "array<u32>" },
  { name: "gates", access: "read", type: "array<f32>" },
] as const;

function checkConstants({ inFeatures, outFeatures, maxRank }: LoraConstants): void {
  for (const [name, v] of Object.entries({ inFeatures, outFeatures, maxRank }))
    if (!Number.isInteger(v) || v < 1) throw new Error(`LoRA kernel: ${name} must be a positive integer, got ${v}`);
}

/**
 * t[r, 0..rank) = x[r] A_slot^T for every active row (times its expert's gate in the MoE variants): one
 * workgroup per row, and with `modules` M > 1 per (row, module), module m writing its own region of t.
 */
export function loraShrinkKernel(c: LoraShrinkConstants): KernelSource {
  checkConstants(c);
  const { inFeatures, maxRank, moe } = c;
  const rowInfo = c.rowInfo ?? false;
  const M = c.modules ?? 1;
  if (!Number.isInteger(M) || M < 1) throw new Error(`LoRA shrink kernel: modules must be a positive integer, got ${M}`);
  if (M > 1 && moe) throw new Error("LoRA shrink kernel: the MoE variants serve groups of one module");
  const grouped = M > 1;
  // Where module m's A rows, slots and t start (nothing for a group of one).
  const aAt = grouped ? "m * params.aRows + " : "";
  const slotAt = grouped ? "m * params.slotStride + " : "";
  const tAt = grouped ? "m * params.tStride + " : "";
  const gateAt = grouped ? " + m" : "";
  const T = loraRowColumns(maxRank, rowInfo);
  const infoAt = 4 * Math.ceil(maxRank / 4);
  const x = vec4Rows("x", inFeatures);
  const a = vec4Rows("a", inFeatures);
  const selection: MoeSelection | undefined = moe && { experts: c.experts ?? 0, topK: c.topK ?? 0, renormalize: c.renormalize ?? false };
  const router = moe === "route" ? vec4Rows("router", inFeatures) : undefined;
  const route = moe === "route" ? routeRowWgsl(selection!, inFeatures, "router") : undefined;
  const E = selection?.experts ?? 1;
  const moeBuffers =
    moe === "route"
      ? [router!.decl, { name: "routed", access: "read", type: "array<u32>" } as const]
      : moe === "pass"
        ? [{ name: "choice", access: "read", type: "array<Choice>" } as const]
        : [];
  // Per rank j: the gate of its expert (1 without MoE), and whether the dot product is needed at all.
  const prologue =
    moe === "route"
      ? /* wgsl */ `
  if (routed[s] != 0u) {
${route!.body}
  } else {
    if (lid < ${E}u) { expert_gate[lid] = 1.0; }
    workgroupBarrier();
  }
  let expert_rank = max(1u, rank / ${E}u);`
      : moe === "pass"
        ? /* wgsl */ `
  let picked = choice[row * ${selection!.topK}u + params.ffnPass];
  let expert_rank = max(1u, rank / ${E}u);`
        : "";
  const gateOf =
    moe === "route"
      ? "expert_gate[min(j / expert_rank, " + (E - 1) + "u)]"
      : moe === "pass"
        ? `select(select(0.0, 1.0, j / expert_rank == picked.expert), 1.0, picked.expert == ${NO_EXPERT}u) * select(1.0, 0.0, picked.weight == 0.0)`
        : "";
  return kernelSource({
    name: "lora_shrink",
    constants: {
      inFeatures,
      maxRank,
      ...(rowInfo ? { rowInfo } : {}),
      ...(moe ? { moe, experts: selection!.experts, topK: selection!.topK, ...(moe === "route" ? { renormalize: selection!.renormalize } : {}) } : {}),
      ...(grouped ? { modules: M } : {}),
    },
    // With the row info, t is words: the slot and rank are integers (as f32 bits they would be subnormal, which a device may flush).
    storage: [x.decl, a.decl, ...SELECTION_BUFFERS, ...moeBuffers, { name: "t", access: "read_write", type: rowInfo ? "array<u32>" : "array<f32>" }],
    params: [...PARAMS, ...(grouped ? GROUP_PARAMS : []), ...(moe === "pass" ? [{ name: "ffnPass", type: "u32" } as const] : [])],
    body: /* wgsl */ `
${[rowSelection(grouped), ...(moe ? [CHOICE_STRUCT] : []), x.wgsl, a.wgsl, ...(router ? [router.wgsl, route!.decls] : [])].join("\n")}

var<workgroup> partial: array<f32, ${WORKGROUP}>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {${
    grouped
      ? `
  // Workgroup g serves row g % rows of module m = g / rows; the grid's excess groups get no row.
  let g = ${LINEAR_GROUP};
  let m = g / params.rows;
  let row = select(g % params.rows, params.rows, m >= ${M}u);
  let s = active_slot(row, m);`
      : `
  let row = ${LINEAR_GROUP};
  let s = active_slot(row);`
  }${
    rowInfo
      ? `
  let info = ${tAt}row * ${T}u + ${infoAt}u;
  if (s == NO_ADAPTER) {
    if (lid == 0u && row < params.rows) { t[info] = NO_ADAPTER; }
    return;
  }`
      : `
  if (s == NO_ADAPTER) { return; }`
  }
  let rank = min(slots[${slotAt}s].rank, ${maxRank}u);${
    rowInfo
      ? `
  if (lid == 0u) {
    t[info] = s;
    t[info + 1u] = bitcast<u32>(gates[row * params.gateStride + params.gateIndex${gateAt}]);
    t[info + 2u] = bitcast<u32>(slots[${slotAt}s].scaling);
    t[info + 3u] = rank;
  }`
      : ""
  }
  let lane = lid % ${LANES}u;
  let step = lid / ${LANES}u;${prologue}
  for (var j0 = 0u; j0 < rank; j0 += ${RANKS_PER_STEP}u) {
    let j = j0 + step;
    var acc = 0.0;${moe ? `
    let gate = select(0.0, ${gateOf}, j < rank);` : ""}
    if (j < rank${moe ? " && gate != 0.0" : ""}) {
      for (var q = lane; q < ${x.quads}u; q += ${LANES}u) { acc += dot(load_x(row, q), load_a(${aAt}s * ${maxRank}u + j, q)); }
    }
    partial[lid] = acc;
    workgroupBarrier();
    if (lane == 0u && j < rank) {
      var sum = 0.0;
      for (var l = 0u; l < ${LANES}u; l++) { sum += partial[lid + l]; }
      t[${tAt}row * ${T}u + j] = ${rowInfo ? `bitcast<u32>(${moe ? "gate * sum" : "sum"})` : moe ? "gate * sum" : "sum"};
    }
    workgroupBarrier();
  }
}`,
    dispatch: { grid: grouped ? { param: "rows", times: M } : { param: "rows" } },
  });
}

/**
 * y[r, :] += gate * scaling * t[r, 0..rank) B_slot^T for every active row; other rows untouched. With
 * `dora`, a slot's factors d scale the module's whole output as the header says.
 */
export function loraExpandKernel(c: LoraExpandConstants): KernelSource {
  checkConstants(c);
  const { outFeatures, maxRank } = c;
  const dora = c.dora ?? false;
  const residual = c.residual ?? false;
  const rowInfo = c.rowInfo ?? false;
  if (residual && !dora) throw new Error("LoRA expand kernel: residual is only read by the DoRA variant");
  // With the row info, a row's values are followed by its info: the masked quads past the rank never read it.
  const t = vec4Rows("t", loraRowColumns(maxRank, rowInfo));
  const b = vec4Rows("b", maxRank);
  const columnBlocks = Math.ceil(outFeatures / (WORKGROUP * COLUMNS_PER_INVOCATION));
  const doraBuffers = dora
    ? [{ name: "dora", access: "read", type: "array<f32>" } as const, ...(residual ? [{ name: "residual", access: "read", type: "array<f32>" } as const] : [])]
    : [];
  const update = dora
    ? /* wgsl */ `let d = dora[s * ${outFeatures}u + col];
    var delta = d * coef * acc;
    // A plain LoRA slot (d = 1) adds coef * acc alone, bit for bit as without DoRA.
    if (d != 1.0) { delta += gate * (d - 1.0) * ${residual ? "(y[at] - residual[at])" : "y[at]"}; }
    y[at] += delta;`
    : "y[at] += coef * acc;";
  return kernelSource({
    name: "lora_expand",
    constants: { outFeatures, maxRank, ...(dora ? { dora } : {}), ...(residual ? { residual } : {}), ...(rowInfo ? { rowInfo } : {}) },
    storage: [t.decl, b.decl, ...SELECTION_BUFFERS, ...doraBuffers, { name: "y", access: "read_write", type: "array<f32>" }],
    params: PARAMS,
    body: /* wgsl */ `
${ROW_SELECTION}
${t.wgsl}
${b.wgsl}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let g = ${LINEAR_GROUP};
  let row = g / ${columnBlocks}u;
  let s = active_slot(row);
  if (s == NO_ADAPTER) { return; }
  let rank = min(slots[s].rank, ${maxRank}u);
  let gate = gates[row * params.gateStride + params.gateIndex];
  let coef = gate * slots[s].scaling;
  let block = (g % ${columnBlocks}u) * ${WORKGROUP * COLUMNS_PER_INVOCATION}u;
  for (var k = 0u; k < ${COLUMNS_PER_INVOCATION}u; k++) {
    let col = block + k * ${WORKGROUP}u + lid;
    if (col >= ${outFeatures}u) { return; }
    var acc = 0.0;
    for (var q = 0u; q * 4u < rank; q++) {
      // t past a slot's rank was never written: mask it to zero rather than trust its contents.
      let inRank = vec4<u32>(q * 4u) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(rank);
      acc += dot(select(vec4<f32>(0.0), load_t(row, q), inRank), load_b(s * ${outFeatures}u + col, q));
    }
    let at = row * ${outFeatures}u + col;
    ${update}
  }
}`,
    dispatch: { grid: { param: "rows", times: columnBlocks } },
  });
}
