// Batched, gated multi-adapter LoRA for one (layer, module): y[r] += g[r] * s * B (A x[r]), as two
// kernels run after the base matmul has written y. Rows are the tokens of several sequences, each
// with its own adapter slot and gate, so one dispatch serves a batch that mixes tenants and routing.
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
// A row is active when it has a slot and a non-zero gate; inactive rows are neither read nor written
// (y stays bit-identical, t keeps whatever it held) and a tile with no active row reads no weights:
// modules that routing switched off cost a few index reads. Each workgroup owns TILE consecutive
// rows and makes one pass per distinct slot among them, so a prefill run of one slot reads the
// slot's weights once per tile and a decode batch of mixed tenants reads each slot's once.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, grid, kernelSource, vec4Rows } from "./wgsl.ts";

export interface LoraConstants {
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly maxRank: number;
}

/** `rowAdapter` value of a row that uses no adapter. */
export const NO_ADAPTER = 0xffffffff;

/** Rank and scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) of one resident adapter slot. */
export interface LoraSlotInfo {
  readonly rank: number;
  readonly scaling: number;
}

/** The `slots` buffer's bytes: per slot a u32 rank then an f32 scaling, little-endian. */
export function packLoraSlots(slots: readonly LoraSlotInfo[]): Uint8Array {
  const bytes = new Uint8Array(slots.length * 8);
  const view = new DataView(bytes.buffer);
  slots.forEach((s, i) => {
    view.setUint32(i * 8, s.rank, true);
    view.setFloat32(i * 8 + 4, s.scaling, true);
  });
  return bytes;
}

const TILE = 8; // rows per workgroup
const WORKGROUP = 64;
const LANES = 8; // shrink: invocations splitting K for one rank index
const RANKS_PER_STEP = WORKGROUP / LANES;

const PARAMS = [
  { name: "rows", type: "u32" },
  { name: "gateStride", type: "u32" },
  { name: "gateIndex", type: "u32" },
] as const;

// Shared by both kernels: which rows are active.
const ROW_SELECTION = /* wgsl */ `
struct LoraSlot { rank: u32, scaling: f32 }
const NO_ADAPTER = 0xffffffffu;
const TILE = ${TILE}u;

fn active_slot(row: u32) -> u32 {
  if (row >= params.rows) { return NO_ADAPTER; }
  let s = rowAdapter[row];
  if (s == NO_ADAPTER || gates[row * params.gateStride + params.gateIndex] == 0.0) { return NO_ADAPTER; }
  return s;
}`;

const SELECTION_BUFFERS = [
  { name: "slots", access: "read", type: "array<LoraSlot>" },
  { name: "rowAdapter", access: "read", type: "array<u32>" },
  { name: "gates", access: "read", type: "array<f32>" },
] as const;

function checkConstants({ inFeatures, outFeatures, maxRank }: LoraConstants): void {
  for (const [name, v] of Object.entries({ inFeatures, outFeatures, maxRank }))
    if (!Number.isInteger(v) || v < 1) throw new Error(`LoRA kernel: ${name} must be a positive integer, got ${v}`);
  // Expand keeps a tile's t rows in workgroup memory.
  if (maxRank > 256) throw new Error(`LoRA kernel: maxRank ${maxRank} exceeds 256`);
}

