// Causal attention against the KV cache, for prefill and decode rows alike.
// Row r is a query token of the sequence in slot rowSlot[r] at position positions[r]; for each head h it
// attends over that slot's cached positions 0..positions[r] (itself included, so the KV write runs first)
// with KV head h / (heads / kvHeads) (grouped-query attention) and scale 1/sqrt(headDim). With a sliding
// `window` (mistral) only positions p - window < j <= p are attended, as transformers' sliding-window mask;
// the cache keeps every position (a full cache, masked), so beam forks and chunked prefill need nothing new.
//   bindings: q (read, f32[rows, heads*headDim]), kCache (read), vCache (read) (f32[slots, maxPositions,
//             kvHeads, headDim]), rowSlot (read, u32[rows]), positions (read, u32[rows]),
//             out (read_write, f32[rows, heads*headDim])
//   params:   rows
// One workgroup per (row, head). Keys are streamed in blocks of 64, one key per invocation; the softmax is
// online (running max and rescaled sums), so any context length fits in fixed workgroup memory.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, kernelSource } from "./wgsl.ts";

export interface AttentionConstants {
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly maxPositions: number;
  /** Mistral's sliding_window: keys attended per query, itself included; absent for all before it. */
  readonly window?: number;
}

const BLOCK = 64; // keys per block = invocations per workgroup
// Stands in for -infinity, which WGSL cannot spell; exp(NEG_INF - m) is exactly 0.
const NEG_INF = "-3.0e38";

export function attentionKernel({ heads, kvHeads, headDim, maxPositions, window }: AttentionConstants): KernelSource {
  if (heads % kvHeads !== 0) throw new Error(`attention: heads ${heads} not divisible by kv_heads ${kvHeads}`);
  const group = heads / kvHeads;
  const kvWidth = kvHeads * headDim;
  const dimsPerLane = Math.ceil(headDim / BLOCK);
  return kernelSource({
    name: "attention",
    constants: { heads, kvHeads, headDim, maxPositions, ...(window === undefined ? {} : { window }) },
    storage: [
      { name: "q", access: "read", type: "array<f32>" },
      { name: "kCache", access: "read", type: "array<f32>" },
      { name: "vCache", access: "read", type: "array<f32>" },
      { name: "rowSlot", access: "read", type: "array<u32>" },
      { name: "positions", access: "read", type: "array<u32>" },
      { name: "out", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
var<workgroup> query: array<f32, ${headDim}>;
var<workgroup> weights: array<f32, ${BLOCK}>;
var<workgroup> reduce: array<f32, ${BLOCK}>;

@compute @workgroup_size(${BLOCK})
fn main(${GROUP_BUILTINS}) {
  let item = ${LINEAR_GROUP};
  if (item >= params.rows * ${heads}u) { return; }
  let row = item / ${heads}u;
  let head = item % ${heads}u;
  let last = min(positions[row], ${maxPositions - 1}u);
  let cache = rowSlot[row] * ${maxPositions * kvWidth}u + (head / ${group}u) * ${headDim}u;
  let qAt = row * ${heads * headDim}u + head * ${headDim}u;
  for (var d = lid; d < ${headDim}u; d += ${BLOCK}u) { query[d] = q[qAt + d] * ${f32Literal(1 / Math.sqrt(headDim))}; }
  workgroupBarrier();

  var runningMax = ${NEG_INF};
  var laneSum = 0.0; // this lane's share of the softmax denominator, kept at the running max's scale
  var acc: array<f32, ${dimsPerLane}>;
  let first = ${window === undefined ? "0u" : `select(0u, last + 1u - ${window}u, last + 1u > ${window}u)`};
  for (var start = first; start <= last; start += ${BLOCK}u) {
    let key = start + lid;
    var score = ${NEG_INF};
    if (key <= last) {
      let k = cache + key * ${kvWidth}u;
      score = 0.0;
      for (var d = 0u; d < ${headDim}u; d++) { score += query[d] * kCache[k + d]; }
    }
    reduce[lid] = score;
    for (var stride = ${BLOCK / 2}u; stride > 0u; stride /= 2u) {
      workgroupBarrier();
      if (lid < stride) { reduce[lid] = max(reduce[lid], reduce[lid + stride]); }
    }
    workgroupBarrier();
    let newMax = max(runningMax, reduce[0]);
    let rescale = exp(runningMax - newMax);
    let weight = select(0.0, exp(score - newMax), key <= last);
    runningMax = newMax;
    laneSum = laneSum * rescale + weight;
    weights[lid] = weight;
    workgroupBarrier();
    let count = min(${BLOCK}u, last + 1u - start);
    for (var i = 0u; i < ${dimsPerLane}u; i++) {
      let d = lid + i * ${BLOCK}u;
      if (d < ${headDim}u) {
        var sum = acc[i] * rescale;
        for (var j = 0u; j < count; j++) { sum += weights[j] * vCache[cache + (start + j) * ${kvWidth}u + d]; }
        acc[i] = sum;
      }
    }
    workgroupBarrier();
  }

  reduce[lid] = laneSum;
  for (var stride = ${BLOCK / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { reduce[lid] += reduce[lid + stride]; }
  }
  workgroupBarrier();
  let total = reduce[0];
  for (var i = 0u; i < ${dimsPerLane}u; i++) {
    let d = lid + i * ${BLOCK}u;
    if (d < ${headDim}u) { out[qAt + d] = acc[i] / total; }
  }
}`,
    dispatch: { grid: { param: "rows", times: heads } },
  });
}
