// Logit processing before sampling, on the device, one workgroup per row of logits: the server's
// penalties (repetition, frequency, presence), logit_bias and min_p. The raw logits stay as they are
// (logprobs are reported from them, as vLLM V1 does by default); the processed row goes to `work`,
// which the sampling kernel then reads instead.
//   bindings: logits (read, f32[rows, vocab]), info (read, AdjustRow[rows]), entries (read,
//             AdjustEntry[...]), work (read_write, f32[rows, vocab])
//   params:   rows
// A row's entries (entries[start .. start + count)) name distinct tokens, each with its transform
//   x' = (x > 0 ? x * mulPos : x * mulNeg) + add
// which holds the repetition penalty (mulPos = 1/r, mulNeg = r on tokens of the prompt or output),
// then -frequency * count - presence * [count > 0] and the bias (runtime/engine/logit-adjust.ts packs them). Then, with
// min_p > 0 and temperature > 0, every token whose probability is below min_p times the most likely
// one's, that is x' < max + T * ln(min_p), gets MASKED (weight exp(-huge) = 0 in the sampler).
//
// The chosen-logprob kernel: per row, log softmax(logits)[tokens[row]] of the raw logits (f32).
// Both keep row-wide reduced values in workgroup memory and re-read them (docs/drivers.md: Mesa 22.3).
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

export { ADJUST_ENTRY_WORDS, ADJUST_ROW_WORDS } from "../../runtime/gpu/layouts.ts";
/** The value a min_p-dropped token gets: finite (so the sampler's argmax start value stays below it) and far below any logit. */
export const MASKED = -3.0e38;

const WORKGROUP = 256;

export function logitAdjustKernel({ vocab }: { readonly vocab: number }): KernelSource {
  return kernelSource({
    name: "logit_adjust",
    constants: { vocab },
    storage: [
      { name: "logits", access: "read", type: "array<f32>" },
      { name: "info", access: "read", type: "array<AdjustRow>" },
      { name: "entries", access: "read", type: "array<AdjustEntry>" },
      { name: "work", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
struct AdjustRow { start: u32, count: u32, minP: f32, temperature: f32 }
struct AdjustEntry { token: u32, mulPos: f32, mulNeg: f32, add: f32 }

var<workgroup> maxes: array<f32, ${WORKGROUP}>;
var<workgroup> rowMax: f32;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  let base = row * ${vocab}u;
  let r = info[row];
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) { work[base + i] = logits[base + i]; }
  storageBarrier();
  workgroupBarrier();
  for (var e = lid; e < r.count; e += ${WORKGROUP}u) {
    let entry = entries[r.start + e];
    let at = base + entry.token;
    let x = work[at];
    work[at] = select(x * entry.mulNeg, x * entry.mulPos, x > 0.0) + entry.add;
  }
  storageBarrier();
  workgroupBarrier();
  if (r.minP <= 0.0 || r.temperature <= 0.0) { return; }
  var m = -3.4e38;
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) { m = max(m, work[base + i]); }
  maxes[lid] = m;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { maxes[lid] = max(maxes[lid], maxes[lid + stride]); }
  }
  workgroupBarrier();
  if (lid == 0u) { rowMax = maxes[0] + r.temperature * log(r.minP); }
  workgroupBarrier();
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) {
    if (work[base + i] < rowMax) { work[base + i] = ${MASKED}; }
  }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}

export function chosenLogprobKernel({ vocab }: { readonly vocab: number }): KernelSource {
  return kernelSource({
    name: "chosen_logprob",
    constants: { vocab },
    storage: [
      { name: "logits", access: "read", type: "array<f32>" },
      { name: "tokens", access: "read", type: "array<u32>" },
      { name: "out", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
var<workgroup> part: array<f32, ${WORKGROUP}>;
var<workgroup> rowMax: f32;
var<workgroup> rowSum: f32;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  let base = row * ${vocab}u;
  var m = -3.4e38;
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) { m = max(m, logits[base + i]); }
  part[lid] = m;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { part[lid] = max(part[lid], part[lid + stride]); }
  }
  workgroupBarrier();
  if (lid == 0u) { rowMax = part[0]; }
  workgroupBarrier();
  var s = 0.0;
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) { s += exp(logits[base + i] - rowMax); }
  part[lid] = s;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { part[lid] += part[lid + stride]; }
  }
  workgroupBarrier();
  if (lid == 0u) { rowSum = part[0]; }
  workgroupBarrier();
  if (lid == 0u) { out[row] = logits[base + tokens[row]] - rowMax - log(rowSum); }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}
