// Causal self-attention over whole training sequences (every row of a sequence at once, like a prefill),
// returning besides the output the log-sum-exp of each (row, head)'s scores, which the backward
// (attention-backward.ts) needs to recompute the probabilities without storing a [T, T] matrix.
// Layout: the rows of a batch are packed, each sequence's rows contiguous and in position order; row r's
// sequence spans rows sequences[r].x .. sequences[r].y - 1 (see sequenceBounds), and query row r attends
// to key rows sequences[r].x ..= r with KV head h / (heads / kvHeads) and scale 1/sqrt(headDim).
//   bindings: q (read, f32[rows, heads*headDim]), k (read), v (read) (f32[rows, kvHeads*headDim]),
//             sequences (read, vec2<u32>[rows]), out (read_write, f32[rows, heads*headDim]),
//             lse (read_write, f32[rows, heads]: log sum_j exp(q.k_j / sqrt(headDim)), natural log)
//   params:   rows
// One workgroup per (row, head), in two passes over the keys: each lane first keeps its own running
// maximum and sum over keys lid, lid + 64, ... (no barrier inside), a tree merges the lanes into the
// log-sum-exp, then blocks of 64 keys weight v by exp(score - lse). The log-sum-exp lives in workgroup
// memory and is re-read at each use (Mesa 22.3 llvmpipe loses reduced values held in registers across
// later barriers, docs/drivers.md). Scores are summed as (q_d / sqrt(headDim)) * k_d in order of d, the
// same expression the backward kernels use, so their probabilities round the same way.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, kernelSource } from "./wgsl.ts";

export interface AttentionTrainConstants {
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
}

/** Keys (or queries) per block = invocations per workgroup of the training attention kernels. */
export const ATTENTION_TRAIN_BLOCK = 64;
// Stands in for -infinity, which WGSL cannot spell; exp(NEG_INF - m) is exactly 0.
const NEG_INF = "-3.0e38";

/** Per-row [first row, one past the last row] of its sequence, for packed sequences of these lengths. */
export function sequenceBounds(lengths: readonly number[]): Uint32Array {
  const out = new Uint32Array(2 * lengths.reduce((a, b) => a + b, 0));
  let first = 0;
  for (const n of lengths) {
    for (let r = first; r < first + n; r++) {
      out[2 * r] = first;
      out[2 * r + 1] = first + n;
    }
    first += n;
  }
  return out;
}

/** Per-row position within its sequence (what RoPE takes), for packed sequences of these lengths. */
export function sequencePositions(lengths: readonly number[]): Uint32Array {
  return Uint32Array.from(lengths.flatMap((n) => Array.from({ length: n }, (_, p) => p)));
}

/** Checks the constants every training attention kernel shares; returns the derived sizes. */
export function attentionTrainShape({ heads, kvHeads, headDim }: AttentionTrainConstants) {
  if (!(heads > 0 && kvHeads > 0 && headDim > 0) || heads % kvHeads !== 0)
    throw new Error(`attention: heads ${heads} not a positive multiple of kv_heads ${kvHeads}`);
  return {
    group: heads / kvHeads,
    qWidth: heads * headDim,
    kvWidth: kvHeads * headDim,
    dimsPerLane: Math.ceil(headDim / ATTENTION_TRAIN_BLOCK),
    scale: f32Literal(1 / Math.sqrt(headDim)),
  };
}

export function attentionTrainKernel(c: AttentionTrainConstants): KernelSource {
  const { heads, kvHeads, headDim } = c;
  const { group, qWidth, kvWidth, dimsPerLane, scale } = attentionTrainShape(c);
  const B = ATTENTION_TRAIN_BLOCK;
  return kernelSource({
    name: "attention_train",
    constants: { heads, kvHeads, headDim },
    storage: [
      { name: "q", access: "read", type: "array<f32>" },
      { name: "k", access: "read", type: "array<f32>" },
      { name: "v", access: "read", type: "array<f32>" },
      { name: "sequences", access: "read", type: "array<vec2<u32>>" },
      { name: "out", access: "read_write", type: "array<f32>" },
      { name: "lse", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
var<workgroup> query: array<f32, ${headDim}>;
var<workgroup> weights: array<f32, ${B}>;
var<workgroup> laneMaxes: array<f32, ${B}>;
var<workgroup> laneSums: array<f32, ${B}>;
var<workgroup> rowLse: f32;

fn score(kAt: u32) -> f32 {
  var s = 0.0;
  for (var d = 0u; d < ${headDim}u; d++) { s += query[d] * k[kAt + d]; }
  return s;
}

@compute @workgroup_size(${B})
fn main(${GROUP_BUILTINS}) {
  let item = ${LINEAR_GROUP};
  if (item >= params.rows * ${heads}u) { return; }
  let row = item / ${heads}u;
  let head = item % ${heads}u;
  let first = sequences[row].x;
  let kvOffset = (head / ${group}u) * ${headDim}u;
  let qAt = row * ${qWidth}u + head * ${headDim}u;
  for (var d = lid; d < ${headDim}u; d += ${B}u) { query[d] = q[qAt + d] * ${scale}; }
  workgroupBarrier();

  // Pass 1: this lane's keys, online max and sum in registers (no barrier until the merge).
  var laneMax = ${NEG_INF};
  var laneSum = 0.0;
  for (var key = first + lid; key <= row; key += ${B}u) {
    let s = score(key * ${kvWidth}u + kvOffset);
    if (s > laneMax) {
      laneSum = laneSum * exp(laneMax - s) + 1.0;
      laneMax = s;
    } else {
      laneSum += exp(s - laneMax);
    }
  }
  laneMaxes[lid] = laneMax;
  laneSums[lid] = laneSum;
  for (var stride = ${B / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) {
      let m1 = laneMaxes[lid];
      let m2 = laneMaxes[lid + stride];
      let m = max(m1, m2);
      laneSums[lid] = laneSums[lid] * exp(m1 - m) + laneSums[lid + stride] * exp(m2 - m);
      laneMaxes[lid] = m;
    }
  }
  workgroupBarrier();
  if (lid == 0u) {
    rowLse = laneMaxes[0] + log(laneSums[0]);
    lse[item] = rowLse;
  }
  workgroupBarrier();

  // Pass 2: probabilities exp(score - lse) of a block of keys, then each lane sums its dimensions of v.
  var acc: array<f32, ${dimsPerLane}>;
  for (var start = first; start <= row; start += ${B}u) {
    let key = start + lid;
    var w = 0.0;
    if (key <= row) { w = exp(score(key * ${kvWidth}u + kvOffset) - rowLse); }
    weights[lid] = w;
    workgroupBarrier();
    let count = min(${B}u, row + 1u - start);
    for (var i = 0u; i < ${dimsPerLane}u; i++) {
      let d = lid + i * ${B}u;
      if (d < ${headDim}u) {
        var sum = acc[i];
        for (var j = 0u; j < count; j++) { sum += weights[j] * v[(start + j) * ${kvWidth}u + kvOffset + d]; }
        acc[i] = sum;
      }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < ${dimsPerLane}u; i++) {
    let d = lid + i * ${B}u;
    if (d < ${headDim}u) { out[qAt + d] = acc[i]; }
  }
}`,
    dispatch: { grid: { param: "rows", times: heads } },
  });
}
