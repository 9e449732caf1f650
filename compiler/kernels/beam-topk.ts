// Beam search's candidates on the device, one workgroup per row of logits: the row's log-softmax
// (x - max - log sum exp(x - max), in f32) and its `k` most likely tokens with their log-probabilities,
// largest first, ties to the lower token id.
//   bindings: logits (read, f32[rows, vocab]), candidates (read_write, Candidate[rows, k]: token u32,
//             logprob f32)
//   params:   rows, k (1..MAX_BEAM_CANDIDATES, at most vocab)
// The k picks are k passes over the row: pass j takes the largest (logit, -index) strictly below pick
// j-1 in that order, so no sort and no per-token marks are needed; k is small (2 * beams, or
// (1 + eos ids) * beams), so k passes cost about what the sampling kernel's bit searches cost.
// test/compiler/kernels/beam-topk.test.ts checks it against a float64 log-softmax.
import type { KernelSource } from "./kernel.ts";
import { MAX_BEAM_CANDIDATES } from "../../runtime/gpu/layouts.ts";

export { BEAM_CANDIDATE_WORDS, MAX_BEAM_CANDIDATES } from "../../runtime/gpu/layouts.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

const WORKGROUP = 256;
const NONE = "0xffffffffu";

export function beamTopKKernel({ vocab }: { readonly vocab: number }): KernelSource {
  return kernelSource({
    name: "beam_topk",
    constants: { vocab },
    storage: [
      { name: "logits", access: "read", type: "array<f32>" },
      { name: "candidates", access: "read_write", type: "array<Candidate>" },
    ],
    params: [
      { name: "rows", type: "u32" },
      { name: "k", type: "u32" },
    ],
    body: /* wgsl */ `
struct Candidate { token: u32, logprob: f32 }

var<workgroup> values: array<f32, ${WORKGROUP}>;
var<workgroup> indices: array<u32, ${WORKGROUP}>;
// Row-wide values found by a reduction stay in workgroup memory and are re-read at each use (Mesa 22.3's
// llvmpipe corrupts later reductions when a reduced value is held in a register; see sampling.ts).
var<workgroup> rowTop: f32;
var<workgroup> rowLogSum: f32;
var<workgroup> prevValue: f32;
var<workgroup> prevIndex: u32;

// Whether (x, i) comes before (y, j) in the order largest logit first, lower index first on ties.
fn before(x: f32, i: u32, y: f32, j: u32) -> bool {
  return x > y || (x == y && i < j);
}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  let base = row * ${vocab}u;

  var top = -3.4e38;
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) { top = max(top, logits[base + i]); }
  values[lid] = top;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { values[lid] = max(values[lid], values[lid + stride]); }
  }
  workgroupBarrier();
  if (lid == 0u) { rowTop = values[0]; }
  workgroupBarrier();

  var sum = 0.0;
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) { sum += exp(logits[base + i] - rowTop); }
  values[lid] = sum;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { values[lid] += values[lid + stride]; }
  }
  workgroupBarrier();
  if (lid == 0u) {
    rowLogSum = log(values[0]);
    prevValue = 3.4e38;
    prevIndex = ${NONE};
  }
  workgroupBarrier();

  for (var j = 0u; j < min(params.k, ${MAX_BEAM_CANDIDATES}u); j++) {
    // Each lane's best element after the previous pick, then a tree merge in the same order.
    var best = -3.4e38;
    var bestAt = ${NONE};
    let pv = prevValue;
    let pi = prevIndex;
    for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) {
      let x = logits[base + i];
      let after = pi == ${NONE} || before(pv, pi, x, i);
      if (after && (bestAt == ${NONE} || before(x, i, best, bestAt))) { best = x; bestAt = i; }
    }
    values[lid] = best;
    indices[lid] = bestAt;
    for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
      workgroupBarrier();
      if (lid < stride) {
        let x = values[lid + stride];
        let at = indices[lid + stride];
        if (at != ${NONE} && (indices[lid] == ${NONE} || before(x, at, values[lid], indices[lid]))) {
          values[lid] = x;
          indices[lid] = at;
        }
      }
    }
    workgroupBarrier();
    if (lid == 0u) {
      let at = indices[0];
      let x = values[0];
      candidates[row * params.k + j] = Candidate(at, (x - rowTop) - rowLogSum);
      prevValue = x;
      prevIndex = at;
    }
    workgroupBarrier();
  }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}
