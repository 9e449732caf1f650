// The device self-test's reference for the sampling kernel (`milora doctor`; `run` and `serve` refuse a
// device that disagrees with it): the kernel's procedure on the CPU in float64, written with sorts
// rather than bitwise searches. It ships with milora, so it lives beside the self-test; the kernel's
// own tests grade it, and this, against test/reference/sampling.ts, written from the definitions.
import { uniformDraw, type SamplingSettings } from "../../compiler/kernels/sampling.ts";

/** The token the sampling kernel picks from one row of logits (f32 values) with these settings. */
export function sampleRowCpu(logits: ArrayLike<number>, s: SamplingSettings): number {
  const vocab = logits.length;
  let argmax = 0;
  for (let i = 1; i < vocab; i++) if (logits[i]! > logits[argmax]!) argmax = i;
  if (s.temperature <= 0) return argmax;

  const top = logits[argmax]!;
  const weight = (i: number) => Math.exp((logits[i]! - top) / s.temperature);
  const byLogit = Array.from({ length: vocab }, (_, i) => i).sort((a, b) => logits[b]! - logits[a]!);
  // Cut values: a token is kept when its logit is >= cut, so tokens tied with the last one kept stay too.
  let cut = -Infinity;
  if (s.topK > 0 && s.topK < vocab) cut = logits[byLogit[s.topK - 1]!]!;
  if (s.topP < 1) {
    const kept = byLogit.filter((i) => logits[i]! >= cut);
    const goal = s.topP * kept.reduce((m, i) => m + weight(i), 0);
    let mass = 0;
    for (let j = 0; j < kept.length; j++) {
      mass += weight(kept[j]!);
      const next = kept[j + 1];
      // Mass is counted up to the end of a run of equal logits before comparing with the goal.
      if (next !== undefined && logits[next] === logits[kept[j]!]) continue;
      if (mass >= goal) {
        cut = Math.max(cut, logits[kept[j]!]!);
        break;
      }
    }
  }

  let total = 0;
  for (let i = 0; i < vocab; i++) if (logits[i]! >= cut) total += weight(i);
  const target = uniformDraw(s.seed, s.step) * total;
  let running = 0;
  let last = argmax;
  for (let i = 0; i < vocab; i++) {
    if (logits[i]! < cut) continue;
    running += weight(i);
    last = i;
    if (running > target) return i;
  }
  return last;
}

/** {@link sampleRowCpu} over rows of a [rows, vocab] logits matrix, one settings entry per row. */
export function sampleCpu(logits: Float32Array, vocab: number, settings: readonly SamplingSettings[]): Uint32Array {
  return Uint32Array.from(settings, (s, r) => sampleRowCpu(logits.subarray(r * vocab, (r + 1) * vocab), s));
}
