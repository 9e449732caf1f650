// Fused log-softmax and cross-entropy over the vocabulary, the loss of `milora train`, overwriting the
// logits with their gradient so that no second [rows, vocab] buffer exists:
//   loss[r]      = -log softmax(logits[r])[label[r]]                    (0 when unsupervised)
//   logits[r, v] = (softmax(logits[r])[v] - [v == label[r]]) * lossScale  (0 when unsupervised)
// i.e. the gradient of lossScale * sum of the rows' losses (lossScale = 1 / supervised tokens gives
// the mean). A label of IGNORE_LABEL (Hugging Face's -100) marks an unsupervised row; any other label
// >= vocab is a caller's bug and makes the row's loss and gradient NaN so that it cannot go unseen.
//   bindings: logits (read_write, f32[rows, vocab]), labels (read, u32[rows]), loss (read_write, f32[rows])
//   params:   rows, lossScale (f32)
// One workgroup per row: a max reduction, then a sum of exp(l - max) over the other tokens, then the
// gradient pass. The row's max, sums and label logit live in workgroup variables and are re-read at each
// use: on Mesa 22.3 llvmpipe a reduced value held in a register across later barriers is corrupted
// (docs/drivers.md). Accuracy where the label is nearly certain (p -> 1), which training drives towards:
// the label's gradient is -(sum over the other tokens) / sum, not p - 1, and the loss is log1p(others)
// when the label holds the max, not log(sum) - 0; both keep their relative precision as the loss -> 0.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

/** `labels` value of a row without a target (the prompt tokens). */
export const IGNORE_LABEL = 0xffffffff;

export interface CrossEntropyConstants {
  readonly vocab: number;
}

const WORKGROUP = 256;

export function crossEntropyKernel({ vocab }: CrossEntropyConstants): KernelSource {
  if (!Number.isInteger(vocab) || vocab < 1) throw new Error(`cross-entropy: vocab must be a positive integer, got ${vocab}`);
  return kernelSource({
    name: "cross_entropy",
    constants: { vocab },
    storage: [
      { name: "logits", access: "read_write", type: "array<f32>" },
      { name: "labels", access: "read", type: "array<u32>" },
      { name: "loss", access: "read_write", type: "array<f32>" },
    ],
    params: [
      { name: "rows", type: "u32" },
      { name: "lossScale", type: "f32" },
    ],
    body: /* wgsl */ `
const IGNORE_LABEL = 0xffffffffu;

var<workgroup> partial: array<f32, ${WORKGROUP}>;
var<workgroup> rowMax: f32;
var<workgroup> labelLogit: f32;
var<workgroup> others: f32; // sum of exp(l - max) over the tokens other than the label
var<workgroup> total: f32; // others + exp(labelLogit - max)

// log(1 + x) for x >= 0 without losing a small x to the rounding of 1 + x: the alternating series to
// x^8 below 0.1 (truncation < x^9 / 9 relative), log(1 + x) above. (The log(u) x / (u - 1) trick needs
// a log accurate in relative terms near 1, which llvmpipe's is not: 2e-2 off at x = 1.5e-6.)
fn log1p(x: f32) -> f32 {
  if (x >= 0.1) { return log(1.0 + x); }
  return x * (1.0 - x * (0.5 - x * (1.0 / 3.0 - x * (0.25 - x * (0.2 - x * (1.0 / 6.0 - x * (1.0 / 7.0 - x * 0.125)))))));
}

// Tree reduction of partial into partial[0], by max or by sum; called in uniform control flow.
fn reduce(lid: u32, combineMax: bool) {
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) {
      let other = partial[lid + stride];
      partial[lid] = select(partial[lid] + other, max(partial[lid], other), combineMax);
    }
  }
  workgroupBarrier();
}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  let base = row * ${vocab}u;
  let label = labels[row];
  if (label == IGNORE_LABEL || label >= ${vocab}u) {
    // NaN from the label's bits (exponent all ones, mantissa non-zero) for a label out of range.
    let fill = select(0.0, bitcast<f32>(label | 0x7fc00000u), label != IGNORE_LABEL);
    for (var c = lid; c < ${vocab}u; c += ${WORKGROUP}u) { logits[base + c] = fill; }
    if (lid == 0u) { loss[row] = fill; }
    return;
  }

  var m = bitcast<f32>(0xff7fffffu); // the lowest finite f32
  for (var c = lid; c < ${vocab}u; c += ${WORKGROUP}u) { m = max(m, logits[base + c]); }
  partial[lid] = m;
  reduce(lid, true);
  if (lid == 0u) {
    rowMax = partial[0];
    labelLogit = logits[base + label];
  }
  workgroupBarrier();

  var s = 0.0;
  for (var c = lid; c < ${vocab}u; c += ${WORKGROUP}u) {
    if (c != label) { s += exp(logits[base + c] - rowMax); }
  }
  partial[lid] = s;
  reduce(lid, false);
  if (lid == 0u) {
    others = partial[0];
    total = others + exp(labelLogit - rowMax);
    loss[row] = select(log(total) + (rowMax - labelLogit), log1p(others), labelLogit >= rowMax);
  }
  workgroupBarrier();

  for (var c = lid; c < ${vocab}u; c += ${WORKGROUP}u) {
    let at = base + c;
    var g = -others / total;
    if (c != label) { g = exp(logits[at] - rowMax) / total; }
    logits[at] = g * params.lossScale;
  }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}
