// Float64 references for sampling, written from their definitions (vLLM's and Hugging Face's), not
// from the kernels: penalties, logit bias, min_p, top-k, log-probabilities, and the token a row gives
// under temperature, top-k, top-p and milora's seeded draw.

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

export interface ReferenceSampling {
  readonly temperature: number;
  readonly topK: number;
  readonly topP: number;
  readonly seed: number;
  readonly step: number;
}

/** Jarzynski and Olano's PCG hash (RXS-M-XS over one LCG step) on u32, from the paper. */
function pcgHash(v: number): number {
  const state = (Math.imul(v >>> 0, 747796405) + 2891336453) >>> 0;
  const word = Math.imul(((state >>> ((state >>> 28) + 4)) ^ state) >>> 0, 277803737) >>> 0;
  return ((word >>> 22) ^ word) >>> 0;
}

/** milora's draw for (seed, step): the top 24 bits of pcg(pcg(seed) ^ step), as a fraction of 2^24. */
export function referenceDraw(seed: number, step: number): number {
  return (pcgHash((pcgHash(seed) ^ step) >>> 0) >>> 8) / 2 ** 24;
}

/**
 * The token one row of logits gives, from the definitions: temperature 0 is the argmax (the lowest
 * index among ties); otherwise p = softmax(logits / T), top-k keeps the tokens whose logit is at least
 * the k-th largest, top-p then keeps the most probable of those, whole groups of equal logits at a
 * time, until their probability reaches p of what top-k kept, and the draw u inverts the cumulative
 * distribution of the kept tokens taken in vocabulary order.
 */
export function referenceToken(logits: ArrayLike<number>, s: ReferenceSampling): number {
  const ids = Array.from({ length: logits.length }, (_, i) => i);
  const argmax = ids.reduce((best, i) => (logits[i]! > logits[best]! ? i : best), 0);
  if (s.temperature <= 0) return argmax;
  const scaled = ids.map((i) => logits[i]! / s.temperature);
  const top = Math.max(...scaled);
  const z = scaled.reduce((sum, x) => sum + Math.exp(x - top), 0);
  const p = scaled.map((x) => Math.exp(x - top) / z);
  const byLogit = [...ids].sort((a, b) => logits[b]! - logits[a]!);
  let kept = new Set(ids);
  if (s.topK > 0 && s.topK < ids.length) {
    const kth = logits[byLogit[s.topK - 1]!]!;
    kept = new Set(ids.filter((i) => logits[i]! >= kth));
  }
  if (s.topP < 1) {
    const mass = [...kept].reduce((sum, i) => sum + p[i]!, 0);
    const nucleus = new Set<number>();
    let held = 0;
    for (const group of groupsOfEqualLogits(byLogit.filter((i) => kept.has(i)), logits)) {
      for (const i of group) nucleus.add(i), (held += p[i]!);
      if (held >= s.topP * mass) break;
    }
    kept = nucleus;
  }
  const inOrder = ids.filter((i) => kept.has(i));
  const target = referenceDraw(s.seed, s.step) * inOrder.reduce((sum, i) => sum + p[i]!, 0);
  let cumulative = 0;
  for (const i of inOrder) {
    cumulative += p[i]!;
    if (cumulative > target) return i;
  }
  return inOrder.at(-1)!;
}

/** Ids sorted by logit, descending, cut into runs of equal logits. */
function groupsOfEqualLogits(sorted: readonly number[], logits: ArrayLike<number>): number[][] {
  const groups: number[][] = [];
  for (const i of sorted) {
    const last = groups.at(-1);
    if (last && logits[last[0]!] === logits[i]) last.push(i);
    else groups.push([i]);
  }
  return groups;
}
