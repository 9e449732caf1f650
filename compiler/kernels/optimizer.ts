// Optimizer steps over flat f32 parameter buffers, one invocation per element. Both read the gradient
// as g = grad * gradScale * scale[0]: gradScale is a per-dispatch param (e.g. 1 / micro-batches) and
// scale[0] the clip factor that gradClipKernel (grad-norm.ts) leaves on the device, so clipping needs no
// readback; bind a buffer holding 1 to train without clipping.
//   adamwKernel (torch.optim.AdamW, amsgrad off):
//     p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
//     p <- p - lr (m / bc1) / (sqrt(v / bc2) + eps),  bc1 = 1 - b1^t, bc2 = 1 - b2^t (t from 1)
//     bindings: param (read_write), grad (read), m (read_write), v (read_write) (f32[count] each),
//               scale (read, f32[>= 1])
//     params:   count, decay = 1 - lr wd, beta1, oneMinusBeta1, beta2, oneMinusBeta2,
//               stepSize = lr / bc1, sqrtBiasCorrection2 = sqrt(bc2), eps, gradScale
//     adamwParams computes them from (lr, betas, eps, wd, step t) in float64, as torch computes its
//     Python-float scalars: 1 - beta2 formed in f32 from f32(0.999) would be 1.3e-5 off.
//   sgdKernel (momentum 0, no weight decay): p <- p - lr g
//     bindings: param (read_write), grad (read), scale (read);  params: count, lr, gradScale
// m and v start at zero. Grid of ceil(count / 256) workgroups.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

const WORKGROUP = 256;

export interface AdamWSettings {
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
}

/** The params of adamwKernel for step `step` (1 for the first update) of a buffer of `count` elements. */
export function adamwParams(s: AdamWSettings, step: number, count: number, gradScale = 1): Record<string, number> {
  if (!Number.isInteger(step) || step < 1) throw new Error(`adamw: step must be an integer from 1, got ${step}`);
  const biasCorrection1 = 1 - s.beta1 ** step;
  const biasCorrection2 = 1 - s.beta2 ** step;
  return {
    count,
    decay: 1 - s.lr * s.weightDecay,
    beta1: s.beta1,
    oneMinusBeta1: 1 - s.beta1,
    beta2: s.beta2,
    oneMinusBeta2: 1 - s.beta2,
    stepSize: s.lr / biasCorrection1,
    sqrtBiasCorrection2: Math.sqrt(biasCorrection2),
    eps: s.eps,
    gradScale,
  };
}

export function adamwKernel(): KernelSource {
  return kernelSource({
    name: "adamw",
    constants: {},
    storage: [
      { name: "param", access: "read_write", type: "array<f32>" },
      { name: "grad", access: "read", type: "array<f32>" },
      { name: "m", access: "read_write", type: "array<f32>" },
      { name: "v", access: "read_write", type: "array<f32>" },
      { name: "scale", access: "read", type: "array<f32>" },
    ],
    params: [
      { name: "count", type: "u32" },
      { name: "decay", type: "f32" },
      { name: "beta1", type: "f32" },
      { name: "oneMinusBeta1", type: "f32" },
      { name: "beta2", type: "f32" },
      { name: "oneMinusBeta2", type: "f32" },
      { name: "stepSize", type: "f32" },
      { name: "sqrtBiasCorrection2", type: "f32" },
      { name: "eps", type: "f32" },
      { name: "gradScale", type: "f32" },
    ],
    body: /* wgsl */ `
@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.count) { return; }
  let g = grad[i] * (params.gradScale * scale[0]);
  let m1 = params.beta1 * m[i] + params.oneMinusBeta1 * g;
  let v1 = params.beta2 * v[i] + params.oneMinusBeta2 * (g * g);
  m[i] = m1;
  v[i] = v1;
  param[i] = param[i] * params.decay - params.stepSize * m1 / (sqrt(v1) / params.sqrtBiasCorrection2 + params.eps);
}`,
    dispatch: { grid: { param: "count", per: WORKGROUP } },
  });
}

export function sgdKernel(): KernelSource {
  return kernelSource({
    name: "sgd",
    constants: {},
    storage: [
      { name: "param", access: "read_write", type: "array<f32>" },
      { name: "grad", access: "read", type: "array<f32>" },
      { name: "scale", access: "read", type: "array<f32>" },
    ],
    params: [
      { name: "count", type: "u32" },
      { name: "lr", type: "f32" },
      { name: "gradScale", type: "f32" },
    ],
    body: /* wgsl */ `
@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.count) { return; }
  param[i] = param[i] - params.lr * (grad[i] * (params.gradScale * scale[0]));
}`,
    dispatch: { grid: { param: "count", per: WORKGROUP } },
  });
}
