// rope_scaling llama3, linear and dynamic through the whole engine against the float64 reference written
// from Hugging Face's formulas (test/reference/rope.ts), on random checkpoints whose config.json carries
// the scaling: a small original context (16) and prompts past it, logits at every position and greedy
// decoding, with and without a MiLoRA adapter; dynamic also row by row (a prompt in one step, each
// decoded token in its own) and independent of what shares a step.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { ROUTER_DEFAULTS } from "../../../compiler/defaults.ts";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { EXPERT_MODULES, type Adapter } from "../../../compiler/model.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint, type RandomCheckpointOptions } from "../../../examples/random-checkpoint.ts";
import { plannedEngine } from "../../../bin/engine-plan.ts";
import { Engine } from "../../../runtime/engine/engine.ts";
import type { Generation } from "../../../runtime/engine/requests.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import type { RopeScaling } from "../../../runtime/package/format.ts";
import { loadReferenceWeights, referenceGreedy, referenceLogits } from "../../reference/llama.ts";
import { referenceMiloraLogits } from "../../reference/milora.ts";
import { generationLengths } from "../../reference/rope.ts";
import { relativeError, runSequence } from "./run-sequence.ts";

// As engine.test.ts: f32 kernels against float64 over two layers stay below 1e-4 relative to the logits' norm.
const BOUND = 1e-4;
const TINY = { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 97, seed: 7 } as const;
/** 24 tokens: positions 16..23 are past the original context. */
const PROMPT = [5, 17, 3, 88, 42, 9, 60, 1, 33, 70, 12, 4, 91, 27, 64, 8, 50, 19, 2, 77, 36, 45, 13, 81];
const GENERATED = 8;
const CTX = 64;

/**
 * The three scalings with an original context of 16. llama3 with rope_theta 500 and high_freq_factor 2:
 * head size 16 has wavelengths 2 pi 500^(i/8) = 6.3, 13.6, 29.6, ..., so pair 0 keeps its frequency
 * (below 16 / 2), pair 1 blends and the rest are divided by factor.
 */
const CASES: Record<string, Partial<RandomCheckpointOptions> & { ropeScaling: RopeScaling }> = {
  llama3: { ropeTheta: 500, maxPositions: CTX, ropeScaling: { type: "llama3", factor: 4, lowFreqFactor: 1, highFreqFactor: 2, originalMaxPositions: 16 } },
  linear: { maxPositions: CTX, ropeScaling: { type: "linear", factor: 2 } },
  // dynamic scales from max_position_embeddings, so it is 16 and the engine plans factor x 16 = 64
  dynamic: { maxPositions: 16, ropeScaling: { type: "dynamic", factor: 4, originalMaxPositions: 16 } },
};

let gpu: GpuContext;
const root = mkdtempSync(join(tmpdir(), "milora-rope-scaling-"));
test.before(async () => {
  gpu = await acquireDevice();
});
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

function checkpoint(name: string): string {
  const dir = join(root, name);
  writeRandomCheckpoint(dir, { ...TINY, ...CASES[name]! });
  return dir;
}

for (const name of Object.keys(CASES)) {
  test(`${name}: the config's rope_scaling is read, and prompt and decode logits and greedy tokens match the reference past the original context`, async () => {
    const dir = checkpoint(name);
    const { base, weights } = loadReferenceWeights(dir);
    assert.equal(base.ropeScaling, CASES[name]!.ropeScaling);
    const engine = await Engine.load(plannedEngine({ base: readHfConfig(dir), checkpointDir: dir, gpu, ctx: CTX, maxSequences: 2 }));
    try {
      const seq = engine.createSequence(PROMPT);
      const { logits, generated } = await runSequence(engine, seq, GENERATED);
      engine.release(seq);
      const tokens = [...PROMPT, ...generated];
      const want = referenceLogits(base, weights, tokens, undefined, generationLengths(PROMPT.length, tokens.length));
      const err = relativeError(logits, want);
      console.log(`  ${name}: relative error ${err.toExponential(2)} over ${tokens.length} positions`);
      assert.ok(err < BOUND, `relative error ${err.toExponential(2)} >= ${BOUND}`);
      assert.equal(generated, referenceGreedy(base, weights, PROMPT, GENERATED));
      // The scaling matters: plain RoPE gives other logits past the first position.
      const plain = referenceLogits({ ...base, ropeScaling: undefined }, weights, tokens);
      assert.ok(relativeError(logits, plain) > 100 * BOUND, "the scaled logits differ from plain RoPE's");
    } finally {
      engine.destroy();
    }
  });
}

