// Elementwise kernels over `n` f32 values.
//   swiglu: bindings gate (read), up (read), out (read_write); params n.  out = silu(gate) * up
//   geglu:  bindings gate (read), up (read), out (read_write); params n.  out = gelu_tanh(gate) * up
//   scale:  bindings x (read_write); params n.                               x = factor * x
//   bias:   bindings bias (read, f32[width]), y (read_write, f32[n / width, width]); params n.  y[r, c] += bias[c]
// (out may not alias an input: WebGPU forbids one buffer bound as read and read_write in a dispatch.)
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, kernelSource } from "./wgsl.ts";

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

// transformers' gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh written as
// 1 - 2 / (exp(2u) + 1) on a clamped u, since WGSL's tanh may overflow inside exp on some drivers.
const GELU_TANH = /* wgsl */ `
fn gelu_tanh(x: f32) -> f32 {
  let u = clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0, 15.0);
  return 0.5 * x * (2.0 - 2.0 / (exp(2.0 * u) + 1.0));
}`;

export function gegluKernel(): KernelSource {
  return elementwise("geglu", ["gate", "up"], "gelu_tanh(gate[i]) * up[i]", GELU_TANH);
}

/** One in-place update `out` of `target` per element i < n, reading the other `inputs` (read only). */
function inPlace(name: string, constants: Record<string, number>, target: string, inputs: readonly string[], update: string): KernelSource {
  return kernelSource({
    name,
    constants,
    storage: [...inputs.map((n) => ({ name: n, access: "read" as const, type: "array<f32>" })), { name: target, access: "read_write", type: "array<f32>" }],
    params: [{ name: "n", type: "u32" }],
    body: /* wgsl */ `
@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.n) { return; }
  ${target}[i] = ${update};
}`,
    dispatch: { grid: { param: "n", per: WORKGROUP } },
  });
}

/** x *= factor in place: gemma's sqrt(hidden_size) on the embedding rows. */
export function scaleKernel({ factor }: { readonly factor: number }): KernelSource {
  return inPlace("scale", { factor }, "x", [], `x[i] * ${f32Literal(factor)}`);
}

/** A linear module's bias added to its output rows in place (qwen2's q, k and v). */
export function biasKernel({ width }: { readonly width: number }): KernelSource {
  return inPlace("bias", { width }, "y", ["bias"], `y[i] + bias[i % ${width}u]`);
}
