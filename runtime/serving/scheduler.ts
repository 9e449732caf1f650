// Continuous batching: requests wait in a bounded queue until a KV cache slot is free, are prefilled in
// the next step (their routing computed once, there) and then decode with everyone else, one token per
// step, leaving the batch the moment they finish, stop or their client goes away. Admission is fair
// across tenants: the tenant with the fewest running sequences goes first, ties by who waited longest.
import { LogitAdjust, penaltiesActive, type PenaltySettings } from "../engine/logit-adjust.ts";
import type { LayerRouting } from "../engine/routing.ts";
import type { GenerateRequest, Generation } from "../engine/requests.ts";
import type { Sequence, SamplingOptions } from "../engine/sequence.ts";
import { MiloraError } from "../errors.ts";

/** What the scheduler needs of an engine; runtime/engine.ts's Engine provides it. */
export interface StepEngine {
  /** A new sequence in a free KV cache slot; throws when the prompt or sampling options are bad. */
  createSequence(prompt: readonly number[], options: { readonly sampling?: SamplingOptions; readonly adapter?: string }): Sequence;
  /** Runs every pending token of `seqs` in shared steps; returns the token sampled after each. */
  prefill(seqs: readonly Sequence[]): Promise<Map<Sequence, StepResult>>;
  /**
   * A new sequence in a free slot holding everything `parent` holds (tokens, routing decision, cached
   * keys and values, copied on the device), sampling with `sampling`: how n > 1 choices share a prompt.
   */
  fork?(parent: Sequence, sampling?: SamplingOptions): Sequence;
  /** Runs whole requests (the scheduler uses it for beam search; engine.ts's generateBatch). */
  generateBatch?(requests: readonly GenerateRequest[]): Promise<Generation[]>;
  /** Ends a sequence and frees its slot. */
  release(seq: Sequence): void;
}

/** What one step gives back for a sequence: the token, and with logprobs asked for, their values. */
export interface StepResult {
  readonly token: number;
  /** The most likely next tokens with their log-probabilities (the sequence's `candidates` count). */
  readonly candidates?: { readonly tokens: ArrayLike<number>; readonly logprobs: ArrayLike<number> };
  /** The sampled token's log-probability under the model's distribution, when asked for. */
  readonly logprob?: number;
}

/** Per generated token, what onToken learns besides the token. */
export interface TokenInfo {
  /** Which of the request's n choices the token belongs to (0 when n is 1). */
  readonly choice: number;
  /** The token's log-probability (model distribution before penalties, bias and temperature), with `logprobs`. */
  readonly logprob?: number;
  /** The `logprobs` most likely tokens at this position, largest first, with `logprobs` > 0. */
  readonly top?: readonly { readonly token: number; readonly logprob: number }[];
}

/** Keeps an adapter resident while sequences use it (AdapterPool implements it). */
export interface AdapterResidency {
  /** Resolves once `name` is resident and pinned for one more sequence. */
  acquire(name: string): Promise<void>;
  /** Unpins one use of `name`. */
  release(name: string): void;
}

export interface SchedulerOptions {
  readonly engine: StepEngine;
  /** KV cache slots the scheduler may fill (at most the engine's). */
  readonly slots: number;
  /** Positions per sequence: prompt plus generated tokens must fit. */
  readonly ctx: number;
  /** Requests that may wait for a slot; beyond it submit throws QueueFullError. */
  readonly maxQueue: number;
  /** Present when requests name adapters that must be made resident first. */
  readonly adapters?: AdapterResidency;
}

