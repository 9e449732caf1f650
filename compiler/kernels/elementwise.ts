// Elementwise kernels over `n` f32 values.
//   swiglu: bindings gate (read), up (read), out (read_write); params n.  out = silu(gate) * up
// (out may not alias an input: WebGPU forbids one buffer bound as read and read_write in a dispatch.)
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

const WORKGROUP = 256;

function elementwise(name: string, inputs: readonly [string, string], expression: string, helpers = ""): KernelSource {
  return kernelSource({
    name,
    constants: {},
    storage: [
      { name: inputs[0], access: "read", type: "array<f32>" },
      { name: inputs[1], access: "read", type: "array<f32>" },
      { name: "out", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "n", type: "u32" }],
    body: /* wgsl */ `${helpers}
@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.n) { return; }
  out[i] = ${expression};
}`,
    dispatch: { grid: { param: "n", per: WORKGROUP } },
  });
}

// exp of a non-positive argument only, so neither branch overflows for large |x|.
const SILU = /* wgsl */ `
fn silu(x: f32) -> f32 {
  let e = exp(-abs(x));
  return x * select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
}`;

export function swigluKernel(): KernelSource {
  return elementwise("swiglu", ["gate", "up"], "silu(gate[i]) * up[i]", SILU);
}
