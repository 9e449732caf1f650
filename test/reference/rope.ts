// Rotary position embedding as Hugging Face transformers computes it, in float64, written from its
// modeling_rope_utils.py and LlamaRotaryEmbedding (not from milora's kernels):
// - default: inv_freq[i] = 1 / theta^(2i/d), d the head size.
// - linear: inv_freq / factor.
// - llama3: wavelength 2 pi / inv_freq; above original / low_freq_factor divided by factor, below
//   original / high_freq_factor kept, between: (1 - smooth) inv_freq / factor + smooth inv_freq with
//   smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor).
// - dynamic: each forward with seq_len = max(position_ids) + 1 above max_position_embeddings uses the
//   base theta' = theta * (factor * seq_len / max_position_embeddings - (factor - 1))^(d / (d - 2)) and
//   inv_freq = 1 / theta'^(2i/d); shorter forwards use the default frequencies. Keys cached by earlier
//   forwards keep the rotation they got, so in a generation each position has its own seq_len:
//   generationLengths() gives them.
import type { RopeScaling } from "../../runtime/package/format.ts";

export interface RotaryConfig {
  readonly headDim: number;
  readonly ropeTheta: number;
  readonly ropeScaling?: RopeScaling;
}

/** The inverse frequencies of a forward pass whose positions reach `length - 1`. */
export function inverseFrequencies(config: RotaryConfig, length: number): Float64Array {
  const { headDim: d, ropeScaling: s } = config;
  let theta = config.ropeTheta;
  if (s?.type === "dynamic" && length > s.originalMaxPositions) {
    theta *= (s.factor * length / s.originalMaxPositions - (s.factor - 1)) ** (d / (d - 2));
  }
  const inv = Float64Array.from({ length: d / 2 }, (_, i) => 1 / theta ** ((2 * i) / d));
  if (s?.type === "linear") return inv.map((f) => f / s.factor);
  if (s?.type !== "llama3") return inv;
  const lowWavelength = s.originalMaxPositions / s.lowFreqFactor;
  const highWavelength = s.originalMaxPositions / s.highFreqFactor;
  return inv.map((f) => {
    const wavelength = (2 * Math.PI) / f;
    const scaled = wavelength > lowWavelength ? f / s.factor : f;
    const medium = !(wavelength < highWavelength) && !(wavelength > lowWavelength);
    if (!medium) return scaled;
    const smooth = (s.originalMaxPositions / wavelength - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
    return ((1 - smooth) * scaled) / s.factor + smooth * scaled;
  });
}

/** rotate_half RoPE of one head vector at position `pos`, in place: pair (i, i + d/2) turns by pos * inv[i]. */
export function applyRope(v: Float64Array, pos: number, inv: ArrayLike<number>): void {
  const half = v.length / 2;
  for (let i = 0; i < half; i++) {
    const angle = pos * inv[i]!;
    const cos = Math.cos(angle);
    const sin = Math.sin(angle);
    const a = v[i]!;
    const b = v[i + half]!;
    // [a, b] * cos + [-b, a] * sin
    v[i] = a * cos - b * sin;
    v[i + half] = b * cos + a * sin;
  }
}

/**
 * The seq_len each position of a generation was rotated with: the prompt's length for the prompt (one
 * forward), then position + 1 for each token generated after it (one forward per token).
 */
export function generationLengths(promptLength: number, total: number): number[] {
  return Array.from({ length: total }, (_, p) => (p < promptLength ? promptLength : p + 1));
}
