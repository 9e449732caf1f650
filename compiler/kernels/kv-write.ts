// KV cache write: copies each row's k and v into its sequence slot's cache at its position.
//   cache layout, per layer: f32[slots, maxPositions, kvHeads, headDim]
//   bindings: k (read, f32[rows, kvHeads*headDim]), v (read, same), kCache (read_write), vCache (read_write),
//             rowSlot (read, u32[rows]), positions (read, u32[rows])
//   params:   rows
// A position at or past maxPositions is dropped (the engine must not schedule one).
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

export interface KvWriteConstants {
  readonly kvHeads: number;
  readonly headDim: number;
  readonly maxPositions: number;
}

const WORKGROUP = 256;

export function kvWriteKernel({ kvHeads, headDim, maxPositions }: KvWriteConstants): KernelSource {
  const width = kvHeads * headDim;
  return kernelSource({
    name: "kv_write",
    constants: { kvHeads, headDim, maxPositions },
    storage: [
      { name: "k", access: "read", type: "array<f32>" },
      { name: "v", access: "read", type: "array<f32>" },
      { name: "kCache", access: "read_write", type: "array<f32>" },
      { name: "vCache", access: "read_write", type: "array<f32>" },
      { name: "rowSlot", access: "read", type: "array<u32>" },
      { name: "positions", access: "read", type: "array<u32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.rows * ${width}u) { return; }
  let row = i / ${width}u;
  let position = positions[row];
  if (position >= ${maxPositions}u) { return; }
  let at = (rowSlot[row] * ${maxPositions}u + position) * ${width}u + i % ${width}u;
  kCache[at] = k[i];
  vCache[at] = v[i];
}`,
    dispatch: { grid: { param: "rows", times: width, per: WORKGROUP } },
  });
}