export interface GenerationRequest {
  /** Whose request this is, for fairness and metrics (the adapter name, or the base model's). */
  readonly tenant: string;
  /** The adapter to run with; none runs the base model. */
  readonly adapter?: string;
  readonly prompt: readonly number[];
  readonly maxTokens: number;
  readonly sampling?: SamplingOptions;
  /**
   * Parallel choices of one prompt (default 1): the prompt is prefilled once, its routing decision made
   * once, and the other n - 1 choices fork its KV cache on the device; choice i samples with seed + i.
   */
  readonly n?: number;
  /** Repetition, frequency and presence penalties and logit bias, applied on the device (per choice). */
  readonly penalties?: PenaltySettings;
  /** Per token, the sampled token's log-probability and this many of the most likely (0 for only the sampled one's). */
  readonly logprobs?: number;
  /** Token ids that end generation (kept in the output). */
  readonly stopTokens?: readonly number[];
  /**
   * Beam search (the engine's, Hugging Face's meaning) instead of sampling: `n` is the number of
   * hypotheses returned, best first. It takes `beams` slots; onToken is not called (hypotheses are
   * known at the end).
   */
  readonly beam?: { readonly beams: number; readonly lengthPenalty?: number; readonly earlyStopping?: boolean | "never" };
  /**
   * Called with each generated token and the routing decisions made since the last call (a prompt's
   * with the first token; a token-routed adapter's with every token). Returning "stop" ends the
   * generation there (a stop string).
   */
  readonly onToken?: (token: number, routing: readonly LayerRouting[], info: TokenInfo) => "stop" | void;
  /** Aborting it (a client disconnecting) ends the request and frees its slot at the next step. */
  readonly signal?: AbortSignal;
}

/** `length`: maxTokens; `stop`: a stop token or onToken said so; `context`: the slot is full; `cancelled`: aborted. */
export type FinishReason = "length" | "stop" | "context" | "cancelled";

export interface GenerationResult {
  readonly tokens: readonly number[];
  readonly finish: FinishReason;
  /** Every routing decision of the sequence (none for the base model). */
  readonly routing: readonly LayerRouting[];
  /** Milliseconds from submit to the first generated token, and from it to the last. */
  readonly timeToFirstTokenMs: number;
  readonly decodeMs: number;
  /** Milliseconds the request waited for a slot (and its adapter). */
  readonly queueMs: number;
  /** Every choice's result, choice 0 first (the result itself, whose fields are choice 0's). */
  readonly choices: readonly ChoiceResult[];
}

/** One choice of a request (with beam search, a hypothesis and its score). */
export type ChoiceResult = Omit<GenerationResult, "choices"> & { readonly score?: number };

/** The queue is full: the caller should retry after `retryAfterSeconds`. */
export class QueueFullError extends MiloraError {
  override name = "QueueFullError";
  readonly kind = "capacity";
  constructor(readonly retryAfterSeconds: number) {
    super(`the server is at capacity (every slot busy and the queue full); retry after ${retryAfterSeconds} s`);
  }
}

/** A request the scheduler refuses as given (too long for the context, bad token budget). */
export class RequestError extends MiloraError {
  override name = "RequestError";
  readonly kind = "request";
}

/** The scheduler is draining and takes no new requests. */
export class DrainingError extends MiloraError {
  override name = "DrainingError";
  readonly kind = "capacity";
}

/** Counters for /metrics: gauges now, totals since start. */
export interface SchedulerStats {
  readonly slots: number;
  readonly running: number;
  readonly queued: number;
  /** Sequences in the last step. */
  readonly batchSize: number;
  readonly steps: number;
  readonly generatedTokens: number;
  /** Generated tokens per second over the last few seconds. */
  readonly tokensPerSecond: number;
  readonly rejected: number;
  /** Per tenant: finished requests by finish reason, and generated tokens. */
  readonly tenants: ReadonlyMap<string, { readonly finished: Readonly<Partial<Record<FinishReason | "error", number>>>; readonly tokens: number }>;
}

interface Job {
  readonly request: GenerationRequest;
  /** The choice this job computes (0 for the request's own job; forks carry 1..n-1). */
  readonly choice: number;
  /** The request's choices, shared by its jobs; the request's promise settles once all are done. */
  readonly group: Group;
  readonly submitted: number;
  readonly tokens: number[];
  readonly resolve: (r: GenerationResult) => void;
  readonly reject: (e: unknown) => void;
  /** False while its adapter is loading. */
  ready: boolean;
  seq?: Sequence;
  firstTokenAt?: number;
  /** Routing decisions already handed to onToken. */
  routingSent: number;
  /** Whether it holds an adapter pin to give back. */
  pinned: boolean;
  /** When it got its slot. */
  admittedAt?: number;
}

