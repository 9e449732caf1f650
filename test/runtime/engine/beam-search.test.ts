// Beam search on the engine against the float64 beam search over the reference model
// (test/reference/beam.ts, Hugging Face's semantics): the base, a plain LoRA adapter, a MiLoRA adapter
// routed once per prompt (its one decision serves every beam) and the per-token baseline, on a tiny
// random checkpoint. Same sequences, scores within SCORE_BOUND; the prompt runs once and is forked.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { ROUTER_DEFAULTS } from "../../../compiler/defaults.ts";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { EXPERT_MODULES, type Adapter, type RouterConfig } from "../../../compiler/model.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import type { BeamSearchOptions } from "../../../runtime/engine/requests.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { Engine, EngineError } from "../../../runtime/engine/engine.ts";
import { SequenceError } from "../../../runtime/engine/sequence.ts";
import { loadReferenceWeights } from "../../reference/llama.ts";
import { logSoftmax, referenceBeamSearch, referenceNextLogprobs } from "../../reference/beam.ts";
import { foldLora, referenceMiloraLogits } from "../../reference/milora.ts";
import { plannedEngine } from "../../../bin/engine-plan.ts";

// Each step's log-probabilities are f32 on the device (logits within 1e-4 of their norm, see
// milora.test.ts; one f32 log-softmax) against float64: a few 1e-5 per token, summed over at most
// MAX_NEW tokens and divided by the length, so 1e-3 leaves a wide margin and still tells a wrong
// token (log-probability gaps here are 1e-2 and up) from rounding.
const SCORE_BOUND = 1e-3;
const MAX_NEW = 6;
const TINY = { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 97, maxPositions: 64, seed: 5 } as const;
const PROMPT = [5, 17, 3, 88, 42, 9, 60, 1, 33];

const root = mkdtempSync(join(tmpdir(), "milora-beam-"));
const checkpointDir = join(root, "tiny");
writeRandomCheckpoint(checkpointDir, TINY);
const { base, weights } = loadReferenceWeights(checkpointDir);
let gpu: GpuContext;
let engine: Engine;

test.before(async () => {
  gpu = await acquireDevice();
  engine = await Engine.load(plannedEngine({ base: readHfConfig(checkpointDir), checkpointDir, gpu, ctx: 64, maxSequences: 8, maxAdapters: 3, maxLoraRank: 8 }));
});
test.after(() => {
  engine.destroy();
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

function adapter(name: string, router: Partial<RouterConfig> | undefined, seed: number): LoadedAdapter {
  const spec: Adapter = {
    ...peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name }),
    ...(router ? { router: { ...ROUTER_DEFAULTS, noise: false, ...router } } : {}),
  };
  return randomAdapter({ spec, seed });
}

/** The reference's next-token log-probabilities with an adapter (its routing from the prompt span, or per token). */
function adapterLogprobs(a: LoadedAdapter) {
  return (tokens: readonly number[]) =>
    logSoftmax(referenceMiloraLogits(base, weights, a, tokens.slice(0, PROMPT.length), tokens.slice(PROMPT.length)).logits.at(-1)!);
}

async function compare(label: string, next: (t: readonly number[]) => Float64Array, beam: BeamSearchOptions, stop: number[], adapterName?: string) {
  const want = referenceBeamSearch(next, PROMPT, {
    numBeams: beam.beams,
    maxNewTokens: MAX_NEW,
    eos: stop,
    lengthPenalty: beam.lengthPenalty ?? 1,
    earlyStopping: beam.earlyStopping ?? false,
    numReturnSequences: beam.numReturnSequences ?? 1,
  });
  const free = engine.freeSlots;
  const got = await engine.generate({ prompt: PROMPT, maxTokens: MAX_NEW, stop, beam, ...(adapterName ? { adapter: adapterName } : {}) });
  assert.is(engine.freeSlots, free, `${label}: every beam's slot is released`);
  assert.equal(got.beams!.map((b) => b.tokens), want.map((b) => b.tokens), label);
  assert.equal(got.tokens, want[0]!.tokens);
  got.beams!.forEach((b, i) => assert.ok(Math.abs(b.score - want[i]!.score) < SCORE_BOUND, `${label} #${i}: score ${b.score} vs ${want[i]!.score}`));
  assert.is(got.score, got.beams![0]!.score);
  assert.is(got.timings.prefillTokens, PROMPT.length, "the prompt runs once for all beams");
  return got;
}

/** A stop token the search meets: the second most likely first token (rank 1 < beams, so it ends a hypothesis). */
function stopFor(next: (t: readonly number[]) => Float64Array): number {
  const lp = next(PROMPT);
  return Array.from(lp, (_, i) => i).sort((a, b) => lp[b]! - lp[a]!)[1]!;
}

