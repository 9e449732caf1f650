// The one way milora measures a generation's speed (`milora bench`, bench/decode.ts, bench/milora.ts,
// bench/beam.ts): from the engine's own timings of one batch. A batch's requests decode in lockstep,
// one token each per step (a beam search's returned sequence too, however many beams it runs), so a
// sequence waits one step per token and the batch makes `requests` tokens a step.
import type { Engine } from "../../runtime/engine/engine.ts";
import type { GenerateRequest, GenerationTimings } from "../../runtime/engine/requests.ts";

export interface GenerationFigures {
  /** Prompt tokens prefilled per second, over the batch's prompts. */
  readonly prefillTokensPerS: number;
  /** Milliseconds per decode step: each sequence's time per token. */
  readonly decodeMsPerToken: number;
  /** Tokens of the returned sequences per second of decode, over the batch. */
  readonly tokensPerS: number;
}

/** The figures of one batch of `requests` requests from its timings (NaN for a part that did not run). */
export function figuresOf(t: GenerationTimings, requests: number): GenerationFigures {
  return {
    prefillTokensPerS: (t.prefillTokens / t.prefillMs) * 1000,
    decodeMsPerToken: t.decodeMs / t.decodeSteps,
    tokensPerS: ((requests * t.decodeSteps) / t.decodeMs) * 1000,
  };
}

/** Runs the batch once (`generateBatch`) and returns its figures. */
export async function measureBatch(engine: Engine, requests: readonly GenerateRequest[]): Promise<GenerationFigures> {
  const [first] = await engine.generateBatch(requests);
  return figuresOf(first!.timings, requests.length);
}

/** Each figure at its best of the two: other jobs share the machine, so the fastest run is the least disturbed. */
export function bestOf(a: GenerationFigures | undefined, b: GenerationFigures): GenerationFigures {
  if (a === undefined) return b;
  return {
    prefillTokensPerS: Math.max(a.prefillTokensPerS, b.prefillTokensPerS),
    decodeMsPerToken: Math.min(a.decodeMsPerToken, b.decodeMsPerToken),
    tokensPerS: Math.max(a.tokensPerS, b.tokensPerS),
  };
}

/** `n` token ids for prompt number `seed` of a `vocab`-token model: distinct prompts per tenant, no tokenizer needed. */
export function benchPrompt(n: number, seed: number, vocab: number): number[] {
  return Array.from({ length: n }, (_, i) => (i * 7919 + seed * 104729 + 13) % vocab);
}
