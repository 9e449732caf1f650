// Backward of the training attention (attention-train.ts), FlashAttention-style: the probabilities are
// recomputed from q, k and the forward's log-sum-exp, P_ij = exp(q_i.k_j / sqrt(d) - lse_i), and with
// dP_ij = dOut_i . v_j and D_i = dOut_i . out_i (= sum_j P_ij dP_ij), dS_ij = P_ij (dP_ij - D_i):
//   dQ_i = sum_j dS_ij k_j / sqrt(d),  dK_j = sum_i dS_ij q_i / sqrt(d),  dV_j = sum_i P_ij dOut_i,
// over the causal pairs j <= i of one sequence; dK and dV of a KV head sum over the query heads sharing
// it. Same packed layout as the forward (sequences: per-row [first row, one past the last row]).
// Three kernels, dispatched in this order; none uses atomics, so results are deterministic:
//   attentionBackwardStatsKernel  stats[r, h] = (lse[r, h], D[r, h])
//     bindings: dOut (read), out (read) (f32[rows, heads*headDim]), lse (read, f32[rows, heads]),
//               stats (read_write, vec2<f32>[rows, heads]);  params: rows;  one invocation per (row, head)
//   attentionBackwardQueryKernel  dQ; one workgroup per (query row, head), looping over key blocks
//     bindings: q (read), k (read), v (read), dOut (read), stats (read), sequences (read),
//               dQ (read_write, f32[rows, heads*headDim]);  params: rows
//   attentionBackwardKeyValueKernel  dK, dV; one workgroup per (key row, KV head), looping over its query
//     heads and the blocks of queries at or after the key
//     bindings: q, k, v, dOut, stats, sequences (read), dK, dV (read_write, f32[rows, kvHeads*headDim])
//     params: rows
// lse and D travel together in `stats` so that no kernel needs more than 8 storage bindings.
// Blocks hold 64 keys (queries), one per invocation; each lane then sums its own dimensions over the block.
// Per-(row, head) values are read from `stats` at each use, never reduced inside the kernels.
import type { KernelSource } from "./kernel.ts";
import { ATTENTION_TRAIN_BLOCK, attentionTrainShape, type AttentionTrainConstants } from "./attention-train.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

const B = ATTENTION_TRAIN_BLOCK;
const STATS_WORKGROUP = 256;

