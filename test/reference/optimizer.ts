// Float64 references of the optimizer steps and of gradient clipping, as torch defines them:
// torch.optim.AdamW (decoupled weight decay, bias-corrected moments, amsgrad off), plain SGD, and
// torch.nn.utils.clip_grad_norm_ (total L2 norm over all buffers, factor min(1, max / (norm + 1e-6))).
// Everything is updated in place on float64 arrays.

export interface AdamWReferenceSettings {
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
}

/** One AdamW step t (from 1) with gradient `g` (already scaled and clipped). */
export function adamwStep(p: Float64Array, g: ArrayLike<number>, m: Float64Array, v: Float64Array, s: AdamWReferenceSettings, t: number): void {
  const bc1 = 1 - s.beta1 ** t;
  const bc2 = 1 - s.beta2 ** t;
  for (let i = 0; i < p.length; i++) {
    const gi = g[i]!;
    p[i] = p[i]! * (1 - s.lr * s.weightDecay);
    m[i] = s.beta1 * m[i]! + (1 - s.beta1) * gi;
    v[i] = s.beta2 * v[i]! + (1 - s.beta2) * gi * gi;
    p[i] = p[i]! - (s.lr * (m[i]! / bc1)) / (Math.sqrt(v[i]! / bc2) + s.eps);
  }
}

export function sgdStep(p: Float64Array, g: ArrayLike<number>, lr: number): void {
  for (let i = 0; i < p.length; i++) p[i] = p[i]! - lr * g[i]!;
}

/** The L2 norm of all elements of all buffers together. */
export function globalNorm(buffers: readonly ArrayLike<number>[]): number {
  let sum = 0;
  for (const b of buffers) for (let i = 0; i < b.length; i++) sum += b[i]! * b[i]!;
  return Math.sqrt(sum);
}

/** clip_grad_norm_'s multiplier: the gradients are multiplied by it (1 when maxNorm <= 0: no clipping). */
export function clipFactor(norm: number, maxNorm: number): number {
  return maxNorm > 0 ? Math.min(1, maxNorm / (norm + 1e-6)) : 1;
}
