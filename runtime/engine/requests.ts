// What callers ask of the engine and what comes back, and the few engine calls generation and beam
// search make (SequenceRunner, which Engine implements): generate.ts and beam-search.ts work on that
// interface, so neither imports the engine and the engine imports them without a cycle.
import type { LayerRouting } from "./routing.ts";
import type { LogitsMode, SamplingOptions, Sequence } from "./sequence.ts";

export interface CreateSequenceOptions {
  readonly sampling?: SamplingOptions;
  readonly logits?: LogitsMode;
  /** Name of a loaded adapter (tenant) to run with; the base alone when absent. */
  readonly adapter?: string;
}

/** What a step gave one sequence whose pending tokens all ran. */
export interface StepOutput {
  /** The token sampled after its last token. */
  readonly token: number;
  /** Logits rows ([vocab] each) as the sequence's `logits` mode asked: every run row's, or the last. */
  readonly logits?: readonly Float32Array[];
  /** With `seq.candidates` > 0: the most likely next tokens, largest log-probability first. */
  readonly candidates?: BeamCandidates;
  /** With `seq.wantsLogprob`: the sampled token's log-probability under the raw logits (f32). */
  readonly logprob?: number;
}

/** A row's most likely next tokens and their log-probabilities (log-softmax over the vocabulary, f32). */
export interface BeamCandidates {
  readonly tokens: Uint32Array;
  readonly logprobs: Float32Array;
}

/** The engine's sequence calls, as generation and beam search use them (Engine's methods of these names). */
export interface SequenceRunner {
  /** Slots free for new sequences. */
  readonly freeSlots: number;
  createSequence(prompt: readonly number[], options?: CreateSequenceOptions): Sequence;
  fork(parent: Sequence, sampling?: SamplingOptions): Sequence;
  adopt(pairs: readonly { readonly seq: Sequence; readonly parent: Sequence }[]): void;
  release(seq: Sequence): void;
  prefill(seqs: readonly Sequence[]): Promise<Map<Sequence, StepOutput>>;
  decode(seqs: readonly Sequence[]): Promise<Map<Sequence, StepOutput>>;
}

export interface BeamSearchOptions {
  /** Beam width (HF num_beams); 1 is greedy decoding. */
  readonly beams: number;
  /** Exponent of the generated length that divides a hypothesis' sum of log-probabilities (default 1.0). */
  readonly lengthPenalty?: number;
  /** HF's early_stopping: false (default, the heuristic), true, or "never". */
  readonly earlyStopping?: boolean | "never";
  /** How many hypotheses to return, best first (default 1, at most `beams`). */
  readonly numReturnSequences?: number;
}

/** One returned hypothesis. */
export interface BeamSequence {
  /** Generated tokens (the stop token kept when it ended with one). */
  readonly tokens: number[];
  /** sum of log-probabilities / generated length ** length_penalty. */
  readonly score: number;
  readonly sumLogprobs: number;
  readonly finish: Generation["finish"];
  /** The beam's routing: the prompt's decision (shared by every beam), or per position for token routing. */
  readonly routing?: readonly LayerRouting[];
}

export interface GenerateRequest {
  readonly prompt: readonly number[];
  /** Tokens to generate; 0 runs the prompt only (for its logits). */
  readonly maxTokens: number;
  readonly sampling?: SamplingOptions;
  /** Logits of the prompt to return: its last position's, or every position's. */
  readonly logits?: "last" | "all";
  /** Token ids that end generation (the stop token is kept in the output). */
  readonly stop?: readonly number[];
  /** A loaded adapter (tenant) to run with; the base alone when absent. */
  readonly adapter?: string;
  /**
   * Beam search (beam-search.ts: Hugging Face's meaning) when `beams` > 1: the returned tokens are the
   * best hypothesis', and `beams` of the Generation holds numReturnSequences of them with scores.
   * Needs greedy sampling (the default) and one free sequence slot per beam.
   */
  readonly beam?: BeamSearchOptions;
}

/** Wall-clock times of the batch a generation ran in (shared by all its requests). */
export interface GenerationTimings {
  readonly prefillTokens: number;
  readonly prefillMs: number;
  /** Tokens produced by decode steps (the first token of each sequence comes from prefill). */
  readonly decodeTokens: number;
  readonly decodeSteps: number;
  readonly decodeMs: number;
}

export interface Generation {
  readonly tokens: number[];
  /** `length`: maxTokens reached; `stop`: a stop token came; `context`: the KV cache is full. */
  readonly finish: "length" | "stop" | "context";
  /** Prompt logits as asked, one row of vocab_size per position. */
  readonly logits?: readonly Float32Array[];
  /** The adapter's routing: per routed layer (prompt routing) or per layer and position (token routing). */
  readonly routing?: readonly LayerRouting[];
  readonly timings: GenerationTimings;
  /** Beam search: the best hypothesis' score (sum of log-probabilities / length ** length_penalty). */
  readonly score?: number;
  /** Beam search: the numReturnSequences best hypotheses, best first (the first is `tokens`). */
  readonly beams?: readonly BeamSequence[];
}