/** t[r, 0..rank) = x[r] A_slot^T for every active row. */
export function loraShrinkKernel(c: LoraConstants): KernelSource {
  checkConstants(c);
  const { inFeatures, maxRank } = c;
  const x = vec4Rows("x", inFeatures);
  const a = vec4Rows("a", inFeatures);
  return kernelSource({
    name: "lora_shrink",
    constants: { inFeatures, maxRank },
    storage: [x.decl, a.decl, ...SELECTION_BUFFERS, { name: "t", access: "read_write", type: "array<f32>" }],
    params: PARAMS,
    body: /* wgsl */ `
${ROW_SELECTION}
${x.wgsl}
${a.wgsl}

var<workgroup> tileSlot: array<u32, TILE>;
var<workgroup> passSlot: array<u32, TILE>;
var<workgroup> passCount: u32;
var<workgroup> partial: array<f32, ${TILE * WORKGROUP}>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let r0 = ${LINEAR_GROUP} * TILE;
  if (lid < TILE) { tileSlot[lid] = active_slot(r0 + lid); }
  workgroupBarrier();
  // The tile's distinct slots in order of first use: one pass, one read of A, per slot.
  if (lid == 0u) {
    var n = 0u;
    for (var i = 0u; i < TILE; i++) {
      let s = tileSlot[i];
      var seen = s == NO_ADAPTER;
      for (var q = 0u; q < n; q++) { seen = seen || passSlot[q] == s; }
      if (!seen) { passSlot[n] = s; n++; }
    }
    passCount = n;
  }
  let passes = workgroupUniformLoad(&passCount);
  let lane = lid % ${LANES}u;
  let step = lid / ${LANES}u;
  for (var p = 0u; p < passes; p++) {
    let s = workgroupUniformLoad(&passSlot[p]);
    var mask = 0u;
    for (var i = 0u; i < TILE; i++) { if (tileSlot[i] == s) { mask |= 1u << i; } }
    let rank = min(slots[s].rank, ${maxRank}u);
    for (var j0 = 0u; j0 < rank; j0 += ${RANKS_PER_STEP}u) {
      let j = j0 + step;
      var acc: array<f32, TILE>;
      if (j < rank) {
        for (var q = lane; q < ${x.quads}u; q += ${LANES}u) {
          let av = load_a(s * ${maxRank}u + j, q);
          for (var i = 0u; i < TILE; i++) {
            if ((mask & (1u << i)) != 0u) { acc[i] += dot(load_x(r0 + i, q), av); }
          }
        }
      }
      for (var i = 0u; i < TILE; i++) { partial[(i * ${RANKS_PER_STEP}u + step) * ${LANES}u + lane] = acc[i]; }
      workgroupBarrier();
      // Invocation lid sums the lanes of (row lid / 8, rank index j0 + lid % 8).
      let i = lid / ${RANKS_PER_STEP}u;
      let jOut = j0 + lid % ${RANKS_PER_STEP}u;
      if ((mask & (1u << i)) != 0u && jOut < rank) {
        var sum = 0.0;
        for (var l = 0u; l < ${LANES}u; l++) { sum += partial[lid * ${LANES}u + l]; }
        t[(r0 + i) * ${maxRank}u + jOut] = sum;
      }
      workgroupBarrier();
    }
  }
}`,
    dispatch: (p) => grid(Math.ceil((p.rows ?? 0) / TILE)),
  });
}

/** y[r, :] += gate * scaling * t[r, 0..rank) B_slot^T for every active row; other rows untouched. */
export function loraExpandKernel(c: LoraConstants): KernelSource {
  checkConstants(c);
  const { outFeatures, maxRank } = c;
  const t = vec4Rows("t", maxRank);
  const b = vec4Rows("b", maxRank);
  const columnBlocks = Math.ceil(outFeatures / WORKGROUP);
  return kernelSource({
    name: "lora_expand",
    constants: { outFeatures, maxRank },
    storage: [t.decl, b.decl, ...SELECTION_BUFFERS, { name: "y", access: "read_write", type: "array<f32>" }],
    params: PARAMS,
    body: /* wgsl */ `
${ROW_SELECTION}
${t.wgsl}
${b.wgsl}

const QUADS = ${t.quads}u;
var<workgroup> tileSlot: array<u32, TILE>;
var<workgroup> tileCoef: array<f32, TILE>;
var<workgroup> tileT: array<vec4<f32>, ${TILE * t.quads}>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let g = ${LINEAR_GROUP};
  let r0 = (g / ${columnBlocks}u) * TILE;
  let col = (g % ${columnBlocks}u) * ${WORKGROUP}u + lid;
  if (lid < TILE) {
    let s = active_slot(r0 + lid);
    tileSlot[lid] = s;
    if (s != NO_ADAPTER) { tileCoef[lid] = gates[(r0 + lid) * params.gateStride + params.gateIndex] * slots[s].scaling; }
  }
  workgroupBarrier();
  // t past a slot's rank was never written: mask it to zero rather than trust its contents.
  for (var e = lid; e < TILE * QUADS; e += ${WORKGROUP}u) {
    let i = e / QUADS;
    let q = e % QUADS;
    let s = tileSlot[i];
    var v = vec4<f32>(0.0);
    if (s != NO_ADAPTER) {
      let rank = slots[s].rank;
      if (q * 4u < rank) {
        let inRank = vec4<u32>(q * 4u) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(rank);
        v = select(vec4<f32>(0.0), load_t(r0 + i, q), inRank);
      }
    }
    tileT[e] = v;
  }
  workgroupBarrier();
  if (col >= ${outFeatures}u) { return; }
  // B's row for this column, reloaded only when the slot changes along the tile.
  var bRow: array<vec4<f32>, ${t.quads}>;
  var current = NO_ADAPTER;
  var quads = 0u;
  for (var i = 0u; i < TILE; i++) {
    let s = tileSlot[i];
    if (s == NO_ADAPTER) { continue; }
    if (s != current) {
      current = s;
      quads = (min(slots[s].rank, ${maxRank}u) + 3u) / 4u;
      for (var q = 0u; q < quads; q++) { bRow[q] = load_b(s * ${outFeatures}u + col, q); }
    }
    var acc = 0.0;
    for (var q = 0u; q < quads; q++) { acc += dot(tileT[i * QUADS + q], bRow[q]); }
    let at = (r0 + i) * ${outFeatures}u + col;
    y[at] += tileCoef[i] * acc;
  }
}`,
    dispatch: (p) => grid(Math.ceil((p.rows ?? 0) / TILE) * columnBlocks),
  });
}
