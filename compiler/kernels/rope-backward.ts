// Backward of rotary position embedding (rope.ts), in place on the gradients: the forward multiplies
// each pair (x[i], x[i + headDim/2]) by the rotation R(angle), so the gradient with respect to its input
// is R(angle)^T = R(-angle) applied to the gradient of its output:
//   (g[i], g[i + headDim/2]) <- (g[i] cos + g[i + headDim/2] sin, g[i + headDim/2] cos - g[i] sin).
//   bindings: dq (read_write, f32[rows, heads*headDim]), dk (read_write, f32[rows, kvHeads*headDim]),
//             positions (read, u32[rows])
//   params:   rows
// The angle is formed exactly as the forward forms it (the same baked f32 inverse frequencies of
// rope.ts, scaled or not, times f32(position)), so forward and backward rotate by bit-identical angles.
// Dynamic scaling is refused: training does not support it (docs/training.md).
import type { KernelSource } from "./kernel.ts";
import { ropeShared, type RopeConstants } from "./rope.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

const WORKGROUP = 256;

export function ropeBackwardKernel(c: RopeConstants): KernelSource {
  if (c.scaling?.type === "dynamic") throw new Error("rope backward: dynamic rope scaling is not supported in training");
  const { heads, kvHeads, headDim } = c;
  const half = headDim / 2;
  const pairsPerRow = (heads + kvHeads) * half;
  const shared = ropeShared(c);
  return kernelSource({
    name: "rope_backward",
    constants: shared.constants,
    storage: [
      { name: "dq", access: "read_write", type: "array<f32>" },
      { name: "dk", access: "read_write", type: "array<f32>" },
      { name: "positions", access: "read", type: "array<u32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
${shared.declarations}

fn unrotate(x: f32, y: f32, angle: f32) -> vec2<f32> {
  let c = cos(angle);
  let s = sin(angle);
  return vec2<f32>(x * c + y * s, y * c - x * s);
}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.rows * ${pairsPerRow}u) { return; }
  let row = i / ${pairsPerRow}u;
  let within = i % ${pairsPerRow}u;
  let head = within / ${half}u;
  let pair = within % ${half}u;
  let angle = f32(positions[row]) * ${shared.frequency};
  if (head < ${heads}u) {
    let at = row * ${heads * headDim}u + head * ${headDim}u + pair;
    let r = unrotate(dq[at], dq[at + ${half}u], angle);
    dq[at] = r.x;
    dq[at + ${half}u] = r.y;
  } else {
    let at = row * ${kvHeads * headDim}u + (head - ${heads}u) * ${headDim}u + pair;
    let r = unrotate(dk[at], dk[at + ${half}u], angle);
    dk[at] = r.x;
    dk[at + ${half}u] = r.y;
  }
}`,
    dispatch: { grid: { param: "rows", times: pairsPerRow, per: WORKGROUP } },
  });
}
