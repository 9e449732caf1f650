// Input gradient of RMSNorm (rmsnorm.ts) with its weight frozen: dx (+)= w dy r - x r^3 mean(x w dy).
//   bindings: x (read, f32[rows, hidden]), weight (read, f32[hidden]), dy (read, f32[rows, hidden]),
//             dx (read_write, f32[rows, hidden])
//   params:   rows
// With `accumulate`, dx += the gradient: the norm's input is the residual stream, whose gradient
// already holds the later layers' part.
//
// Derivation, per row of H values: y_i = x_i r w_i with r = (m + eps)^(-1/2), m = (1/H) sum_j x_j^2.
//   dr/dx_j = -1/2 (m + eps)^(-3/2) * 2 x_j / H = -r^3 x_j / H
//   dL/dx_j = sum_i dy_i dy_i/dx_j = sum_i dy_i w_i (delta_ij r + x_i dr/dx_j)
//           = w_j dy_j r - x_j r^3 (1/H) sum_i x_i w_i dy_i
// r is recomputed from x (one extra reduction, no buffer saved by the forward).
// One workgroup per row: both sums in one pass, reduced together as vec2 in workgroup memory; the
// reduced sums are read from workgroup memory where used (docs/drivers.md, Mesa 22.3).
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, kernelSource } from "./wgsl.ts";

export interface RmsNormBackwardConstants {
  readonly hidden: number;
  readonly eps: number;
  readonly accumulate: boolean;
}

const WORKGROUP = 256;

export function rmsNormInputGradKernel({ hidden, eps, accumulate }: RmsNormBackwardConstants): KernelSource {
  if (!Number.isInteger(hidden) || hidden < 1) throw new Error(`RMSNorm backward: hidden must be a positive integer, got ${hidden}`);
  return kernelSource({
    name: "rmsnorm_dx",
    constants: { hidden, eps, accumulate },
    storage: [
      { name: "x", access: "read", type: "array<f32>" },
      { name: "weight", access: "read", type: "array<f32>" },
      { name: "dy", access: "read", type: "array<f32>" },
      { name: "dx", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
// (sum x^2, sum x w dy)
var<workgroup> partial: array<vec2<f32>, ${WORKGROUP}>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  let base = row * ${hidden}u;
  var sums = vec2<f32>(0.0);
  for (var c = lid; c < ${hidden}u; c += ${WORKGROUP}u) {
    let v = x[base + c];
    sums += vec2<f32>(v * v, v * weight[c] * dy[base + c]);
  }
  partial[lid] = sums;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { partial[lid] += partial[lid + stride]; }
  }
  workgroupBarrier();
  for (var c = lid; c < ${hidden}u; c += ${WORKGROUP}u) {
    let total = partial[0];
    let r = inverseSqrt(total.x / ${f32Literal(hidden)} + ${f32Literal(eps)});
    let g = weight[c] * dy[base + c] * r - x[base + c] * (r * r * r) * (total.y / ${f32Literal(hidden)});
    dx[base + c] = g${accumulate ? " + dx[base + c]" : ""};
  }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}