interface Group {
  readonly n: number;
  readonly results: (ChoiceResult | undefined)[];
  /** Choices still running or not yet forked. */
  open: number;
  /** Whether choices 1..n-1 have forked (their reserved slots are theirs now). */
  forked: boolean;
  failed: boolean;
}

const RATE_WINDOW_MS = 5000;

export class Scheduler {
  readonly #opts: SchedulerOptions;
  readonly #waiting: Job[] = [];
  readonly #running = new Set<Job>();
  readonly #tenants = new Map<string, { finished: Partial<Record<FinishReason | "error", number>>; tokens: number }>();
  /** When each tenant last had a request admitted, for round-robin among equals. */
  readonly #lastAdmitted = new Map<string, number>();
  readonly #recentSteps: { at: number; tokens: number }[] = [];
  #admissions = 0;
  #batchSize = 0;
  #steps = 0;
  #generated = 0;
  #rejected = 0;
  #draining = false;
  readonly #roots = new WeakMap<Group, Job>();
  /** Beam search requests running, with the slots each holds. */
  readonly #searching = new Map<Job, number>();
  #loop: Promise<void> | undefined;
  /** Average milliseconds a request holds a slot, for Retry-After. */
  #meanServiceMs = 1000;

  constructor(options: SchedulerOptions) {
    if (!Number.isInteger(options.slots) || options.slots < 1) throw new RangeError(`slots must be a positive integer, got ${options.slots}`);
    if (!Number.isInteger(options.maxQueue) || options.maxQueue < 0) throw new RangeError(`maxQueue must be an integer >= 0, got ${options.maxQueue}`);
    this.#opts = options;
  }

