// Float64 reference of rotary position embedding (rotate_half convention) and of its gradient.
// The forward y = R(angle) x per pair (x[i], x[i + d/2]); the gradient of sum(g * y) with respect to x
// is R(angle)^T g. The angle is what the kernels (and Hugging Face, in f32) compute: the f32 product of
// the position and the f32-rounded inverse frequency (that product is exact in float64 before
// Math.fround). Only the angle is f32; the rest is float64. The inverse frequencies are Hugging Face's
// (rope.ts), scaled by a linear or llama3 rope_scaling; training takes no dynamic scaling. Checked by
// finite differences in rope-gradients.test.ts.
import type { RopeScaling } from "../../runtime/package/format.ts";
import { inverseFrequencies } from "./rope.ts";

export interface RopeShape {
  readonly heads: number;
  readonly headDim: number;
  readonly theta: number;
  readonly scaling?: RopeScaling;
}

function rotatePairs(x: ArrayLike<number>, shape: RopeShape, positions: ArrayLike<number>, sign: 1 | -1): Float64Array {
  const { heads, headDim, theta, scaling } = shape;
  if (scaling?.type === "dynamic") throw new Error("reference: training takes no dynamic rope scaling");
  const half = headDim / 2;
  const frequencies = inverseFrequencies({ headDim, ropeTheta: theta, ...(scaling ? { ropeScaling: scaling } : {}) }, 0).map(Math.fround);
  const out = Float64Array.from(x);
  for (let r = 0; r < positions.length; r++)
    for (let h = 0; h < heads; h++)
      for (let i = 0; i < half; i++) {
        const at = (r * heads + h) * headDim + i;
        const angle = Math.fround(positions[r]! * frequencies[i]!);
        const c = Math.cos(angle);
        const s = sign * Math.sin(angle);
        out[at] = x[at]! * c - x[at + half]! * s;
        out[at + half] = x[at + half]! * c + x[at]! * s;
      }
  return out;
}

/** y = rope(x), x of shape [rows, heads*headDim], rows = positions.length. */
export function ropeForward(x: ArrayLike<number>, shape: RopeShape, positions: ArrayLike<number>): Float64Array {
  return rotatePairs(x, shape, positions, 1);
}

/** dL/dx given dL/dy: the transposed rotation. */
export function ropeBackward(dy: ArrayLike<number>, shape: RopeShape, positions: ArrayLike<number>): Float64Array {
  return rotatePairs(dy, shape, positions, -1);
}
