// Embedding gather: out[r, :] = table[ids[r], :].
//   bindings: ids (read, u32[rows]), table (read, f32[vocab, hidden]), out (read_write, f32[rows, hidden])
//   params:   rows
// An id outside the vocabulary yields a zero row rather than reading out of bounds.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

export interface EmbeddingConstants {
  readonly vocab: number;
  readonly hidden: number;
}

const WORKGROUP = 256;

export function embeddingKernel({ vocab, hidden }: EmbeddingConstants): KernelSource {
  return kernelSource({
    name: "embedding",
    constants: { vocab, hidden },
    storage: [
      { name: "ids", access: "read", type: "array<u32>" },
      { name: "table", access: "read", type: "array<f32>" },
      { name: "out", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.rows * ${hidden}u) { return; }
  let r = i / ${hidden}u;
  let c = i % ${hidden}u;
  let id = ids[r];
  out[i] = select(0.0, table[id * ${hidden}u + c], id < ${vocab}u);
}`,
    dispatch: { grid: { param: "rows", times: hidden, per: WORKGROUP } },
  });
}
