// Beam search on the engine, with the meaning of Hugging Face transformers' `generate(num_beams=...)`
// (its `_beam_search` with BeamSearchScorer and BeamHypotheses, the 4.36-4.46 form). Details followed:
// - Candidates: each live beam's log-softmax over the vocabulary plus the beam's running sum; the
//   `max(2, 1 + eos ids) * beams` best over all beams (HF's top-k over the flattened [beams * vocab]
//   scores; equal scores go to the lower beam, then the lower token, as a stable flattened top-k would).
//   The first step has one beam, the prompt (HF runs `beams` copies with scores 0, -1e9, ...: the same).
// - EOS: a candidate that is an EOS id ends a hypothesis only if its rank is below `beams`; otherwise
//   it is skipped. Non-EOS candidates, in rank order, become the next beams until there are `beams`.
// - Scores: a finished hypothesis scores sum_logprobs / generated_len ** length_penalty, where
//   generated_len counts the generated tokens, the EOS included (HF's `cur_len - decoder_prompt_len`);
//   an unfinished one at the end counts its generated tokens. length_penalty defaults to 1.0.
// - The kept set: at most `beams` finished hypotheses, the worst dropped when a better one comes
//   (BeamHypotheses.add, with its worst_score bookkeeping, initially 1e9).
// - early_stopping (default false): true stops once `beams` hypotheses are finished; false stops when,
//   besides that, the worst kept score is at least best_candidate_sum / generated_len ** length_penalty
//   (HF's heuristic, evaluated on the step's best candidate score); "never" uses max_new_tokens as the
//   length when length_penalty > 0 (the canonical bound).
// - The end: at max_new_tokens (or a full context) the open beams join the finished ones (finalize) unless
//   early stopping ended the search; the `num_return_sequences` best come back, best first, with the EOS
//   token kept at the end of those that ended with one (as HF's output has it).
//
// Log-probabilities come from the device: the engine's sampling already runs there, so a small kernel
// (compiler/kernels/beam-topk.ts) takes each beam row's log-softmax and its top candidates, and a step
// reads back k (token, logprob) pairs per beam rather than vocab logits. Summing is in float64 here.
//
// Beams share their prompt: it is prefilled once, with its routing decision (MiLoRA routes once per
// prompt, and that one decision serves every beam: the method's point, the router never runs again),
// then forked into the beams by copying its keys and values slot to slot on the device. Each step, a
// beam continuing another beam's history takes over a sequence whose beam died and gets the differing
// cached positions copied (Engine.adopt): the prompt is never recomputed or recopied.
import { EngineError } from "./engine-error.ts";
import type { BeamSearchOptions, BeamSequence, GenerateRequest, Generation, GenerationTimings, SequenceRunner, StepOutput } from "./requests.ts";
import type { LayerRouting } from "./routing.ts";
import { SequenceError, type Sequence } from "./sequence.ts";
import { MAX_BEAM_CANDIDATES } from "../gpu/layouts.ts";

/** Checked options with their defaults. */
export function checkBeamOptions(options: BeamSearchOptions, stopIds = 0): Required<BeamSearchOptions> {
  const { beams, lengthPenalty = 1, earlyStopping = false, numReturnSequences = 1 } = options;
  const perBeam = Math.max(2, 1 + stopIds);
  const most = Math.floor(MAX_BEAM_CANDIDATES / perBeam);
  if (!Number.isInteger(beams) || beams < 1 || beams > most) throw new SequenceError(`beams must be an integer from 1 to ${most}, got ${beams}`);
  if (!Number.isFinite(lengthPenalty)) throw new SequenceError(`length penalty must be a finite number, got ${lengthPenalty}`);
  if (earlyStopping !== true && earlyStopping !== false && earlyStopping !== "never") {
    throw new SequenceError(`early stopping must be true, false or "never", got ${String(earlyStopping)}`);
  }
  if (!Number.isInteger(numReturnSequences) || numReturnSequences < 1 || numReturnSequences > beams) {
    throw new SequenceError(`num_return_sequences must be an integer from 1 to the beam width ${beams}, got ${numReturnSequences}`);
  }
  return { beams, lengthPenalty, earlyStopping, numReturnSequences };
}

/** A candidate continuation: beam `parent` (index into the live beams) followed by `token`. */
export interface Candidate {
  readonly parent: number;
  readonly token: number;
  /** The beam's sum of log-probabilities with this token's added. */
  readonly sum: number;
}

interface Finished {
  readonly tokens: number[];
  readonly score: number;
  readonly sumLogprobs: number;
  readonly finish: Generation["finish"];
  readonly routing: readonly LayerRouting[];
}

export interface BeamStateOptions {
  readonly beam: BeamSearchOptions;
  /** Token ids that end a hypothesis. */
  readonly stop: readonly number[];
  readonly maxNew: number;
  /** Default "length". */
  readonly limit?: "length" | "context";
}

/**
 * The search's bookkeeping for one request, free of the engine (so it is tested against the float64
 * reference on synthetic models too): live beams as (generated tokens, sum), the finished hypotheses,
 * and whether the search is over.
 */
