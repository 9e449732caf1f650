// The weight operand of the linear kernels in each storage format (the layouts of runtime/package/
// format.ts WEIGHT_FORMATS, docs/weights.md): a binding `w` and a load function that dequantises in
// registers, so the kernels accumulate in f32 whatever the format.
// - weightQuads (the matmul): `fn load_w(row, quad) -> vec4<f32>`, elements 4 quad .. 4 quad + 3.
// - weightUnits (the matvec): `fn load_w(row, unit)`, the largest run one 16-byte load holds: 4 f32
//   (a vec4<f32>), 8 f16 (a mat2x4<f32>, column i elements 4i..4i+3 of the unit), 16 q8 (mat4x4) or
//   32 q4 (one block, array<vec4<f32>, 8>), so a format of fewer bytes also takes fewer loads per weight.
// f16 is read without shader-f16 (which llvmpipe lacks): halves packed two a u32, widened to f32.
// Elements past K read as zero (the layouts pad with zeros, q4 with the nibble 8 that is q = 0).
import { Q4_BLOCK, Q8_BLOCK, storageRowWords, type WeightFormat } from "../../runtime/package/format.ts";
import { vec4Rows, type StorageDecl } from "./wgsl.ts";

/** The packed formats a linear kernel can read; f32 is the constant's absence. */
export type PackedWeightFormat = Exclude<WeightFormat, "f32">;

export interface WeightOperand {
  readonly decl: StorageDecl;
  /** Loads per row: quads for weightQuads, units for weightUnits. */
  readonly count: number;
  /** vec4s one load returns (1: a vec4<f32>; 2 or 4: the columns of a matrix). */
  readonly quadsPerLoad: number;
  /**
   * Whether a load's values still need `scale_w(row, unit) -> f32`, which multiplies its dot products
   * (q8's matvec: one multiply per row and column instead of one per element).
   */
  readonly scaled: boolean;
  readonly wgsl: string;
}

/** One quad (4 elements) per load: the matmul stages a tile a quad per invocation. */
export function weightQuads(format: WeightFormat, K: number): WeightOperand {
  const quads = Math.ceil(K / 4);
  const rowWords = storageRowWords(format, K);
  switch (format) {
    case "f32": {
      const w = vec4Rows("w", K);
      return { decl: w.decl, count: quads, quadsPerLoad: 1, scaled: false, wgsl: w.wgsl };
    }
    case "f16":
      return {
        decl: { name: "w", access: "read", type: "array<vec2<u32>>" },
        count: quads,
        quadsPerLoad: 1,
        scaled: false,
        wgsl: `${f16Fn}
fn load_w(row: u32, quad: u32) -> vec4<f32> {
  let p = w[row * ${rowWords / 2}u + quad];
  return vec4<f32>(f16x2(p.x), f16x2(p.y));
}`,
      };
    case "q8":
      return {
        decl: { name: "w", access: "read", type: "array<u32>" },
        count: quads,
        quadsPerLoad: 1,
        scaled: false,
        wgsl: `${int8Fn}
fn load_w(row: u32, quad: u32) -> vec4<f32> {
  let at = row * ${rowWords}u;
  return bitcast<f32>(w[at + ${q8ScalesAt(K)}u + quad / ${Q8_BLOCK / 4}u]) * int8x4(w[at + quad]);
}`,
      };
    case "q4":
      // Quad q is the low (even q) or high half of word q / 2; its block's scale is word q / 8 of the scales.
      return {
        decl: { name: "w", access: "read", type: "array<u32>" },
        count: quads,
        quadsPerLoad: 1,
        scaled: false,
        wgsl: `${int4Fn}
fn load_w(row: u32, quad: u32) -> vec4<f32> {
  let at = row * ${rowWords}u;
  return bitcast<f32>(w[at + ${q4ScalesAt(K)}u + quad / ${Q4_BLOCK / 4}u]) * int4x4(w[at + quad / 2u] >> ((quad % 2u) * 16u));
}`,
      };
  }
}

