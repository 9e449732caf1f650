// A sequence: one prompt and what has been generated after it, bound to a KV cache slot. The engine
// advances it by running its pending tokens (those not yet in the cache); the caller appends tokens.
import type { SamplingSettings } from "../gpu/layouts.ts";
import type { LogitAdjust } from "./logit-adjust.ts";
import type { Tenant } from "./tenants.ts";
import type { LayerRouting } from "./routing.ts";
import { MiloraError } from "../errors.ts";

/** How the next token is picked; temperature 0 (the default) is greedy. */
export interface SamplingOptions {
  readonly temperature?: number;
  /** Keep the k most likely tokens; 0 (the default) for no limit. */
  readonly topK?: number;
  /** Keep the smallest most likely set with this probability mass; 1 (the default) for no limit. */
  readonly topP?: number;
  /** Drop tokens whose probability is below minP times the most likely one's; 0 (the default) for off. */
  readonly minP?: number;
  readonly seed?: number;
}

/** Which logits a step reads back for a sequence: none, its last row's, or every row's. */
export type LogitsMode = "none" | "last" | "all";

/** A user-supplied value that cannot be used: bad token ids, sampling options, or a full context. */
export class SequenceError extends MiloraError {
  override name = "SequenceError";
  readonly kind = "request";
}

export function checkSampling(s: SamplingOptions): Required<SamplingOptions> {
  const { temperature = 0, topK = 0, topP = 1, seed = 0, minP = 0 } = s;
  if (!(temperature >= 0) || !Number.isFinite(temperature)) throw new SequenceError(`temperature must be a number >= 0, got ${temperature}`);
  if (!Number.isInteger(topK) || topK < 0) throw new SequenceError(`top-k must be an integer >= 0, got ${topK}`);
  if (!(topP > 0 && topP <= 1)) throw new SequenceError(`top-p must be in (0, 1], got ${topP}`);
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new SequenceError(`seed must be an integer from 0 to 2^32-1, got ${seed}`);
  if (!(minP >= 0 && minP <= 1)) throw new SequenceError(`min-p must be in [0, 1], got ${minP}`);
  return { temperature, topK, topP, seed, minP };
}

export interface SequenceOptions {
  readonly id: number;
  readonly slot: number;
  readonly ctx: number;
  readonly vocab: number;
  readonly sampling: Required<SamplingOptions>;
  readonly tenant?: Tenant;
}

export class Sequence {
  readonly #tokens: number[] = [];
  /** Tokens whose keys and values are in the cache (the next token's position). */
  cached = 0;
  /** Tokens sampled so far: the sampler's step counter, so (seed, step) reproduces a draw. */
  sampled = 0;
  #released = false;
  /** Logits the next steps read back for this sequence (the sampled token always comes back). */
  logits: LogitsMode = "none";
  /**
   * Beam search: how many of the most likely next tokens, with their log-probabilities, a step that
   * ends this sequence's pending tokens reads back (0: none, the usual case).
   */
  candidates = 0;
  /**
   * Penalties and logit bias applied on the device before sampling (logit-adjust.ts); the owner updates
   * it with each token it keeps. Not copied by copyStateFrom: each choice counts its own tokens.
   */
  adjust: LogitAdjust | undefined;
  /** Whether each step also reads back the sampled token's log-probability (raw logits). */
  wantsLogprob = false;
  /**
   * Gates of every (layer, module) (see routing.ts) once known: at creation for plain LoRA, after the
   * prompt's prefill for prompt routing; never for token routing, which routes every step.
   */
  gates: Float32Array | undefined;
  /** The routing decisions so far: one per routed layer (prompt), or per layer and position (token). */
  readonly routing: LayerRouting[] = [];

  readonly id: number;
  /** Its KV cache slot. */
  readonly slot: number;
  readonly ctx: number;
  readonly vocab: number;
  readonly sampling: Required<SamplingOptions>;
  /** The tenant (resident adapter) the sequence runs with; undefined runs the base alone. */
  readonly tenant: Tenant | undefined;

  /** Use Engine.createSequence. */
  constructor(options: SequenceOptions) {
    this.id = options.id;
    this.slot = options.slot;
    this.ctx = options.ctx;
    this.vocab = options.vocab;
    this.sampling = options.sampling;
    this.tenant = options.tenant;
  }

  get tokens(): readonly number[] {
    return this.#tokens;
  }

  /** Tokens appended but not yet run through the model. */
  get pending(): number {
    return this.#tokens.length - this.cached;
  }

  get released(): boolean {
    return this.#released;
  }

  /** Whether `count` more tokens still fit in the context. */
  fits(count: number): boolean {
    return this.#tokens.length + count <= this.ctx;
  }

  /** Appends tokens to run next (a prompt, a sampled token, or forced tokens). */
  append(tokens: readonly number[]): void {
    if (this.#released) throw new SequenceError(`sequence ${this.id} was released`);
    for (const t of tokens) {
      if (!Number.isInteger(t) || t < 0 || t >= this.vocab) throw new SequenceError(`token ${t} is outside the vocabulary (0..${this.vocab - 1})`);
    }
    if (!this.fits(tokens.length)) {
      throw new SequenceError(`sequence of ${this.#tokens.length + tokens.length} tokens exceeds the context of ${this.ctx} positions`);
    }
    this.#tokens.push(...tokens);
  }

  /** The sampler's settings for the token that follows the current ones. */
  samplingSettings(): SamplingSettings {
    return { ...this.sampling, step: this.sampled };
  }

  /**
   * Becomes a copy of `other` (tokens, cache position, sampler step, routing so far, gates, logits and
   * candidates modes): a beam taking over another beam's history. The engine copies the cached keys and
   * values (Engine.fork, Engine.adopt); both sequences must run with the same adapter.
   */
  copyStateFrom(other: Sequence): void {
    if (this.#released) throw new SequenceError(`sequence ${this.id} was released`);
    if (other.tenant !== this.tenant || other.ctx !== this.ctx || other.vocab !== this.vocab) {
      throw new SequenceError(`sequence ${this.id} cannot take over sequence ${other.id}: they run with different adapters or contexts`);
    }
    this.#tokens.length = 0;
    this.#tokens.push(...other.tokens);
    this.cached = other.cached;
    this.sampled = other.sampled;
    this.logits = other.logits;
    this.candidates = other.candidates;
    this.wantsLogprob = other.wantsLogprob;
    // Gates are never written in place once known (a prompt's decision is shared by all its beams).
    this.gates = other.gates;
    this.routing.length = 0;
    this.routing.push(...other.routing);
  }

  /** Marks the sequence dead; the engine returns its slot. */
  markReleased(): void {
    this.#released = true;
  }
}