test("dynamic: a prompt prefilled at once is rotated with its length, decoded tokens with their own; batching changes nothing", async () => {
  const dir = checkpoint("dynamic");
  const { base, weights } = loadReferenceWeights(dir);
  const engine = await Engine.load(plannedEngine({ base: readHfConfig(dir), checkpointDir: dir, gpu, ctx: CTX, maxSequences: 3 }));
  try {
    // The same 32 tokens in one prefill step: every row scaled by length 32 (one forward pass).
    const tokens = [...PROMPT, 6, 7, 8, 9, 10, 11, 14, 15];
    const once = (await engine.generate({ prompt: tokens, maxTokens: 0, logits: "all" })).logits!;
    const oneForward = referenceLogits(base, weights, tokens);
    assert.ok(relativeError(once, oneForward) < BOUND, "one prefill step is one forward pass");
    const stepwise = referenceLogits(base, weights, tokens, undefined, generationLengths(PROMPT.length, tokens.length));
    assert.ok(relativeError(once, stepwise) > 100 * BOUND, "token-by-token rotation differs from one forward pass");
    // Three sequences of different lengths in shared steps give what each gives alone.
    const prompts = [PROMPT, PROMPT.slice(0, 10), [...PROMPT, 3, 3, 3, 3, 3]];
    const alone: Generation[] = [];
    for (const prompt of prompts) alone.push(await engine.generate({ prompt, maxTokens: 6, logits: "all" }));
    const together = await engine.generateBatch(prompts.map((prompt) => ({ prompt, maxTokens: 6, logits: "all" as const })));
    together.forEach((got, i) => {
      assert.equal(got.tokens, alone[i]!.tokens, `prompt ${i}`);
      assert.ok(relativeError(got.logits!, alone[i]!.logits!.map((row) => Float64Array.from(row))) < 1e-5, `prompt ${i} logits`);
      assert.equal(got.tokens, referenceGreedy(base, weights, prompts[i]!, 6), `prompt ${i} against the reference`);
    });
  } finally {
    engine.destroy();
  }
});

for (const name of Object.keys(CASES)) {
  test(`${name} with a MiLoRA adapter: logits of every position, routing and greedy tokens match the reference`, async () => {
    const dir = checkpoint(name);
    const { base, weights } = loadReferenceWeights(dir);
    const engine = await Engine.load(plannedEngine({ base: readHfConfig(dir), checkpointDir: dir, gpu, ctx: CTX, maxSequences: 2, maxAdapters: 1, maxLoraRank: 8 }));
    const spec: Adapter = { ...peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name: "m" }), router: { ...ROUTER_DEFAULTS, noise: false, pooling: "mean" } };
    const adapter = randomAdapter({ spec, seed: 5 });
    engine.loadAdapter("m", adapter);
    try {
      const seq = engine.createSequence(PROMPT, { adapter: "m" });
      const { logits, generated } = await runSequence(engine, seq, GENERATED);
      engine.release(seq);
      const want = referenceMiloraLogits(base, weights, adapter, PROMPT, generated);
      const err = relativeError(logits, want.logits);
      console.log(`  ${name} + MiLoRA: relative error ${err.toExponential(2)}`);
      assert.ok(err < BOUND, `relative error ${err.toExponential(2)} >= ${BOUND}`);
      const decisions = seq.routing.map((d) => Object.keys(d.experts).sort().join(","));
      assert.equal(decisions, want.routing.map((d) => Object.keys(d.experts).sort().join(",")), "the same experts in every layer");
      generated.forEach((token, i) => {
        const row = want.logits[PROMPT.length - 1 + i]!;
        const [first, second] = [...row].sort((a, b) => b - a);
        if (first! - second! > 1e-3) assert.is(token, row.indexOf(first!), `generated token ${i}`);
      });
    } finally {
      engine.unloadAdapter("m");
      engine.destroy();
    }
  });
}

test.run();
