// Rotary position embedding, in place, Hugging Face "rotate_half" convention:
//   for i < headDim/2, angle = position * inv_freq[i], inv_freq[i] = theta^(-2i/headDim) for plain RoPE,
//   (x[i], x[i + headDim/2]) <- (x[i] cos - x[i + headDim/2] sin, x[i + headDim/2] cos + x[i] sin).
//   bindings: q (read_write, f32[rows, heads*headDim]), k (read_write, f32[rows, kvHeads*headDim]),
//             positions (read, u32[rows]), and for dynamic scaling lengths (read, u32[rows])
//   params:   rows
// Rotary scaling (Hugging Face's rope_scaling, transformers' modeling_rope_utils.py):
// - linear and llama3 change the inverse frequencies once, so they are baked like plain RoPE's: computed
//   in float64 and rounded to f32, as exact as a shader `pow` or better, and at no cost per invocation
//   (bench: the kernel's instructions are the same, only the constants differ).
// - dynamic (NTK) depends on the sequence length L: for L > originalMaxPositions the base becomes
//   theta * s^(d/(d-2)) with s = factor * L / originalMaxPositions - (factor - 1), so
//   inv_freq[i] = theta^(-2i/d) * s^(-2i/(d-2)): the baked plain frequency times a per-row power of s,
//   computed in f32 in the shader as Hugging Face computes it in f32 with torch. L is each row's
//   `lengths` entry: one past the last position its sequence reaches in the step (docs/language.md,
//   "RoPE scaling"); rows with L <= originalMaxPositions keep the plain frequencies exactly.
import type { PlanDims, RopeScaling } from "../../runtime/package/format.ts";
import type { KernelSource } from "./kernel.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, f32Literal, kernelSource, type StorageDecl } from "./wgsl.ts";

export interface RopeConstants {
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly theta: number;
  /** Absent for plain RoPE (and then the kernel and its key are those of plain RoPE). */
  readonly scaling?: RopeScaling;
}

const WORKGROUP = 256;

/** The rope kernels' constants for a plan's dims (forward and backward, inference and training). */
export function ropeConstants(dims: PlanDims): RopeConstants {
  const { heads, kvHeads, headDim, ropeTheta: theta, ropeScaling } = dims;
  return { heads, kvHeads, headDim, theta, ...(ropeScaling === undefined ? {} : { scaling: ropeScaling }) };
}

/**
 * The inverse frequencies the kernels bake, in float64: theta^(-2i/headDim) for i < headDim/2, scaled
 * by linear (divided by factor) or llama3 (by wavelength band). For dynamic, the plain frequencies: the
 * kernel scales them per row.
 */
export function ropeInverseFrequencies(headDim: number, theta: number, scaling?: RopeScaling): number[] {
  const plain = Array.from({ length: headDim / 2 }, (_, i) => theta ** ((-2 * i) / headDim));
  if (scaling?.type === "linear") return plain.map((f) => f / scaling.factor);
  if (scaling?.type !== "llama3") return plain;
  const { factor, lowFreqFactor, highFreqFactor, originalMaxPositions } = scaling;
  // Wavelengths shorter than original / high keep their frequency, longer than original / low are divided
  // by factor, and the band between interpolates linearly in original / wavelength.
  return plain.map((f) => {
    const wavelength = (2 * Math.PI) / f;
    if (wavelength < originalMaxPositions / highFreqFactor) return f;
    if (wavelength > originalMaxPositions / lowFreqFactor) return f / factor;
    const smooth = (originalMaxPositions / wavelength - lowFreqFactor) / (highFreqFactor - lowFreqFactor);
    return (1 - smooth) * (f / factor) + smooth * f;
  });
}

/** 2/(d-2): pair i's frequency is multiplied by s^(-i * this) under dynamic scaling (0 when d = 2: one pair, unscaled). */
export function dynamicExponentStep(headDim: number): number {
  return headDim > 2 ? 2 / (headDim - 2) : 0;
}

/** The WGSL shared by the forward and backward kernels: the constants and each row's inverse frequency. */
export function ropeShared(c: RopeConstants): { storage: StorageDecl[]; declarations: string; frequency: string; constants: Record<string, number | string> } {
  const { headDim, theta, scaling } = c;
  if (headDim % 2 !== 0) throw new Error(`rope needs an even head_dim, got ${headDim}`);
  const half = headDim / 2;
  const table = (values: number[]) => values.map(f32Literal).join(", ");
  const frequencies = `const INV_FREQ = array<f32, ${half}>(${table(ropeInverseFrequencies(headDim, theta, scaling))});`;
  const constants = { heads: c.heads, kvHeads: c.kvHeads, headDim, theta, ...(scaling === undefined ? {} : flatScaling(scaling)) };
  if (scaling?.type !== "dynamic") return { storage: [], declarations: frequencies, frequency: "INV_FREQ[pair]", constants };
  const { factor, originalMaxPositions } = scaling;
  return {
    storage: [{ name: "lengths", access: "read", type: "array<u32>" }],
    declarations: `${frequencies}

// Dynamic NTK: inv_freq[i] * s^(-2i/(d-2)), s = factor * L / original - (factor - 1), for L > original.
fn inverse_frequency(row: u32, pair: u32) -> f32 {
  let length = lengths[row];
  if (length <= ${originalMaxPositions}u) { return INV_FREQ[pair]; }
  let s = ${f32Literal(factor)} * f32(length) / ${f32Literal(originalMaxPositions)} - ${f32Literal(factor - 1)};
  return INV_FREQ[pair] * exp2(-f32(pair) * ${f32Literal(dynamicExponentStep(headDim))} * log2(s));
}`,
    frequency: "inverse_frequency(row, pair)",
    constants,
  };
}

/** The scaling as flat kernel constants (they name the variant in its key). */
function flatScaling(s: RopeScaling): Record<string, number | string> {
  const { type, ...values } = s;
  return { scaling: type, ...values };
}

export function ropeKernel(c: RopeConstants): KernelSource {
  const { heads, kvHeads, headDim } = c;
  const half = headDim / 2;
  const shared = ropeShared(c);
  // One invocation per (row, head of q or k, rotated pair).
  const pairsPerRow = (heads + kvHeads) * half;
  return kernelSource({
    name: "rope",
    constants: shared.constants,
    storage: [
      { name: "q", access: "read_write", type: "array<f32>" },
      { name: "k", access: "read_write", type: "array<f32>" },
      { name: "positions", access: "read", type: "array<u32>" },
      ...shared.storage,
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
${shared.declarations}

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
  let angle = f32(positions[row]) * ${shared.frequency};
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
