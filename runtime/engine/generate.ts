// Generation on top of the engine's steps: prefill the prompts together, then decode every live
// sequence in lockstep until each reaches its token budget, a stop token or the end of its context.
import { beamSearchBatch, type BeamSearchOptions, type BeamSequence } from "./beam-search.ts";
import type { Engine } from "./engine.ts";
import type { LayerRouting } from "./routing.ts";
import type { Sequence, SamplingOptions } from "./sequence.ts";

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

export async function generate(engine: Engine, request: GenerateRequest): Promise<Generation> {
  const [one] = await generateBatch(engine, [request]);
  return one!;
}

interface Live {
  readonly request: GenerateRequest;
  readonly seq: Sequence;
  readonly tokens: number[];
  finish?: Generation["finish"];
  logits?: readonly Float32Array[];
}

/** Whether a request asks for beam search (a beam width above 1). */
export function isBeamSearch(request: GenerateRequest): boolean {
  return request.beam !== undefined && request.beam.beams !== 1;
}

export async function generateBatch(engine: Engine, requests: readonly GenerateRequest[]): Promise<Generation[]> {
  if (requests.some(isBeamSearch)) {
    // Beam requests decode together in their own steps; any others then run as usual.
    const beams = requests.filter(isBeamSearch);
    const others = requests.filter((r) => !isBeamSearch(r));
    const beamOut = await beamSearchBatch(engine, beams);
    const otherOut = others.length > 0 ? await generateBatch(engine, others) : [];
    return requests.map((r) => (isBeamSearch(r) ? beamOut[beams.indexOf(r)]! : otherOut[others.indexOf(r)]!));
  }
  const steps = generateSteps(engine, requests);
  for (;;) {
    const next = await steps.next();
    if (next.done) return next.value;
  }
}

/**
 * Runs the requests together and yields after every step the token each request just received
 * (undefined for a request already finished): the streaming form of generateBatch. Ending the
 * iteration early releases the sequences.
 */
export async function* generateSteps(
  engine: Engine,
  requests: readonly GenerateRequest[],
): AsyncGenerator<readonly (number | undefined)[], Generation[]> {
  for (const r of requests) {
    if (isBeamSearch(r)) throw new RangeError("beam search cannot stream its tokens (the best beam is known only at the end): use generateBatch");
    if (!Number.isInteger(r.maxTokens) || r.maxTokens < 0) throw new RangeError(`maxTokens must be an integer >= 0, got ${r.maxTokens}`);
  }
  const live: Live[] = [];
  try {
    for (const request of requests) {
      const seq = engine.createSequence(request.prompt, {
        ...(request.sampling ? { sampling: request.sampling } : {}),
        ...(request.adapter === undefined ? {} : { adapter: request.adapter }),
        logits: request.logits ?? "none",
      });
      live.push({ request, seq, tokens: [] });
    }
    const started = performance.now();
    const first = await engine.prefill(live.map((l) => l.seq));
    const prefillMs = performance.now() - started;
    for (const l of live) {
      const out = first.get(l.seq)!;
      if (out.logits) l.logits = out.logits;
      l.seq.logits = "none";
      if (l.request.maxTokens === 0) l.finish = "length";
      else accept(l, out.token);
    }
    yield live.map((l) => (l.request.maxTokens === 0 ? undefined : l.tokens[0]));

    const decodeStarted = performance.now();
    let decodeSteps = 0;
    let decodeTokens = 0;
    for (let active = live.filter((l) => !l.finish); active.length > 0; active = active.filter((l) => !l.finish)) {
      const outs = await engine.decode(active.map((l) => l.seq));
      decodeSteps++;
      decodeTokens += active.length;
      for (const l of active) accept(l, outs.get(l.seq)!.token);
      yield live.map((l) => (active.includes(l) ? l.tokens[l.tokens.length - 1] : undefined));
    }
    const timings: GenerationTimings = {
      prefillTokens: requests.reduce((n, r) => n + r.prompt.length, 0),
      prefillMs,
      decodeTokens,
      decodeSteps,
      decodeMs: performance.now() - decodeStarted,
    };
    return live.map((l) => ({
      tokens: l.tokens,
      finish: l.finish!,
      ...(l.logits ? { logits: l.logits } : {}),
      ...(l.seq.adapter?.adapter.spec.router ? { routing: [...l.seq.routing] } : {}),
      timings,
    }));
  } finally {
    for (const l of live) engine.release(l.seq);
  }
}

/** Records a sampled token and either queues it for the next decode step or ends the sequence. */
function accept(l: Live, token: number): void {
  l.tokens.push(token);
  if (l.request.stop?.includes(token)) l.finish = "stop";
  else if (l.tokens.length >= l.request.maxTokens) l.finish = "length";
  else if (!l.seq.fits(1)) l.finish = "context";
  else l.seq.append([token]);
}
