// RMSNorm: out[r, :] = x[r, :] * inverseSqrt(mean(x[r, :]^2) + eps) * (offset + weight), offset 0 but for
// gemma, whose checkpoints store its norm weights less one (transformers' GemmaRMSNorm).
//   bindings: x (read, f32[rows, hidden]), weight (read, f32[hidden]), out (read_write, f32[rows, hidden])
//   params:   rows
// One workgroup per row: each invocation sums a strided slice, then a tree reduction in workgroup memory.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, kernelSource } from "./wgsl.ts";

export interface RmsNormConstants {
  readonly hidden: number;
  readonly eps: number;
  /** 1 for gemma's (1 + weight); absent for 0, so the other families' kernel keys stay as they were. */
  readonly offset?: 1;
}

const WORKGROUP = 256;

export function rmsNormKernel({ hidden, eps, offset }: RmsNormConstants): KernelSource {
  return kernelSource({
    name: "rmsnorm",
    constants: { hidden, eps, ...(offset ? { offset } : {}) },
    storage: [
      { name: "x", access: "read", type: "array<f32>" },
      { name: "weight", access: "read", type: "array<f32>" },
      { name: "out", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
var<workgroup> partial: array<f32, ${WORKGROUP}>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  let base = row * ${hidden}u;
  var sum = 0.0;
  for (var c = lid; c < ${hidden}u; c += ${WORKGROUP}u) {
    let v = x[base + c];
    sum += v * v;
  }
  partial[lid] = sum;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { partial[lid] += partial[lid + stride]; }
  }
  workgroupBarrier();
  let scale = inverseSqrt(partial[0] / ${f32Literal(hidden)} + ${f32Literal(eps)});
  for (var c = lid; c < ${hidden}u; c += ${WORKGROUP}u) {
    out[base + c] = x[base + c] * scale * ${offset ? "(1.0 + weight[c])" : "weight[c]"};
  }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}