test("base model: beam 3 and 2 with every return sequence, length penalties, early stopping, an EOS", async () => {
  const next = referenceNextLogprobs(base, weights);
  const eos = stopFor(next);
  await compare("beam 3", next, { beams: 3, numReturnSequences: 3 }, []);
  await compare("beam 3, eos", next, { beams: 3, numReturnSequences: 3 }, [eos]);
  // Without a length penalty a sum only falls as tokens come, so the one-token EOS hypothesis wins.
  const short = await compare("beam 2, lp 0, early true", next, { beams: 2, lengthPenalty: 0, earlyStopping: true, numReturnSequences: 2 }, [eos]);
  assert.equal(short.tokens, [eos]);
  assert.is(short.finish, "stop");
  await compare("beam 4, lp 2, never", next, { beams: 4, lengthPenalty: 2, earlyStopping: "never", numReturnSequences: 2 }, [eos]);
});

test("plain LoRA and MiLoRA (prompt routing: one decision for every beam) and the per-token baseline", async () => {
  const cases = [
    ["lora", undefined],
    ["milora", { when: "prompt" }],
    ["token", { when: "token" }],
  ] as const;
  for (const [name, router] of cases) {
    const a = adapter(name, router, name.length + 3);
    engine.loadAdapter(name, a);
    try {
      const next = adapterLogprobs(a);
      const stop = [stopFor(next)];
      if (name === "milora") {
        // The beams against the reference model with the engine's own prompt decision folded in: what
        // MiLoRA means by one decision for all beams, apart from how the router reached it.
        const got = await engine.generate({ prompt: PROMPT, maxTokens: MAX_NEW, stop, beam: { beams: 3, numReturnSequences: 3 }, adapter: name });
        for (const b of got.beams!) assert.equal(b.routing, got.routing, "every beam carries the prompt's decision");
        assert.ok(got.routing!.every((d) => d.position === undefined), "routed once, on the prompt");
        const decided = referenceNextLogprobs(base, foldLora(weights, a, got.routing!));
        await compare(`${name}, its decision folded`, decided, { beams: 3, numReturnSequences: 3 }, stop, name);
      }
      const got = await compare(name, next, { beams: 3, numReturnSequences: 3 }, stop, name);
      if (name === "token") assert.ok(got.routing!.some((d) => d.position !== undefined && d.position >= PROMPT.length), "each beam routes its own tokens");
    } finally {
      engine.unloadAdapter(name);
    }
  }
});

test("beam 1 is greedy decoding; two requests' beams decode in the same steps", async () => {
  const next = referenceNextLogprobs(base, weights);
  const greedy = await engine.generate({ prompt: PROMPT, maxTokens: MAX_NEW });
  const one = await engine.generate({ prompt: PROMPT, maxTokens: MAX_NEW, beam: { beams: 1 } });
  assert.equal(one.tokens, greedy.tokens);
  const other = [7, 7, 31, 2];
  const [a, b] = await engine.generateBatch([
    { prompt: PROMPT, maxTokens: MAX_NEW, beam: { beams: 3 } },
    { prompt: other, maxTokens: MAX_NEW, beam: { beams: 2 } },
  ]);
  assert.equal(a!.tokens, referenceBeamSearch(next, PROMPT, { numBeams: 3, maxNewTokens: MAX_NEW, eos: [] })[0]!.tokens);
  assert.equal(b!.tokens, referenceBeamSearch(next, other, { numBeams: 2, maxNewTokens: MAX_NEW, eos: [] })[0]!.tokens);
  assert.is(a!.timings.decodeSteps, MAX_NEW - 1);
});

test("client mistakes: bad options, sampling with beams, more beams than slots", async () => {
  const run = (beam: BeamSearchOptions, extra = {}) => engine.generate({ prompt: PROMPT, maxTokens: 4, beam, ...extra });
  for (const beam of [{ beams: 0 }, { beams: 3, numReturnSequences: 4 }, { beams: 2, lengthPenalty: Infinity }]) {
    await run(beam).then(
      () => assert.unreachable(JSON.stringify(beam)),
      (e: unknown) => assert.instance(e, SequenceError),
    );
  }
  await run({ beams: 2 }, { sampling: { temperature: 0.8 } }).then(() => assert.unreachable(), (e: unknown) => assert.instance(e, SequenceError));
  await run({ beams: 9 }).then(() => assert.unreachable(), (e: unknown) => assert.instance(e, EngineError));
  assert.is(engine.freeSlots, 8);
});

test.run();
