// The scheduling policy on a scripted engine (each token determined by the previous one), so that
// admission order, queue bounds, cancellation and failures can be watched step by step. The real
// engine under the scheduler is exercised through the server's tests.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { QueueFullError, RequestError, Scheduler, type AdapterResidency, type GenerationRequest, type StepEngine } from "../../../runtime/serving/scheduler.ts";
import { Sequence, type SamplingOptions } from "../../../runtime/engine/sequence.ts";

const VOCAB = 100;
const CTX = 32;

/** The scripted model: the token after `t` is (3t + 1) mod VOCAB. */
const next = (t: number) => (3 * t + 1) % VOCAB;

class ScriptedEngine implements StepEngine {
  readonly free: number[];
  /** Prompts in the order they got a slot, with the adapter they asked for. */
  readonly admitted: { prompt: readonly number[]; adapter?: string }[] = [];
  /** Sequence ids in each step. */
  readonly steps: number[][] = [];
  failNextStep = false;
  #id = 0;

  constructor(slots: number) {
    this.free = Array.from({ length: slots }, (_, i) => i);
  }

  createSequence(prompt: readonly number[], options: { sampling?: SamplingOptions; adapter?: string }): Sequence {
    const slot = this.free.shift();
    if (slot === undefined) throw new Error("no free slot: the scheduler admitted beyond its slots");
    const seq = new Sequence({ id: this.#id++, slot, ctx: CTX, vocab: VOCAB, sampling: { temperature: 0, topK: 0, topP: 1, seed: 0, minP: 0 } });
    seq.append(prompt);
    this.admitted.push({ prompt, ...(options.adapter === undefined ? {} : { adapter: options.adapter }) });
    return seq;
  }

  async prefill(seqs: readonly Sequence[]): Promise<Map<Sequence, { token: number }>> {
    await new Promise((r) => setImmediate(r));
    this.steps.push(seqs.map((s) => s.id));
    if (this.failNextStep) {
      this.failNextStep = false;
      throw new Error("device lost");
    }
    for (const s of seqs) s.cached = s.tokens.length;
    return new Map(seqs.map((s) => [s, { token: next(s.tokens.at(-1)!) }]));
  }

  release(seq: Sequence): void {
    seq.markReleased();
    this.free.push(seq.slot);
  }

  /** As the engine's: a new slot holding the parent's state. */
  fork(parent: Sequence, sampling?: SamplingOptions): Sequence {
    const slot = this.free.shift();
    if (slot === undefined) throw new Error("no free slot: the scheduler forked beyond its slots");
    const child = new Sequence({ id: this.#id++, slot, ctx: CTX, vocab: VOCAB, sampling: { temperature: 0, topK: 0, topP: 1, minP: 0, seed: sampling?.seed ?? 0 } });
    child.copyStateFrom(parent);
    this.forks.push(child.sampling.seed);
    return child;
  }

  /** Seeds of the sequences forked, in order. */
  readonly forks: number[] = [];
}

function expected(prompt: readonly number[], count: number): number[] {
  const out: number[] = [];
  for (let t = prompt.at(-1)!; out.length < count; ) out.push((t = next(t)));
  return out;
}

function setup(slots: number, maxQueue = 16, adapters?: AdapterResidency) {
  const engine = new ScriptedEngine(slots);
  const scheduler = new Scheduler({ engine, slots, ctx: CTX, maxQueue, ...(adapters ? { adapters } : {}) });
  return { engine, scheduler };
}

const request = (tenant: string, first: number, maxTokens = 3): GenerationRequest => ({ tenant, prompt: [first, first + 1], maxTokens });

test("every request gets the tokens it would get alone, with sequences joining and leaving the batch", async () => {
  const { engine, scheduler } = setup(2);
  const requests = [request("a", 10, 5), request("b", 20, 2), request("a", 30, 4), request("c", 40, 1)];
  const results = await Promise.all(requests.map((r) => scheduler.submit(r)));
  results.forEach((r, i) => {
    assert.equal(r.tokens, expected(requests[i]!.prompt, requests[i]!.maxTokens));
    assert.is(r.finish, "length");
  });
  assert.ok(engine.steps.every((s) => s.length <= 2), "never more sequences than slots");
  assert.ok(engine.steps.some((s) => s.length === 2), "sequences shared steps");
  assert.is(engine.free.length, 2, "every slot back in the pool");
  assert.is(scheduler.stats().running, 0);
});

test("a free slot goes to the tenant with the fewest running sequences, then the longest unserved", async () => {
  const { engine, scheduler } = setup(1);
  const requests = [request("a", 1), request("a", 2), request("a", 3), request("b", 4), request("b", 5), request("c", 6)];
  await Promise.all(requests.map((r) => scheduler.submit(r)));
  // a's first request took the free slot at once; then b and c were served before a's backlog.
  assert.equal(
    engine.admitted.map((a) => a.prompt[0]),
    [1, 4, 6, 2, 5, 3],
  );
});

test("beyond the slots and the queue, submit refuses at once with a retry delay", async () => {
  const { scheduler } = setup(1, 2);
  const accepted = [scheduler.submit(request("a", 1)), scheduler.submit(request("a", 2)), scheduler.submit(request("b", 3))];
  try {
    void scheduler.submit(request("b", 4));
    assert.unreachable("a fourth request fits in neither the slot nor the queue of two");
  } catch (e) {
    assert.instance(e, QueueFullError);
    assert.ok((e as QueueFullError).retryAfterSeconds >= 1);
  }
  assert.is(scheduler.stats().rejected, 1);
  assert.is((await Promise.all(accepted)).length, 3);
  await scheduler.submit(request("b", 4)); // room again once the others are done
});

test("n choices: the prompt is prefilled once and forked with seed + i; their slots are reserved, so a later request waits rather than taking them", async () => {
  const { engine, scheduler } = setup(3);
  const tokens: number[][] = [[], [], []];
  const three = scheduler.submit({ ...request("a", 10, 4), n: 3, sampling: { seed: 7 }, onToken: (t, _r, info) => void tokens[info.choice]!.push(t) });
  const other = scheduler.submit(request("b", 50, 2));
  const [r, o] = await Promise.all([three, other]);
  assert.is(r.choices.length, 3);
  for (const c of r.choices) assert.equal(c.tokens, expected([10, 11], 4));
  assert.equal(tokens, r.choices.map((c) => c.tokens));
  assert.equal(engine.forks, [8, 9]);
  // The prompt ran once: one admission for the three choices, and b came after them.
  assert.equal(engine.admitted.map((a) => a.prompt[0]), [10, 50]);
  assert.ok(engine.steps.every((s) => s.length <= 3));
  assert.equal(o.tokens, expected([50, 51], 2));
  assert.is(engine.free.length, 3, "every slot back");
  assert.throws(() => void scheduler.submit({ ...request("a", 1), n: 4 }), (e: unknown) => e instanceof RequestError);
});

const isRequestError = (e: unknown) => e instanceof RequestError;

test("requests the context cannot hold are refused before they queue", () => {
  const { scheduler } = setup(1);
  assert.throws(() => scheduler.submit({ tenant: "a", prompt: Array.from({ length: CTX }, (_, i) => i), maxTokens: 1 }), isRequestError);
  assert.throws(() => scheduler.submit({ tenant: "a", prompt: [1], maxTokens: 0 }), isRequestError);
  assert.is(scheduler.stats().queued, 0);
});

test("a stop token, a stop from onToken and a full context each end a generation", async () => {
  const { scheduler } = setup(3);
  const prompt = [7, 8];
  const [t1, t2] = expected(prompt, 2);
  const seen: number[] = [];
  const [byToken, byCallback, byContext] = await Promise.all([
    scheduler.submit({ tenant: "a", prompt, maxTokens: 10, stopTokens: [t2!] }),
    scheduler.submit({ tenant: "a", prompt, maxTokens: 10, onToken: (t) => (seen.push(t), t === t1 ? "stop" : undefined) }),
    scheduler.submit({ tenant: "a", prompt: Array.from({ length: CTX - 3 }, (_, i) => i), maxTokens: 10 }),
  ]);
  assert.equal(byToken.tokens, [t1, t2]);
  assert.is(byToken.finish, "stop");
  assert.equal(byCallback.tokens, [t1]);
  assert.equal(seen, [t1]);
  assert.is(byCallback.finish, "stop");
  // CTX - 3 prompt tokens leave room for 3 more in the cache: the fourth sampled token has no place.
  assert.is(byContext.tokens.length, 4);
  assert.is(byContext.finish, "context");
});

test("aborting frees the slot at the next step, whether the request runs or waits", async () => {
  const { engine, scheduler } = setup(1);
  const running = new AbortController();
  const waiting = new AbortController();
  const tokens: number[] = [];
  const first = scheduler.submit({
    ...request("a", 1, 20),
    signal: running.signal,
    onToken: (t) => {
      tokens.push(t);
      if (tokens.length === 2) running.abort();
    },
  });
  const second = scheduler.submit({ ...request("b", 2, 20), signal: waiting.signal });
  const third = scheduler.submit(request("c", 3, 2));
  waiting.abort();
  const [a, b, c] = await Promise.all([first, second, third]);
  assert.is(a.finish, "cancelled");
  assert.is(a.tokens.length, 2);
  assert.is(b.finish, "cancelled");
  assert.is(b.tokens.length, 0);
  assert.equal(c.tokens, expected([3, 4], 2));
  assert.equal(engine.admitted.map((x) => x.prompt[0]), [1, 3], "the aborted waiter never took a slot");
  assert.is(engine.free.length, 1);
});

test("a request waiting for its adapter does not hold up the others", async () => {
  let loaded!: () => void;
  const pins = new Map<string, number>();
  const adapters: AdapterResidency = {
    acquire: async (name) => {
      if (name === "cold") await new Promise<void>((r) => (loaded = r));
      pins.set(name, (pins.get(name) ?? 0) + 1);
    },
    release: (name) => void pins.set(name, pins.get(name)! - 1),
  };
  const { engine, scheduler } = setup(2, 16, adapters);
  const cold = scheduler.submit({ ...request("cold", 1, 2), adapter: "cold" });
  const warm = await scheduler.submit({ ...request("warm", 5, 4), adapter: "warm" });
  assert.equal(warm.tokens, expected([5, 6], 4));
  assert.equal(engine.admitted, [{ prompt: [5, 6], adapter: "warm" }]);
  loaded();
  assert.equal((await cold).tokens, expected([1, 2], 2));
  assert.equal(engine.admitted.at(-1), { prompt: [1, 2], adapter: "cold" });
  assert.equal(Object.fromEntries(pins), { cold: 0, warm: 0 }, "every pin given back");
});

test("an engine failure fails the requests of that step and the scheduler goes on", async () => {
  const { engine, scheduler } = setup(2);
  engine.failNextStep = true;
  const failed = await scheduler.submit(request("a", 1)).then(
    () => undefined,
    (e: Error) => e,
  );
  assert.match(failed?.message ?? "", /device lost/);
  assert.equal((await scheduler.submit(request("a", 1))).tokens, expected([1, 2], 3));
  assert.equal(scheduler.stats().tenants.get("a")?.finished, { error: 1, length: 1 });
  assert.is(engine.free.length, 2);
});

test("drain takes nothing new and resolves when the work in hand is done", async () => {
  const { scheduler } = setup(1);
  const inFlight = scheduler.submit(request("a", 1, 5));
  const drained = scheduler.drain();
  assert.throws(() => scheduler.submit(request("a", 2)), /shutting down/);
  await drained;
  assert.is((await inFlight).tokens.length, 5);
});

test.run();
