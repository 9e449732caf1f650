// A float64 beam search written as a literal reading of Hugging Face transformers' `_beam_search` with
// its BeamSearchScorer and BeamHypotheses (the 4.36-4.46 form, batch of one, decoder-only), for
// clarity rather than speed: every beam is a full token list, the first step runs all beams with
// scores (0, -1e9, ...), candidates are a top-k over the flattened [beams * vocab] scores. The engine's
// runtime/engine/beam-search.ts is measured against it.
import { referenceLogits, type LinearFn, type ReferenceWeights } from "./llama.ts";
import type { BaseModel } from "../../compiler/model.ts";

export interface ReferenceBeamConfig {
  readonly numBeams: number;
  readonly maxNewTokens: number;
  readonly eos: readonly number[];
  readonly lengthPenalty?: number;
  readonly earlyStopping?: boolean | "never";
  readonly numReturnSequences?: number;
}

export interface ReferenceBeam {
  /** Generated tokens, the EOS token appended when the hypothesis ended with one (as finalize does). */
  readonly tokens: number[];
  /** sum_logprobs / generated_len ** length_penalty. */
  readonly score: number;
}

/** log softmax in float64. */
export function logSoftmax(logits: ArrayLike<number>): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) max = Math.max(max, logits[i]!);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i]! - max);
  const logSum = Math.log(sum);
  return Float64Array.from(logits, (x) => x - max - logSum);
}

class Hypotheses {
  readonly beams: { score: number; tokens: number[] }[] = [];
  worstScore = 1e9;
  constructor(
    readonly numBeams: number,
    readonly lengthPenalty: number,
    readonly earlyStopping: boolean | "never",
    readonly maxLength: number,
  ) {}

  add(tokens: number[], sumLogprobs: number, generatedLen: number): void {
    const score = sumLogprobs / generatedLen ** this.lengthPenalty;
    if (this.beams.length < this.numBeams || score > this.worstScore) {
      this.beams.push({ score, tokens });
      if (this.beams.length > this.numBeams) {
        const sorted = this.beams.map((b, i) => [b.score, i] as const).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
        this.beams.splice(sorted[0]![1], 1);
        this.worstScore = sorted[1]![0];
      } else {
        this.worstScore = Math.min(score, this.worstScore);
      }
    }
  }

  /** curLen and promptLen as HF passes them: curLen counts the token being scored. */
  isDone(bestSumLogprobs: number, curLen: number, promptLen: number): boolean {
    if (this.beams.length < this.numBeams) return false;
    if (this.earlyStopping === true) return true;
    if (this.earlyStopping === false) return this.worstScore >= bestSumLogprobs / (curLen - promptLen) ** this.lengthPenalty;
    const len = this.lengthPenalty > 0 ? this.maxLength - promptLen : curLen - promptLen;
    return this.worstScore >= bestSumLogprobs / len ** this.lengthPenalty;
  }
}

/**
 * Beam search over `nextLogprobs(tokens)` (log-probabilities of the token after the full token list
 * `tokens`, prompt included). Returns numReturnSequences hypotheses, best first.
 */
export function referenceBeamSearch(
  nextLogprobs: (tokens: readonly number[]) => Float64Array,
  prompt: readonly number[],
  config: ReferenceBeamConfig,
): ReferenceBeam[] {
  const { numBeams, eos } = config;
  const lengthPenalty = config.lengthPenalty ?? 1;
  const earlyStopping = config.earlyStopping ?? false;
  const keep = config.numReturnSequences ?? 1;
  const promptLen = prompt.length;
  const maxLength = promptLen + config.maxNewTokens;
  const hyps = new Hypotheses(numBeams, lengthPenalty, earlyStopping, maxLength);
  let done = false;
  let inputIds: number[][] = Array.from({ length: numBeams }, () => [...prompt]);
  let beamScores: number[] = Array.from({ length: numBeams }, (_, i) => (i === 0 ? 0 : -1e9));
  const nTokens = Math.max(2, 1 + eos.length) * numBeams;
  for (;;) {
    // Flattened scores [beam * vocab + token], top nTokens, largest first (ties: lower flat index).
    const flat: { score: number; beam: number; token: number; at: number }[] = [];
    inputIds.forEach((ids, beam) => {
      const lp = nextLogprobs(ids);
      lp.forEach((v, token) => flat.push({ score: v + beamScores[beam]!, beam, token, at: beam * lp.length + token }));
    });
    flat.sort((a, b) => b.score - a.score || a.at - b.at);
    const top = flat.slice(0, nTokens);
    const curLen = inputIds[0]!.length + 1;
    // process()
    const next: { score: number; token: number; beam: number }[] = [];
    for (let rank = 0; rank < top.length; rank++) {
      const c = top[rank]!;
      if (eos.includes(c.token)) {
        if (rank >= numBeams) continue;
        hyps.add([...inputIds[c.beam]!.slice(promptLen), c.token], c.score, curLen - promptLen);
      } else {
        next.push({ score: c.score, token: c.token, beam: c.beam });
      }
      if (next.length === numBeams) break;
    }
    done = done || hyps.isDone(top[0]!.score, curLen, promptLen);
    inputIds = next.map((n) => [...inputIds[n.beam]!, n.token]);
    beamScores = next.map((n) => n.score);
    if (done || inputIds[0]!.length >= maxLength) break;
  }
  // finalize()
  if (!done) inputIds.forEach((ids, beam) => hyps.add(ids.slice(promptLen), beamScores[beam]!, ids.length - promptLen));
  const sorted = [...hyps.beams].sort((a, b) => a.score - b.score);
  return Array.from({ length: keep }, () => sorted.pop()!).map((b) => ({ tokens: b.tokens, score: b.score }));
}

/** nextLogprobs of the reference model (full recompute), with an optional linear (LoRA / MiLoRA) wrapper. */
export function referenceNextLogprobs(base: BaseModel, weights: ReferenceWeights, linear?: LinearFn): (tokens: readonly number[]) => Float64Array {
  return (tokens) => logSoftmax(referenceLogits(base, weights, tokens, linear).at(-1)!);
}
