// LoRA dropout as PEFT applies it while training: the LoRA branch reads dropout(x), each module with its
// own mask, inverted (kept values scaled by 1 / (1 - p)). The mask is a counter-based hash of
// (stream, element index), so it is never stored: the backward regenerates it.
//   dropout:       out[i] = keep(i) ? x[i] * scale : 0
//     bindings: x (read), out (read_write);  params: n, stream, threshold, scale
//   dropout_grad:  acc[i] += keep(i) ? g[i] * scale : 0, then g[i] = 0 (consumed, so the buffer is zero
//                  for its next use within the same submit)
//     bindings: g (read_write), acc (read_write);  params: n, stream, threshold, scale
// keep(i) is pcg(stream ^ pcg(i)) >= threshold with threshold = round(p * 2^32), stream a 32-bit value the
// trainer derives from (seed, step, micro-batch, layer, module). Grid of ceil(n / 256) workgroups.
import type { KernelSource } from "./kernel.ts";
import { PCG_WGSL } from "./sampling.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource, type StorageDecl } from "./wgsl.ts";

const WORKGROUP = 256;

/** The params of both kernels for drop probability `p` on `n` elements of mask stream `stream`. */
export function dropoutParams(p: number, n: number, stream: number): Record<string, number> {
  if (!(p >= 0 && p < 1)) throw new Error(`dropout: p must be in [0, 1), got ${p}`);
  return { n, stream: stream >>> 0, threshold: Math.min(0xffffffff, Math.round(p * 2 ** 32)), scale: 1 / (1 - p) };
}

const PARAMS = [
  { name: "n", type: "u32" },
  { name: "stream", type: "u32" },
  { name: "threshold", type: "u32" },
  { name: "scale", type: "f32" },
] as const;

const KEEP = /* wgsl */ `
${PCG_WGSL}

fn keep(i: u32) -> bool {
  return pcg(params.stream ^ pcg(i)) >= params.threshold;
}`;

/** An elementwise kernel over n values with the mask in scope: `body` is the statement for element i. */
function masked(name: string, storage: readonly StorageDecl[], body: string): KernelSource {
  return kernelSource({
    name,
    constants: {},
    storage,
    params: PARAMS,
    body: /* wgsl */ `
${KEEP}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.n) { return; }
  ${body}
}`,
    dispatch: { grid: { param: "n", per: WORKGROUP } },
  });
}

export function dropoutKernel(): KernelSource {
  return masked(
    "dropout",
    [
      { name: "x", access: "read", type: "array<f32>" },
      { name: "out", access: "read_write", type: "array<f32>" },
    ],
    "out[i] = select(0.0, x[i] * params.scale, keep(i));",
  );
}

export function dropoutGradKernel(): KernelSource {
  return masked(
    "dropout_grad",
    [
      { name: "g", access: "read_write", type: "array<f32>" },
      { name: "acc", access: "read_write", type: "array<f32>" },
    ],
    "if (keep(i)) { acc[i] += g[i] * params.scale; }\n  g[i] = 0.0;",
  );
}
