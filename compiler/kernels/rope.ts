// Rotary position embedding, in place, Hugging Face "rotate_half" convention:
//   for i < headDim/2, angle = position * theta^(-2i/headDim),
//   (x[i], x[i + headDim/2]) <- (x[i] cos - x[i + headDim/2] sin, x[i + headDim/2] cos + x[i] sin).
//   bindings: q (read_write, f32[rows, heads*headDim]), k (read_write, f32[rows, kvHeads*headDim]),
//             positions (read, u32[rows])
//   params:   rows
// The inverse frequencies are computed in float64 and baked as f32, as exact as a shader `pow` or better.
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, kernelSource } from "./wgsl.ts";

export interface RopeConstants {
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly theta: number;
}

const WORKGROUP = 256;

/** theta^(-2i/headDim) for i < headDim/2: the rotary inverse frequencies (also used by CPU references). */
export function ropeInverseFrequencies(headDim: number, theta: number): number[] {
  return Array.from({ length: headDim / 2 }, (_, i) => theta ** ((-2 * i) / headDim));
}

export function ropeKernel({ heads, kvHeads, headDim, theta }: RopeConstants): KernelSource {
  if (headDim % 2 !== 0) throw new Error(`rope needs an even head_dim, got ${headDim}`);
  const half = headDim / 2;
  // One invocation per (row, head of q or k, rotated pair).
  const pairsPerRow = (heads + kvHeads) * half;
  const frequencies = ropeInverseFrequencies(headDim, theta).map(f32Literal).join(", ");
  return kernelSource({
    name: "rope",
    constants: { heads, kvHeads, headDim, theta },
    storage: [
      { name: "q", access: "read_write", type: "array<f32>" },
      { name: "k", access: "read_write", type: "array<f32>" },
      { name: "positions", access: "read", type: "array<u32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
const INV_FREQ = array<f32, ${half}>(${frequencies});

fn rotate(x: f32, y: f32, angle: f32) -> vec2<f32> {
  let c = cos(angle);
  let s = sin(angle);
  return vec2<f32>(x * c - y * s, y * c + x * s);
}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.rows * ${pairsPerRow}u) { return; }
  let row = i / ${pairsPerRow}u;
  let within = i % ${pairsPerRow}u;
  let head = within / ${half}u;
  let pair = within % ${half}u;
  let angle = f32(positions[row]) * INV_FREQ[pair];
  if (head < ${heads}u) {
    let at = row * ${heads * headDim}u + head * ${headDim}u + pair;
    let r = rotate(q[at], q[at + ${half}u], angle);
    q[at] = r.x;
    q[at + ${half}u] = r.y;
  } else {
    let at = row * ${kvHeads * headDim}u + (head - ${heads}u) * ${headDim}u + pair;
    let r = rotate(k[at], k[at + ${half}u], angle);
    k[at] = r.x;
    k[at + ${half}u] = r.y;
  }
}`,
    dispatch: { grid: { param: "rows", times: pairsPerRow, per: WORKGROUP } },
  });
}