export class BeamState {
  readonly options: Required<BeamSearchOptions>;
  /** Generated tokens and running sums of the live beams, in rank order. */
  beams: { tokens: number[]; sum: number }[] = [{ tokens: [], sum: 0 }];
  readonly #finished: Finished[] = [];
  #worst = 1e9;
  done = false;

  readonly stop: readonly number[];
  /** Most tokens a hypothesis may have (max_new_tokens, or less when the context is shorter). */
  readonly maxNew: number;
  /** What an unfinished hypothesis that reached maxNew ended by: its token budget or the context. */
  readonly limit: "length" | "context";

  constructor(options: BeamStateOptions) {
    this.stop = options.stop;
    this.maxNew = options.maxNew;
    this.limit = options.limit ?? "length";
    this.options = checkBeamOptions(options.beam, this.stop.length);
  }

  /** Candidates to ask of each beam's row. */
  get perBeam(): number {
    return Math.max(2, 1 + this.stop.length) * this.options.beams;
  }

  /**
   * One step: `rows[b]` holds beam b's candidates (tokens and log-probabilities, best first, at least
   * perBeam of them). Records finished hypotheses and returns the next beams' (parent, token), in rank
   * order, or none once the search is over (early stopping, or maxNew reached: the open beams are then
   * finished). `routing(b)` is beam b's routing so far, kept with a hypothesis that ends on it.
   */
  step(rows: readonly { readonly tokens: ArrayLike<number>; readonly logprobs: ArrayLike<number> }[], routing: (beam: number) => readonly LayerRouting[] = () => []): Candidate[] {
    if (this.done) throw new Error("beam search: step after the search ended");
    const { beams } = this.options;
    const all: Candidate[] = [];
    rows.forEach((row, parent) => {
      const base = this.beams[parent]!.sum;
      for (let j = 0; j < row.tokens.length; j++) all.push({ parent, token: row.tokens[j]!, sum: base + row.logprobs[j]! });
    });
    // A stable sort of (parent, rank) order: equal sums keep the lower beam, then the more likely token.
    all.sort((a, b) => b.sum - a.sum);
    const top = all.slice(0, this.perBeam);
    const length = this.beams[0]!.tokens.length + 1;
    const next: Candidate[] = [];
    for (let rank = 0; rank < top.length && next.length < beams; rank++) {
      const c = top[rank]!;
      if (!this.stop.includes(c.token)) next.push(c);
      else if (rank < beams) this.#add([...this.beams[c.parent]!.tokens, c.token], c.sum, "stop", routing(c.parent));
    }
    if (next.length < beams) throw new Error(`beam search: only ${next.length} of ${beams} candidates are not stop tokens`);
    this.done = this.#isDone(top[0]!.sum, length);
    const advanced = next.map((c) => ({ tokens: [...this.beams[c.parent]!.tokens, c.token], sum: c.sum }));
    if (!this.done && length >= this.maxNew) {
      advanced.forEach((b, i) => this.#add(b.tokens, b.sum, this.limit, routing(next[i]!.parent)));
      this.done = true;
    }
    this.beams = advanced;
    return this.done ? [] : next;
  }

  /** The numReturnSequences best hypotheses, best first. */
  results(): BeamSequence[] {
    const sorted = [...this.#finished].sort((a, b) => b.score - a.score);
    return sorted.slice(0, this.options.numReturnSequences).map((h) => ({
      tokens: h.tokens,
      score: h.score,
      sumLogprobs: h.sumLogprobs,
      finish: h.finish,
      routing: h.routing,
    }));
  }

  #add(tokens: number[], sum: number, finish: Finished["finish"], routing: readonly LayerRouting[]): void {
    const score = sum / tokens.length ** this.options.lengthPenalty;
    const kept = this.#finished;
    if (kept.length >= this.options.beams && score <= this.#worst) return;
    kept.push({ tokens, score, sumLogprobs: sum, finish, routing });
    if (kept.length > this.options.beams) {
      // Drop the worst (the earliest of equals); the new worst is the next one up.
      const order = kept.map((_, i) => i).sort((a, b) => kept[a]!.score - kept[b]!.score || a - b);
      this.#worst = kept[order[1]!]!.score;
      kept.splice(order[0]!, 1);
    } else {
      this.#worst = Math.min(score, this.#worst);
    }
  }

  #isDone(bestSum: number, length: number): boolean {
    const { beams, earlyStopping, lengthPenalty } = this.options;
    if (this.#finished.length < beams) return false;
    if (earlyStopping === true) return true;
    const len = earlyStopping === "never" && lengthPenalty > 0 ? this.maxNew : length;
    return this.#worst >= bestSum / len ** lengthPenalty;
  }
}

interface Search {
  readonly request: GenerateRequest;
  readonly state: BeamState;
  /** The engine sequences of the live beams, in the state's beam order. */
  seqs: Sequence[];
  logits?: readonly Float32Array[];
  steps: number;
  /** Whether the adapter has a router (its routing is reported). */
  readonly routed: boolean;
}

/**
 * Beam search for each request (each needs `beam`), the requests' beams decoded together in one
 * step. Needs `beams` free sequence slots per request.
 */
export async function beamSearchBatch(engine: SequenceRunner, requests: readonly GenerateRequest[]): Promise<Generation[]> {
  const searches: Search[] = [];
  const live = new Set<Sequence>();
  try {
    for (const request of requests) {
      const { sampling } = request;
      if ((sampling?.temperature ?? 0) > 0) throw new SequenceError("beam search is deterministic: temperature must be 0 (beam sampling is not supported)");
      if (!Number.isInteger(request.maxTokens) || request.maxTokens < 1) throw new SequenceError(`beam search needs maxTokens >= 1, got ${request.maxTokens}`);
      const seq = engine.createSequence(request.prompt, {
        ...(request.adapter === undefined ? {} : { adapter: request.adapter }),
        logits: request.logits ?? "none",
      });
      live.add(seq);
      const room = seq.ctx - request.prompt.length + 1;
      const maxNew = Math.min(request.maxTokens, room);
      const state = new BeamState({ beam: request.beam ?? { beams: 1 }, stop: request.stop ?? [], maxNew, limit: room < request.maxTokens ? "context" : "length" });
      seq.candidates = state.perBeam;
      searches.push({ request, state, seqs: [seq], steps: 0, routed: seq.tenant?.adapter.spec.router !== undefined });
    }
    const forks = searches.reduce((n, s) => n + s.state.options.beams - 1, 0);
    if (forks > engine.freeSlots) {
      const total = forks + searches.length;
      throw new EngineError(`beam search needs ${total} sequence slots (one per beam) but only ${engine.freeSlots + searches.length} are free: raise maxSequences`);
    }

    const started = performance.now();
    const first = await engine.prefill(searches.map((s) => s.seqs[0]!));
    const prefillMs = performance.now() - started;
    for (const s of searches) {
      const out = first.get(s.seqs[0]!)!;
      if (out.logits) s.logits = out.logits;
      s.seqs[0]!.logits = "none";
    }
    let outputs: Map<Sequence, StepOutput> = first;
    let decodeSteps = 0;
    const decodeStarted = performance.now();
    for (;;) {
      for (const s of searches.filter((s) => !s.state.done)) advance(engine, s, outputs, live);
      const running = searches.filter((s) => !s.state.done);
      if (running.length === 0) break;
      outputs = await engine.decode(running.flatMap((s) => s.seqs));
      decodeSteps++;
      for (const s of running) s.steps++;
    }
    const timings: GenerationTimings = {
      prefillTokens: requests.reduce((n, r) => n + r.prompt.length, 0),
      prefillMs,
      // One token of each returned sequence per step, the paper's tokens/s at beam > 1.
      decodeTokens: searches.reduce((n, s) => n + s.steps, 0),
      decodeSteps,
      decodeMs: performance.now() - decodeStarted,
    };
    return searches.map((s) => {
      const results = s.state.results();
      const best = results[0]!;
      return {
        tokens: best.tokens,
        finish: best.finish,
        score: best.score,
        beams: results,
        ...(s.logits ? { logits: s.logits } : {}),
        ...(s.routed && best.routing ? { routing: best.routing } : {}),
        timings,
      };
    });
  } finally {
    for (const seq of live) engine.release(seq);
  }
}

/**
 * Feeds one step's candidates to a search and lays its next beams onto sequences: the first child of a
 * beam keeps that beam's sequence, further children take over the sequences of beams without children
 * (Engine.adopt copies the differing cached positions) or, on the first step, forks of the prompt's
 * sequence. Each sequence then gets its new token; a finished search releases its sequences.
 */
function advance(engine: SequenceRunner, s: Search, outputs: ReadonlyMap<Sequence, StepOutput>, live: Set<Sequence>): void {
  const rows = s.seqs.map((seq) => outputs.get(seq)!.candidates!);
  const next = s.state.step(rows, (b) => s.seqs[b]!.routing.slice());
  if (s.state.done) {
    for (const seq of s.seqs) {
      engine.release(seq);
      live.delete(seq);
    }
    s.seqs = [];
    return;
  }
  const taken = new Set<number>();
  const spare = s.seqs.filter((_, b) => !next.some((c) => c.parent === b));
  const placed: Sequence[] = [];
  const adopt: { seq: Sequence; parent: Sequence }[] = [];
  for (const c of next) {
    const parent = s.seqs[c.parent]!;
    if (!taken.has(c.parent)) {
      taken.add(c.parent);
      placed.push(parent);
      continue;
    }
    const seq = spare.pop();
    if (seq) {
      adopt.push({ seq, parent });
      placed.push(seq);
    } else {
      // The first step: one beam (the prompt) has every child.
      const child = engine.fork(parent);
      live.add(child);
      placed.push(child);
    }
  }
  engine.adopt(adopt);
  for (const seq of spare) {
    engine.release(seq);
    live.delete(seq);
  }
  next.forEach((c, i) => placed[i]!.append([c.token]));
  s.seqs = placed;
}