/** One 16-byte load of weights per call: the matvec, bound by loads on llvmpipe and by bytes on a GPU. */
export function weightUnits(format: WeightFormat, K: number): WeightOperand {
  const rowWords = storageRowWords(format, K);
  switch (format) {
    case "f32":
      return weightQuads("f32", K);
    case "f16":
      return {
        decl: { name: "w", access: "read", type: "array<vec4<u32>>" },
        count: Math.ceil(K / 8),
        quadsPerLoad: 2,
        scaled: false,
        wgsl: `${f16Fn}
fn load_w(row: u32, unit: u32) -> mat2x4<f32> {
  let p = w[row * ${rowWords / 4}u + unit];
  return mat2x4<f32>(vec4<f32>(f16x2(p.x), f16x2(p.y)), vec4<f32>(f16x2(p.z), f16x2(p.w)));
}`,
      };
    case "q8":
      // A unit is half a block: its scale is word unit / 2 of the row's scales.
      return {
        decl: { name: "w", access: "read", type: "array<vec4<u32>>" },
        count: Math.ceil(K / 16),
        quadsPerLoad: 4,
        scaled: true,
        wgsl: `${int8Fn}
fn load_w(row: u32, unit: u32) -> mat4x4<f32> {
  let p = w[row * ${rowWords / 4}u + unit];
  return mat4x4<f32>(int8x4(p.x), int8x4(p.y), int8x4(p.z), int8x4(p.w));
}
fn scale_w(row: u32, unit: u32) -> f32 {
  let at = row * ${rowWords}u + ${q8ScalesAt(K)}u + unit / 2u;
  return bitcast<f32>(w[at / 4u][at % 4u]);
}`,
      };
    case "q4":
      // A unit is one block: 4 words of 8 nibbles, element 8j + i of the unit in bits 4i.. of word j,
      // so quad 2j is word j's low half and quad 2j + 1 its high half; its scale is word unit of the scales.
      return {
        decl: { name: "w", access: "read", type: "array<vec4<u32>>" },
        count: Math.ceil(K / Q4_BLOCK),
        quadsPerLoad: Q4_BLOCK / 4,
        scaled: true,
        wgsl: `${int4Fn}
fn load_w(row: u32, unit: u32) -> array<vec4<f32>, ${Q4_BLOCK / 4}> {
  let p = w[row * ${rowWords / 4}u + unit];
  return array<vec4<f32>, ${Q4_BLOCK / 4}>(
    int4x4(p.x), int4x4(p.x >> 16u), int4x4(p.y), int4x4(p.y >> 16u),
    int4x4(p.z), int4x4(p.z >> 16u), int4x4(p.w), int4x4(p.w >> 16u),
  );
}
fn scale_w(row: u32, unit: u32) -> f32 {
  let at = row * ${rowWords}u + ${q4ScalesAt(K)}u + unit;
  return bitcast<f32>(w[at / 4u][at % 4u]);
}`,
      };
  }
}

/** Where a q8 row's scales start: after its 8 words of quants per block. */
function q8ScalesAt(K: number): number {
  return 8 * Math.ceil(K / Q8_BLOCK);
}

/** Where a q4 row's scales start: after its 4 words of quants per block. */
function q4ScalesAt(K: number): number {
  return 4 * Math.ceil(K / Q4_BLOCK);
}

/**
 * The two binary16 halves of a word (low half first) as f32, by moving each half's exponent and
 * mantissa into f32 position and scaling by 2^(127 - 15): exact for normal and subnormal halves (a
 * device that flushes f32 subnormals reads subnormal halves, |x| < 2^-14, as zero, as WGSL allows
 * unpack2x16float to), and on llvmpipe 0.6-0.7x the time of unpack2x16float, which costs as much as
 * the loads f16 saves (docs/performance.md, "Weight formats"). No infinities or NaNs are stored.
 */
const f16Fn = `fn f16x2(v: u32) -> vec2<f32> {
  let lo = ((v & 0x8000u) << 16u) | ((v & 0x7fffu) << 13u);
  let hi = (v & 0x80000000u) | ((v >> 3u) & 0x0fffe000u);
  return vec2<f32>(bitcast<f32>(lo), bitcast<f32>(hi)) * 5.192296858534828e33;
}`;

/** Four int8 in a word (byte j is element j) as f32, each byte sign-extended by shifting it to the top. */
const int8Fn = `fn int8x4(v: u32) -> vec4<f32> {
  return vec4<f32>(vec4<i32>(bitcast<i32>(v << 24u), bitcast<i32>(v << 16u), bitcast<i32>(v << 8u), bitcast<i32>(v)) >> vec4<u32>(24u));
}`;

/**
 * The four nibbles in bits 0-15 of a word (bits 4i..4i + 3 are element i, stored q + 8) as f32 q: each
 * shifted down and masked, then as i32 less 8 (exact). The caller shifts the word's high half down.
 */
const int4Fn = `fn int4x4(v: u32) -> vec4<f32> {
  return vec4<f32>(vec4<i32>((vec4<u32>(v) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u)) - vec4<i32>(8));
}`;
