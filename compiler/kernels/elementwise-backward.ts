// Backward of the elementwise kernels (elementwise.ts), over `n` f32 values.
//   swiglu_backward: act = silu(gate) * up  =>  dGate = dAct * up * silu'(gate), dUp = dAct * silu(gate),
//     silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
//     bindings gate (read), up (read), dAct (read), dGate (read_write), dUp (read_write); params n.
//     With `inPlace`: gate (read_write), up (read_write), dAct (read), and gate, up are overwritten with
//     dGate, dUp (each invocation reads its element of both before writing), so training holds no
//     second pair of [rows, intermediate] buffers.
//   swiglu_backward_sum (per_ffn, one feed-forward pass of several): as swiglu_backward, and also
//     sumGate = (first ? 0 : sumGate) + dGate, sumUp likewise, the passes' gradients summed for one
//     base input-gradient product each. bindings gate, up, dAct (read), dGate, dUp, sumGate, sumUp
//     (read_write); params n, first.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource, type StorageDecl } from "./wgsl.ts";

const WORKGROUP = 256;

function elementwise(name: string, constants: Record<string, boolean>, storage: readonly StorageDecl[], body: string, helpers = ""): KernelSource {
  return kernelSource({
    name,
    constants,
    storage,
    params: [{ name: "n", type: "u32" }],
    body: /* wgsl */ `${helpers}
@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.n) { return; }
  ${body}
}`,
    dispatch: { grid: { param: "n", per: WORKGROUP } },
  });
}

// sigmoid(g) and 1 - sigmoid(g), each from exp of a non-positive argument (no overflow, and 1 - s
// keeps its precision for large g instead of cancelling to 0).
const SIGMOIDS = /* wgsl */ `
fn sigmoids(g: f32) -> vec2<f32> {
  let e = exp(-abs(g));
  let small = e / (1.0 + e);
  let large = 1.0 / (1.0 + e);
  return select(vec2<f32>(small, large), vec2<f32>(large, small), g >= 0.0);
}`;

export interface SwigluBackwardConstants {
  /** Overwrite gate and up with their gradients instead of writing dGate and dUp. */
  readonly inPlace: boolean;
}

export function swigluBackwardKernel({ inPlace }: SwigluBackwardConstants): KernelSource {
  const input = inPlace ? "read_write" : "read";
  const storage: StorageDecl[] = [
    { name: "gate", access: input, type: "array<f32>" },
    { name: "up", access: input, type: "array<f32>" },
    { name: "dAct", access: "read", type: "array<f32>" },
  ];
  if (!inPlace)
    storage.push({ name: "dGate", access: "read_write", type: "array<f32>" }, { name: "dUp", access: "read_write", type: "array<f32>" });
  return elementwise(
    "swiglu_backward",
    { inPlace },
    storage,
    /* wgsl */ `let g = gate[i];
  let u = up[i];
  let d = dAct[i];
  let s = sigmoids(g);
  ${inPlace ? "gate" : "dGate"}[i] = d * u * s.x * (1.0 + g * s.y);
  ${inPlace ? "up" : "dUp"}[i] = d * g * s.x;`,
    SIGMOIDS,
  );
}

export function swigluBackwardSumKernel(): KernelSource {
  return kernelSource({
    name: "swiglu_backward_sum",
    constants: {},
    storage: [
      { name: "gate", access: "read", type: "array<f32>" },
      { name: "up", access: "read", type: "array<f32>" },
      { name: "dAct", access: "read", type: "array<f32>" },
      { name: "dGate", access: "read_write", type: "array<f32>" },
      { name: "dUp", access: "read_write", type: "array<f32>" },
      { name: "sumGate", access: "read_write", type: "array<f32>" },
      { name: "sumUp", access: "read_write", type: "array<f32>" },
    ],
    params: [
      { name: "n", type: "u32" },
      { name: "first", type: "u32" },
    ],
    body: /* wgsl */ `${SIGMOIDS}
@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.n) { return; }
  let g = gate[i];
  let u = up[i];
  let d = dAct[i];
  let s = sigmoids(g);
  let dg = d * u * s.x * (1.0 + g * s.y);
  let du = d * g * s.x;
  dGate[i] = dg;
  dUp[i] = du;
  sumGate[i] = select(sumGate[i] + dg, dg, params.first != 0u);
  sumUp[i] = select(sumUp[i] + du, du, params.first != 0u);
}`,
    dispatch: { grid: { param: "n", per: WORKGROUP } },
  });
}
