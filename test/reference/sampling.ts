// Float64 references for the server's sampling fields, written from their definitions (vLLM's and
// Hugging Face's), not from the kernels: penalties, logit bias, min_p, top-k, log-probabilities.

export interface ReferencePenalties {
  readonly presence: number;
  readonly frequency: number;
  readonly repetition: number;
  readonly bias: ReadonlyMap<number, number>;
}

/**
 * The logits a sampler sees after penalties and bias: the repetition penalty on every token of the
 * prompt or the output (divide a positive logit by r, multiply a negative one), then the frequency
 * and presence penalties on the output's tokens (x - f * count - p * [count > 0]), then the bias.
 */
export function penalisedLogits(logits: ArrayLike<number>, prompt: readonly number[], output: readonly number[], p: ReferencePenalties): Float64Array {
  const x = Float64Array.from(logits as ArrayLike<number>);
  const seen = new Set([...prompt, ...output]);
  const counts = new Map<number, number>();
  for (const t of output) counts.set(t, (counts.get(t) ?? 0) + 1);
  if (p.repetition !== 1) for (const t of seen) x[t] = x[t]! > 0 ? x[t]! / p.repetition : x[t]! * p.repetition;
  for (const [t, c] of counts) x[t] = x[t]! - p.frequency * c - p.presence;
  for (const [t, b] of p.bias) x[t] = x[t]! + b;
  return x;
}

export function logSoftmax64(logits: ArrayLike<number>): Float64Array {
  let m = -Infinity;
  for (let i = 0; i < logits.length; i++) m = Math.max(m, logits[i]!);
  let s = 0;
  for (let i = 0; i < logits.length; i++) s += Math.exp(logits[i]! - m);
  const lse = m + Math.log(s);
  return Float64Array.from(logits as ArrayLike<number>, (x) => x - lse);
}

/** Tokens a sampler at temperature T may draw under min_p and top-k (before top-p): p_i >= minP * p_max, and among the k largest. */
export function allowedTokens(logits: ArrayLike<number>, temperature: number, minP: number, topK: number): Set<number> {
  const ids = Array.from({ length: logits.length }, (_, i) => i).sort((a, b) => logits[b]! - logits[a]!);
  const top = logits[ids[0]!]!;
  const kth = topK > 0 ? logits[ids[Math.min(topK, ids.length) - 1]!]! : -Infinity;
  return new Set(ids.filter((i) => logits[i]! >= kth && Math.exp((logits[i]! - top) / temperature) >= minP));
}