  /**
   * Queues a request and resolves when it finishes (cancelled requests resolve too, with what they had).
   * Throws at once, without queueing, with RequestError, QueueFullError or DrainingError.
   */
  submit(request: GenerationRequest): Promise<GenerationResult> {
    if (this.#draining) throw new DrainingError("the server is shutting down");
    const { prompt, maxTokens } = request;
    if (prompt.length === 0) throw new RequestError("the prompt has no tokens");
    if (!Number.isInteger(maxTokens) || maxTokens < 1) throw new RequestError(`max_tokens must be an integer >= 1, got ${maxTokens}`);
    const n = request.n ?? 1;
    if (!Number.isInteger(n) || n < 1) throw new RequestError(`n must be an integer >= 1, got ${n}`);
    if (n > this.#opts.slots) throw new RequestError(`n = ${n} choices need ${n} sequence slots at once; this server has ${this.#opts.slots}`);
    if (n > 1 && !request.beam && !this.#opts.engine.fork) throw new RequestError("this engine cannot fork sequences: n must be 1");
    if (request.beam) {
      if (!this.#opts.engine.generateBatch) throw new RequestError("this engine has no beam search");
      if (request.beam.beams > this.#opts.slots) throw new RequestError(`beam search of width ${request.beam.beams} needs ${request.beam.beams} sequence slots at once; this server has ${this.#opts.slots}`);
    }
    if (prompt.length >= this.#opts.ctx) {
      throw new RequestError(`the prompt has ${prompt.length} tokens; this server's context holds ${this.#opts.ctx} positions, prompt and output together`);
    }
    // Jobs waiting for a slot that is free now are about to join the batch, not queueing behind it.
    if (this.#running.size + this.#searching.size + this.#waiting.length >= this.#opts.slots + this.#opts.maxQueue) {
      this.#rejected++;
      throw new QueueFullError(this.#retryAfterSeconds());
    }
    return new Promise<GenerationResult>((resolve, reject) => {
      const group: Group = { n: request.beam ? 1 : n, results: [], open: request.beam ? 1 : n, failed: false, forked: false };
      const job: Job = { request, choice: 0, group, submitted: performance.now(), tokens: [], resolve, reject, ready: request.adapter === undefined, pinned: false, routingSent: 0 };
      this.#roots.set(group, job);
      this.#waiting.push(job);
      request.signal?.addEventListener("abort", () => this.#cancelWaiting(job), { once: true });
      if (!job.ready) this.#pinAdapter(job);
      this.#wake();
    });
  }

  /** Takes no new requests and resolves once every queued and running one has finished. */
  async drain(): Promise<void> {
    this.#draining = true;
    // Jobs whose adapter is still loading are in no loop yet, so wait on them by polling.
    while (this.#running.size + this.#searching.size + this.#waiting.length > 0) await (this.#loop ?? new Promise((r) => setTimeout(r, 20)));
  }

  get draining(): boolean {
    return this.#draining;
  }

  stats(): SchedulerStats {
    const now = performance.now();
    while (this.#recentSteps.length > 0 && now - this.#recentSteps[0]!.at > RATE_WINDOW_MS) this.#recentSteps.shift();
    const recent = this.#recentSteps.reduce((n, s) => n + s.tokens, 0);
    return {
      slots: this.#opts.slots,
      // A beam search holds all its beams' slots.
      running: this.#running.size + [...this.#searching.values()].reduce((a, b) => a + b, 0),
      queued: this.#waiting.length,
      batchSize: this.#batchSize,
      steps: this.#steps,
      generatedTokens: this.#generated,
      tokensPerSecond: recent / (RATE_WINDOW_MS / 1000),
      rejected: this.#rejected,
      tenants: this.#tenants,
    };
  }

  #retryAfterSeconds(): number {
    // One slot frees about every mean-service-time / slots; the whole queue has to go before a newcomer.
    const perSlot = this.#meanServiceMs / this.#opts.slots;
    return Math.max(1, Math.ceil(((this.#waiting.length + 1) * perSlot) / 1000));
  }

  #pinAdapter(job: Job): void {
    const { adapters } = this.#opts;
    const name = job.request.adapter!;
    if (!adapters) {
      job.ready = true;
      return;
    }
    adapters.acquire(name).then(
      () => {
        job.pinned = true;
        job.ready = true;
        // Cancelled while loading: nothing will run it, so give the pin straight back.
        if (!this.#waiting.includes(job)) this.#unpin(job);
        this.#wake();
      },
      (e: unknown) => {
        const at = this.#waiting.indexOf(job);
        if (at < 0) return;
        this.#waiting.splice(at, 1);
        this.#fail(job, e);
      },
    );
  }

  #unpin(job: Job): void {
    if (!job.pinned) return;
    job.pinned = false;
    this.#opts.adapters?.release(job.request.adapter!);
  }

  #cancelWaiting(job: Job): void {
    const at = this.#waiting.indexOf(job);
    if (at < 0) return; // running: the loop sees the signal after its step
    this.#waiting.splice(at, 1);
    this.#finish(job, "cancelled");
  }

  #wake(): void {
    if (this.#loop) return;
    this.#loop = this.#run().finally(() => {
      this.#loop = undefined;
      // Work that arrived while the loop was ending its last await, if it can start now: a request
      // waiting for slots that a beam search or forking choices hold waits for them to end (they wake
      // the loop), else this would spin without ever yielding to the event loop.
      const next = this.#nextFair();
      if (next && this.#fits(next)) this.#wake();
    });
  }

  async #run(): Promise<void> {
    for (;;) {
      for (const job of this.#running) if (job.request.signal?.aborted) this.#finish(job, "cancelled");
      const joining = this.#admit();
      const batch = [...this.#running];
      if (batch.length === 0) return;
      // Decoders go first: when the rows run out, a long prompt's prefill is what gets chunked.
      const seqs = [...batch.filter((j) => !joining.includes(j)), ...joining].map((j) => j.seq!);
      let outputs: Map<Sequence, StepResult>;
      try {
        outputs = await this.#opts.engine.prefill(seqs);
      } catch (e) {
        for (const job of batch) this.#fail(job, e);
        continue;
      }
      this.#steps++;
      this.#batchSize = batch.length;
      const now = performance.now();
      this.#recentSteps.push({ at: now, tokens: batch.length });
      for (const job of joining) if (job.group.n > 1 && job.choice === 0) this.#forkChoices(job);
      // A job may have left the batch while it ran (its request failed as a whole).
      for (const job of batch) if (this.#running.has(job)) this.#accept(job, outputs.get(job.seq!)!, now);
    }
  }

  /** Moves waiting jobs into free slots, fairest tenant first; returns the jobs that joined. */
  #admit(): Job[] {
    const joined: Job[] = [];
    while (this.#occupied() < this.#opts.slots) {
      const job = this.#nextFair();
      if (!job) break;
      // Its n choices fork into slots of their own right after the prefill: they must be free now, and
      // stay free for it (slots other requests' choices will fork into are taken already).
      if (!this.#fits(job)) break;
      this.#waiting.splice(this.#waiting.indexOf(job), 1);
      const { request } = job;
      if (request.beam) {
        this.#search(job);
        continue;
      }
      try {
        job.seq = this.#opts.engine.createSequence(request.prompt, {
          ...(request.sampling ? { sampling: request.sampling } : {}),
          ...(request.adapter === undefined ? {} : { adapter: request.adapter }),
        });
        this.#equip(job.seq, request);
      } catch (e) {
        this.#fail(job, e);
        continue;
      }
      this.#lastAdmitted.set(request.tenant, ++this.#admissions);
      job.admittedAt = performance.now();
      this.#running.add(job);
      joined.push(job);
    }
    return joined;
  }

  /**
   * A beam search request runs on its own (the engine interleaves its steps with the batch's): it holds
   * `beams` slots until it ends, and is not part of the batch.
   */
  #search(job: Job): void {
    const { request } = job;
    const beam = request.beam!;
    job.admittedAt = performance.now();
    this.#lastAdmitted.set(request.tenant, ++this.#admissions);
    this.#searching.set(job, beam.beams);
    const n = request.n ?? 1;
    const run = this.#opts.engine.generateBatch!([
      {
        prompt: request.prompt,
        maxTokens: request.maxTokens,
        stop: request.stopTokens ?? [],
        ...(request.adapter === undefined ? {} : { adapter: request.adapter }),
        beam: { beams: beam.beams, numReturnSequences: n, ...(beam.lengthPenalty === undefined ? {} : { lengthPenalty: beam.lengthPenalty }), ...(beam.earlyStopping === undefined ? {} : { earlyStopping: beam.earlyStopping }) },
      },
    ]);
    run.then(
      ([g]) => {
        this.#searching.delete(job);
        this.#unpin(job);
        const now = performance.now();
        const queueMs = job.admittedAt! - job.submitted;
        const hypotheses = g!.beams ?? [{ tokens: g!.tokens, score: g!.score ?? NaN, finish: g!.finish, routing: g!.routing }];
        const choices: ChoiceResult[] = hypotheses.map((h) => ({
          tokens: h.tokens,
          finish: h.finish,
          routing: [...(h.routing ?? g!.routing ?? [])],
          timeToFirstTokenMs: job.admittedAt! - job.submitted + g!.timings.prefillMs,
          decodeMs: g!.timings.decodeMs,
          queueMs,
          score: h.score,
        }));
        this.#generated += choices.reduce((s, c) => s + c.tokens.length, 0);
        for (const c of choices) {
          this.#tenant(request.tenant).tokens += c.tokens.length;
          this.#count(request.tenant, c.finish);
        }
        this.#meanServiceMs = 0.9 * this.#meanServiceMs + 0.1 * (now - job.submitted);
        job.resolve({ ...choices[0]!, choices });
        this.#wake();
      },
      (e: unknown) => {
        this.#searching.delete(job);
        this.#unpin(job);
        this.#count(request.tenant, "error");
        job.reject(e);
        this.#wake();
      },
    );
  }

  /** Whether `job` (its n choices, or its beams) fits in the slots free now. */
  #fits(job: Job): boolean {
    return this.#occupied() + (job.request.beam?.beams ?? job.group.n) <= this.#opts.slots;
  }

  /** Slots held by running sequences plus those reserved for choices still to fork. */
  #occupied(): number {
    let n = this.#running.size;
    for (const beams of this.#searching.values()) n += beams;
    for (const job of this.#running) if (job.choice === 0 && job.group.n > 1 && !job.group.forked) n += job.group.n - 1;
    return n;
  }

  #nextFair(): Job | undefined {
    const runningBy = new Map<string, number>();
    for (const j of this.#running) runningBy.set(j.request.tenant, (runningBy.get(j.request.tenant) ?? 0) + 1);
    let best: Job | undefined;
    let bestKey: [number, number] = [Infinity, Infinity];
    for (const job of this.#waiting) {
      if (!job.ready) continue;
      const t = job.request.tenant;
      const key: [number, number] = [runningBy.get(t) ?? 0, this.#lastAdmitted.get(t) ?? 0];
      // Strictly better only, so within a tenant the oldest request wins.
      if (key[0] < bestKey[0] || (key[0] === bestKey[0] && key[1] < bestKey[1])) [best, bestKey] = [job, key];
    }
    return best;
  }

  /**
   * After a request's prefill (its prompt's keys, values and routing decision now cached), its other
   * choices fork its sequence into the slots reserved at admission. Each re-runs the prompt's last
   * token (its keys and values are rewritten, the same) so that it samples its own first token.
   */
  #forkChoices(parent: Job): void {
    const { request } = parent;
    const seq = parent.seq!;
    const seed = request.sampling?.seed ?? 0;
    const last = seq.cached - 1;
    parent.group.forked = true;
    for (let choice = 1; choice < parent.group.n; choice++) {
      const job: Job = {
        request,
        choice,
        group: parent.group,
        submitted: parent.submitted,
        tokens: [],
        resolve: () => undefined,
        reject: () => undefined,
        ready: true,
        pinned: false,
        routingSent: 0,
        ...(parent.admittedAt === undefined ? {} : { admittedAt: parent.admittedAt }),
      };
      try {
        const child = this.#opts.engine.fork!(seq, { ...request.sampling, seed: (seed + choice) >>> 0 });
        child.cached = last;
        // It samples the parent's first position again, with its own seed: the same step as the parent's draw there.
        child.sampled = seq.sampled - 1;
        // A token-routed adapter routes the re-run position again; a prompt's decision is kept as it is.
        if (child.gates === undefined) {
          const kept = child.routing.filter((d) => d.position !== last);
          child.routing.length = 0;
          child.routing.push(...kept);
        }
        this.#equip(child, request);
        job.seq = child;
      } catch (e) {
        this.#fail(job, e);
        continue;
      }
      // Its adapter pin is the parent's: one per request would be released early, so each choice takes one.
      if (request.adapter !== undefined && this.#opts.adapters) {
        const adapters = this.#opts.adapters;
        const name = request.adapter;
        adapters.acquire(name).then(
          () => {
            if (this.#running.has(job)) job.pinned = true;
            else adapters.release(name);
          },
          () => undefined,
        );
      }
      job.routingSent = job.seq.routing.length;
      this.#running.add(job);
    }
  }

  /** What a sequence needs beyond its sampling: logprobs read back, penalty and bias entries. */
  #equip(seq: Sequence, request: GenerationRequest): void {
    if (request.logprobs !== undefined) {
      seq.wantsLogprob = true;
      seq.candidates = request.logprobs;
    }
    seq.adjust = request.penalties && penaltiesActive(request.penalties) ? new LogitAdjust(request.prompt, request.penalties) : undefined;
  }

  /** Records a generated token; the sequence either takes it as its next input or leaves. */
  #accept(job: Job, output: StepResult, now: number): void {
    const { request } = job;
    const token = output.token;
    job.tokens.push(token);
    job.firstTokenAt ??= now;
    this.#generated++;
    this.#tenant(request.tenant).tokens++;
    let verdict: "stop" | void;
    try {
      const routing = job.seq!.routing;
      verdict = request.onToken?.(token, routing.slice(job.routingSent), tokenInfo(job.choice, request.logprobs, output));
      job.routingSent = routing.length;
    } catch (e) {
      this.#fail(job, e);
      return;
    }
    if (request.signal?.aborted) this.#finish(job, "cancelled");
    else if (verdict === "stop" || request.stopTokens?.includes(token)) this.#finish(job, "stop");
    else if (job.tokens.length >= request.maxTokens) this.#finish(job, "length");
    else if (!job.seq!.fits(1)) this.#finish(job, "context");
    else {
      job.seq!.adjust?.observe(token);
      job.seq!.append([token]);
    }
  }

  /** Takes a job out of the batch, if it is in it: frees its slot and its adapter pin. */
  #leave(job: Job): void {
    // The sequence goes before the pin: an adapter is evictable only once no sequence holds it.
    if (this.#running.delete(job)) this.#opts.engine.release(job.seq!);
    this.#unpin(job);
    if (!job.seq) return;
    this.#meanServiceMs = 0.9 * this.#meanServiceMs + 0.1 * (performance.now() - job.submitted);
  }

  #fail(job: Job, error: unknown): void {
    this.#leave(job);
    this.#count(job.request.tenant, "error");
    const { group } = job;
    if (group.failed) return;
    group.failed = true;
    // A request fails as a whole: its other choices stop at the next step.
    for (const other of this.#running) if (other.group === group) this.#leave(other);
    this.#root(group)?.reject(error);
  }

  #finish(job: Job, finish: FinishReason): void {
    this.#leave(job);
    this.#count(job.request.tenant, finish);
    const now = performance.now();
    const first = job.firstTokenAt;
    const { group } = job;
    if (group.failed) return;
    group.results[job.choice] = {
      tokens: job.tokens,
      finish,
      routing: [...(job.seq?.routing ?? [])],
      timeToFirstTokenMs: first === undefined ? NaN : first - job.submitted,
      decodeMs: first === undefined ? 0 : now - first,
      queueMs: (job.admittedAt ?? now) - job.submitted,
    };
    // A request cancelled before its prefill never forked: its other choices end with it.
    if (job.choice === 0 && (finish === "cancelled" || job.seq === undefined || job.tokens.length === 0) && !this.#hasForks(group)) {
      for (let i = 1; i < group.n; i++) group.results[i] ??= { ...group.results[0]!, tokens: [] };
      group.open = 1;
    }
    if (--group.open > 0) return;
    const choices = group.results.map((r) => r!);
    this.#root(group)?.resolve({ ...choices[0]!, choices });
  }

  /** The job that holds the request's promise (choice 0); its resolve is kept on the group's first job. */
  #root(group: Group): Job | undefined {
    return this.#roots.get(group);
  }

  #hasForks(group: Group): boolean {
    for (const j of this.#running) if (j.group === group && j.choice > 0) return true;
    return group.results.some((r, i) => i > 0 && r !== undefined);
  }

  #count(tenant: string, outcome: FinishReason | "error"): void {
    const t = this.#tenant(tenant);
    t.finished[outcome] = (t.finished[outcome] ?? 0) + 1;
  }

  #tenant(name: string) {
    let t = this.#tenants.get(name);
    if (!t) this.#tenants.set(name, (t = { finished: {}, tokens: 0 }));
    return t;
  }
}

function tokenInfo(choice: number, logprobs: number | undefined, output: StepResult): TokenInfo {
  if (logprobs === undefined) return { choice };
  const c = output.candidates;
  const top = c ? Array.from({ length: Math.min(logprobs, c.tokens.length) }, (_, i) => ({ token: c.tokens[i]!, logprob: c.logprobs[i]! })) : [];
  let logprob = output.logprob;
  if (logprob === undefined && c) {
    for (let i = 0; i < c.tokens.length; i++) if (c.tokens[i] === output.token) logprob = c.logprobs[i];
  }
  return { choice, ...(logprob === undefined ? {} : { logprob }), ...(logprobs > 0 ? { top } : {}) };
}