export function attentionBackwardStatsKernel(c: AttentionTrainConstants): KernelSource {
  const { heads, kvHeads, headDim } = c;
  attentionTrainShape(c);
  return kernelSource({
    name: "attention_backward_stats",
    constants: { heads, kvHeads, headDim },
    storage: [
      { name: "dOut", access: "read", type: "array<f32>" },
      { name: "out", access: "read", type: "array<f32>" },
      { name: "lse", access: "read", type: "array<f32>" },
      { name: "stats", access: "read_write", type: "array<vec2<f32>>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
@compute @workgroup_size(${STATS_WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let item = ${LINEAR_GROUP} * ${STATS_WORKGROUP}u + lid;
  if (item >= params.rows * ${heads}u) { return; }
  let at = item * ${headDim}u;
  var delta = 0.0;
  for (var d = 0u; d < ${headDim}u; d++) { delta += dOut[at + d] * out[at + d]; }
  stats[item] = vec2<f32>(lse[item], delta);
}`,
    dispatch: { grid: { param: "rows", times: heads, per: STATS_WORKGROUP } },
  });
}

const BACKWARD_STORAGE = [
  { name: "q", access: "read", type: "array<f32>" },
  { name: "k", access: "read", type: "array<f32>" },
  { name: "v", access: "read", type: "array<f32>" },
  { name: "dOut", access: "read", type: "array<f32>" },
  { name: "stats", access: "read", type: "array<vec2<f32>>" },
  { name: "sequences", access: "read", type: "array<vec2<u32>>" },
] as const;

export function attentionBackwardQueryKernel(c: AttentionTrainConstants): KernelSource {
  const { heads, kvHeads, headDim } = c;
  const { group, qWidth, kvWidth, dimsPerLane, scale } = attentionTrainShape(c);
  return kernelSource({
    name: "attention_backward_query",
    constants: { heads, kvHeads, headDim },
    storage: [...BACKWARD_STORAGE, { name: "dQ", access: "read_write", type: "array<f32>" }],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
var<workgroup> query: array<f32, ${headDim}>;
var<workgroup> grad: array<f32, ${headDim}>;
var<workgroup> dScores: array<f32, ${B}>;

@compute @workgroup_size(${B})
fn main(${GROUP_BUILTINS}) {
  let item = ${LINEAR_GROUP};
  if (item >= params.rows * ${heads}u) { return; }
  let row = item / ${heads}u;
  let head = item % ${heads}u;
  let first = sequences[row].x;
  let kvOffset = (head / ${group}u) * ${headDim}u;
  let qAt = row * ${qWidth}u + head * ${headDim}u;
  for (var d = lid; d < ${headDim}u; d += ${B}u) {
    query[d] = q[qAt + d] * ${scale};
    grad[d] = dOut[qAt + d];
  }
  workgroupBarrier();

  var acc: array<f32, ${dimsPerLane}>;
  for (var start = first; start <= row; start += ${B}u) {
    let key = start + lid;
    var ds = 0.0;
    if (key <= row) {
      let kvAt = key * ${kvWidth}u + kvOffset;
      var s = 0.0;
      var dp = 0.0;
      for (var d = 0u; d < ${headDim}u; d++) {
        s += query[d] * k[kvAt + d];
        dp += grad[d] * v[kvAt + d];
      }
      let st = stats[item];
      ds = exp(s - st.x) * (dp - st.y);
    }
    dScores[lid] = ds;
    workgroupBarrier();
    let count = min(${B}u, row + 1u - start);
    for (var i = 0u; i < ${dimsPerLane}u; i++) {
      let d = lid + i * ${B}u;
      if (d < ${headDim}u) {
        var sum = acc[i];
        for (var j = 0u; j < count; j++) { sum += dScores[j] * k[(start + j) * ${kvWidth}u + kvOffset + d]; }
        acc[i] = sum;
      }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < ${dimsPerLane}u; i++) {
    let d = lid + i * ${B}u;
    if (d < ${headDim}u) { dQ[qAt + d] = acc[i] * ${scale}; }
  }
}`,
    dispatch: { grid: { param: "rows", times: heads } },
  });
}

export function attentionBackwardKeyValueKernel(c: AttentionTrainConstants): KernelSource {
  const { heads, kvHeads, headDim } = c;
  const { group, qWidth, kvWidth, dimsPerLane, scale } = attentionTrainShape(c);
  return kernelSource({
    name: "attention_backward_key_value",
    constants: { heads, kvHeads, headDim },
    storage: [
      ...BACKWARD_STORAGE,
      { name: "dK", access: "read_write", type: "array<f32>" },
      { name: "dV", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
var<workgroup> keyRow: array<f32, ${headDim}>;
var<workgroup> valueRow: array<f32, ${headDim}>;
var<workgroup> probs: array<f32, ${B}>;
var<workgroup> dScores: array<f32, ${B}>;

@compute @workgroup_size(${B})
fn main(${GROUP_BUILTINS}) {
  let item = ${LINEAR_GROUP};
  if (item >= params.rows * ${kvHeads}u) { return; }
  let key = item / ${kvHeads}u;
  let kvHead = item % ${kvHeads}u;
  let end = sequences[key].y;
  let kvAt = key * ${kvWidth}u + kvHead * ${headDim}u;
  for (var d = lid; d < ${headDim}u; d += ${B}u) {
    keyRow[d] = k[kvAt + d];
    valueRow[d] = v[kvAt + d];
  }
  workgroupBarrier();

  var accK: array<f32, ${dimsPerLane}>;
  var accV: array<f32, ${dimsPerLane}>;
  for (var member = 0u; member < ${group}u; member++) {
    let head = kvHead * ${group}u + member;
    for (var start = key; start < end; start += ${B}u) {
      let row = start + lid;
      var p = 0.0;
      var ds = 0.0;
      if (row < end) {
        let qAt = row * ${qWidth}u + head * ${headDim}u;
        var s = 0.0;
        var dp = 0.0;
        // The score as the forward sums it: (q_d * scale) * k_d in order of d.
        for (var d = 0u; d < ${headDim}u; d++) {
          s += (q[qAt + d] * ${scale}) * keyRow[d];
          dp += dOut[qAt + d] * valueRow[d];
        }
        let st = stats[row * ${heads}u + head];
        p = exp(s - st.x);
        ds = p * (dp - st.y);
      }
      probs[lid] = p;
      dScores[lid] = ds;
      workgroupBarrier();
      let count = min(${B}u, end - start);
      for (var i = 0u; i < ${dimsPerLane}u; i++) {
        let d = lid + i * ${B}u;
        if (d < ${headDim}u) {
          var sumK = accK[i];
          var sumV = accV[i];
          for (var j = 0u; j < count; j++) {
            let at = (start + j) * ${qWidth}u + head * ${headDim}u + d;
            sumK += dScores[j] * q[at];
            sumV += probs[j] * dOut[at];
          }
          accK[i] = sumK;
          accV[i] = sumV;
        }
      }
      workgroupBarrier();
    }
  }
  for (var i = 0u; i < ${dimsPerLane}u; i++) {
    let d = lid + i * ${B}u;
    if (d < ${headDim}u) {
      dK[kvAt + d] = accK[i] * ${scale};
      dV[kvAt + d] = accV[i];
    }
  }
}`,
    dispatch: { grid: { param: "rows", times: kvHeads } },
  });
}
