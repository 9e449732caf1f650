// A weight's values to and from its storage format on the GPU (the layouts: runtime/package/format.ts
// WEIGHT_FORMATS, docs/weights.md), on the CPU: at upload, and when merged mode folds an adapter in.
import { Q4_BLOCK, Q8_BLOCK, storageRowWords, type WeightFormat } from "../package/format.ts";
import { f16BitsToF32, f32ToF16Bits } from "../formats/safetensors.ts";
import { MiloraError } from "../errors.ts";

/** Values that cannot be stored in a format, or a shape its layout does not hold. */
export class WeightFormatError extends MiloraError {
  override name = "WeightFormatError";
  readonly kind = "unsupported";
}

/** binary16's largest finite value: beyond it a value would become infinity. */
const F16_MAX = 65504;

/**
 * A [rows, K] tensor's values (row-major f32) as the words of `format`'s layout, every row
 * storageRowWords(format, K) words. `what` names the tensor in errors ("tensor \"NAME\"").
 * Packing what unpackWeights returned gives the same words again, so merged mode's unmerge restores
 * the weights exactly: f16 values are binary16 already, and in q8 (q4) the block's largest value
 * f32(127 d) (f32(7 d)) gives back d (checked over every f32 mantissa of d = f32(max / 127) and of
 * f32(max / 7), test/runtime/engine/weight-storage.test.ts; not for subnormal d) and every
 * f32(d * q) / d rounds back to q.
 */
export function packWeights(format: WeightFormat, data: Float32Array, shape: readonly number[], what: string): Uint32Array {
  const [rows, K] = matrixShape(format, shape, what);
  if (data.length !== rows * K) throw new WeightFormatError(`${what} [${shape.join(", ")}]: ${data.length} values, expected ${rows * K}`);
  if (format === "f32") return new Uint32Array(data.buffer, data.byteOffset, data.length);
  const rowWords = storageRowWords(format, K);
  const out = new Uint32Array(rows * rowWords);
  if (format === "f16") {
    for (let r = 0; r < rows; r++) {
      for (let k = 0; k < K; k++) {
        const x = data[r * K + k]!;
        if (Math.abs(x) > F16_MAX) {
          throw new WeightFormatError(
            `${what} [${shape.join(", ")}] holds ${x} at [${r}, ${k}], beyond f16's range (+-${F16_MAX}): store it as f32 or q8 (--weights f32)`,
          );
        }
        out[r * rowWords + (k >> 1)]! |= f32ToF16Bits(x) << ((k & 1) * 16);
      }
    }
    return out;
  }
  const { block, qMax, quantWords } = BLOCKED[format];
  const blocks = Math.ceil(K / block);
  const scale = new Float32Array(1);
  const scaleBits = new Uint32Array(scale.buffer);
  for (let r = 0; r < rows; r++) {
    const row = r * rowWords;
    // q4 stores q + 8: a zero nibble would read as -8, so every element starts at q = 0 (past K too).
    if (format === "q4") out.fill(0x88888888, row, row + quantWords * blocks);
    for (let b = 0; b < blocks; b++) {
      const first = b * block;
      const count = Math.min(block, K - first);
      let max = 0;
      for (let i = 0; i < count; i++) max = Math.max(max, Math.abs(data[r * K + first + i]!));
      scale[0] = max / qMax;
      const d = scale[0];
      out[row + quantWords * blocks + b] = scaleBits[0]!;
      if (d === 0) continue;
      for (let i = 0; i < count; i++) {
        const k = first + i;
        const x = data[r * K + k]! / d;
        // Nearest, ties away from zero (ggml's roundf); |x| <= qMax up to the rounding of d.
        const q = Math.max(-qMax, Math.min(qMax, Math.sign(x) * Math.round(Math.abs(x))));
        if (format === "q8") out[row + (k >> 2)]! |= (q & 0xff) << ((k & 3) * 8);
        else out[row + (k >> 3)] = (out[row + (k >> 3)]! & ~(0xf << ((k & 7) * 4))) | ((q + 8) << ((k & 7) * 4));
      }
    }
  }
  return out;
}

/** The blocked formats: elements a block, the largest |q|, and the words of a block's quants. */
const BLOCKED = {
  q8: { block: Q8_BLOCK, qMax: 127, quantWords: Q8_BLOCK / 4 },
  q4: { block: Q4_BLOCK, qMax: 7, quantWords: Q4_BLOCK / 8 },
} as const;

/** The values `packWeights` stored (a q8 or q4 element as f32(d * q)), row-major [rows, K]. */
export function unpackWeights(format: WeightFormat, words: Uint32Array, shape: readonly number[], what: string): Float32Array {
  const [rows, K] = matrixShape(format, shape, what);
  const rowWords = storageRowWords(format, K);
  if (words.length !== rows * rowWords) throw new WeightFormatError(`${what} [${shape.join(", ")}]: ${words.length} ${format} words, expected ${rows * rowWords}`);
  if (format === "f32") return new Float32Array(words.buffer.slice(words.byteOffset, words.byteOffset + words.byteLength));
  const out = new Float32Array(rows * K);
  const asF32 = new Float32Array(words.buffer, words.byteOffset, words.length);
  const { block, quantWords } = format === "f16" ? BLOCKED.q8 : BLOCKED[format];
  const scales = quantWords * Math.ceil(K / block);
  for (let r = 0; r < rows; r++) {
    const row = r * rowWords;
    for (let k = 0; k < K; k++) {
      if (format === "f16") {
        out[r * K + k] = f16BitsToF32((words[row + (k >> 1)]! >>> ((k & 1) * 16)) & 0xffff);
      } else {
        const q =
          format === "q8"
            ? (words[row + (k >> 2)]! << (24 - (k & 3) * 8)) >> 24 // sign-extends the byte
            : ((words[row + (k >> 3)]! >>> ((k & 7) * 4)) & 0xf) - 8;
        out[r * K + k] = asF32[row + scales + Math.floor(k / block)]! * q;
      }
    }
  }
  return out;
}

/** A [rows, K] weight's dimensions; `f16`, `q8` and `q4` hold 2-D tensors only (the norms stay f32). */
function matrixShape(format: WeightFormat, shape: readonly number[], what: string): [number, number] {
  if (format !== "f32" && shape.length !== 2) {
    throw new WeightFormatError(`${what} [${shape.join(", ")}]: ${format} storage holds [rows, K] matrices only; store it as f32`);
  }
  const rows = shape[0] ?? 1;
  return [rows, shape.slice(1).reduce((a, b) => a * b, 1)];
}
