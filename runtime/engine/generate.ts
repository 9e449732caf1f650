// Generation on top of the engine's steps: prefill the prompts together, then decode every live
// sequence in lockstep until each reaches its token budget, a stop token or the end of its context.
import { beamSearchBatch } from "./beam-search.ts";
import type { GenerateRequest, Generation, GenerationTimings, SequenceRunner } from "./requests.ts";
import type { Sequence } from "./sequence.ts";

export async function generate(engine: SequenceRunner, request: GenerateRequest): Promise<Generation> {
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

export async function generateBatch(engine: SequenceRunner, requests: readonly GenerateRequest[]): Promise<Generation[]> {
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
  engine: SequenceRunner,
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
      ...(l.seq.tenant?.adapter.spec.router ? { routing: [...l.seq.routing] } : {}),
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
