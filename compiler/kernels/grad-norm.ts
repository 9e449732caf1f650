// The global gradient norm over several flat f32 buffers and torch's clip_grad_norm_ factor, both left
// on the device: the optimizer kernels (optimizer.ts) read the factor, so a step needs no readback.
//   gradSquaresKernel: one dispatch per gradient buffer, in any order; buffer number `slot` writes the
//     sums of squares of its elements into partials[slot * 32 .. slot * 32 + 31], one per workgroup
//     (workgroup w takes elements w*256 + lid, stepping by 32*256, then a tree sum).
//     bindings: grad (read, f32[count]), partials (read_write, f32[buffers * NORM_PARTIALS_PER_BUFFER])
//     params:   count, slot;  dispatch: always 32 workgroups
//   gradClipKernel: one workgroup sums partials[0 .. partialCount) in a fixed order and writes
//     clip[0] = min(1, maxNorm / (norm + 1e-6)) (1 when maxNorm <= 0: no clipping) and clip[1] = norm,
//     norm = |gradScale| sqrt(sum of squares), the norm of the gradients the optimizer will see.
//     bindings: partials (read), clip (read_write, f32[2]);  params: partialCount, maxNorm, gradScale
// No atomics and a fixed summation order: the same gradients give bit-identical norms. clip[1] is there
// for logging (read it back when wanted); a non-finite norm propagates into the factor as in torch.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

/** Partial sums each gradient buffer writes (workgroups of gradSquaresKernel). */
export const NORM_PARTIALS_PER_BUFFER = 32;
const WORKGROUP = 256;

const TREE_SUM = /* wgsl */ `
var<workgroup> sums: array<f32, ${WORKGROUP}>;

fn treeSum(lid: u32, x: f32) -> f32 {
  sums[lid] = x;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { sums[lid] += sums[lid + stride]; }
  }
  workgroupBarrier();
  return sums[0];
}`;

export function gradSquaresKernel(): KernelSource {
  return kernelSource({
    name: "grad_squares",
    constants: { partials: NORM_PARTIALS_PER_BUFFER },
    storage: [
      { name: "grad", access: "read", type: "array<f32>" },
      { name: "partials", access: "read_write", type: "array<f32>" },
    ],
    params: [
      { name: "count", type: "u32" },
      { name: "slot", type: "u32" },
    ],
    body: /* wgsl */ `
${TREE_SUM}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let w = ${LINEAR_GROUP};
  var s = 0.0;
  for (var i = w * ${WORKGROUP}u + lid; i < params.count; i += ${NORM_PARTIALS_PER_BUFFER * WORKGROUP}u) {
    let g = grad[i];
    s += g * g;
  }
  let total = treeSum(lid, s);
  if (lid == 0u) { partials[params.slot * ${NORM_PARTIALS_PER_BUFFER}u + w] = total; }
}`,
    dispatch: { groups: [NORM_PARTIALS_PER_BUFFER, 1, 1] },
  });
}

export function gradClipKernel(): KernelSource {
  return kernelSource({
    name: "grad_clip",
    constants: {},
    storage: [
      { name: "partials", access: "read", type: "array<f32>" },
      { name: "clip", access: "read_write", type: "array<f32>" },
    ],
    params: [
      { name: "partialCount", type: "u32" },
      { name: "maxNorm", type: "f32" },
      { name: "gradScale", type: "f32" },
    ],
    body: /* wgsl */ `
${TREE_SUM}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  var s = 0.0;
  for (var i = lid; i < params.partialCount; i += ${WORKGROUP}u) { s += partials[i]; }
  let total = treeSum(lid, s);
  if (lid == 0u) {
    let norm = abs(params.gradScale) * sqrt(total);
    var factor = 1.0;
    if (params.maxNorm > 0.0) { factor = min(1.0, params.maxNorm / (norm + 1e-6)); }
    clip[0] = factor;
    clip[1] = norm;
  }
}`,
    dispatch: { groups: [1, 1, 1] },
  });
}
