// Every model family on the GPU against the float64 reference (written from transformers' modelling
// code, test/reference/llama.ts), with and without a MiLoRA adapter: a random checkpoint with that
// family's config.json keys, logits at every position of the prompt and of a greedy decode.
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
import { Engine } from "../../../runtime/engine/engine.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { plannedEngine } from "../../../bin/engine-plan.ts";
import { argmax, loadReferenceWeights } from "../../reference/llama.ts";
import { referenceMiloraLogits } from "../../reference/milora.ts";
import { relativeError, runSequence } from "./run-sequence.ts";

// f32 on the GPU against float64 over two layers, as engine.test.ts and milora.test.ts.
const BOUND = 1e-4;
const TINY = { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 97, maxPositions: 64, seed: 11 } as const;
const PROMPT = [5, 17, 3, 88, 42, 9, 60, 1, 33, 70, 12, 4, 51];
const GENERATED = 5;

let gpu: GpuContext;
const root = mkdtempSync(join(tmpdir(), "milora-families-"));
test.before(async () => {
  gpu = await acquireDevice();
});
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

/** Prompt and greedy decode on the engine, with and without a MiLoRA adapter, against the reference. */
async function familyMatches(name: string, options: Partial<RandomCheckpointOptions>) {
  const dir = join(root, name);
  writeRandomCheckpoint(dir, { ...TINY, ...options });
  const { base, weights } = loadReferenceWeights(dir);
  const spec: Adapter = {
    ...peftSpec({ base, modules: EXPERT_MODULES, rank: 4, alpha: 8, seed: 0, name: "mix" }),
    router: { ...ROUTER_DEFAULTS, pooling: "mean", noise: false },
  };
  const adapter = randomAdapter({ spec, seed: 3 });
  const engine = await Engine.load(plannedEngine({ base: readHfConfig(dir), checkpointDir: dir, gpu, ctx: 64, maxSequences: 2, maxAdapters: 1, maxLoraRank: 4 }));
  try {
    engine.loadAdapter(adapter.name, adapter);
    const plain = { ...adapter, spec: { ...adapter.spec, router: undefined }, lora: new Map() };
    for (const tenant of [undefined, adapter.name]) {
      const what = `${name}${tenant ? " + MiLoRA" : ""}`;
      const seq = engine.createSequence(PROMPT, tenant ? { adapter: tenant } : {});
      const { logits, generated } = await runSequence(engine, seq, GENERATED);
      engine.release(seq);
      const want = referenceMiloraLogits(base, weights, tenant ? adapter : plain, PROMPT, generated).logits;
      const err = relativeError(logits, want);
      assert.ok(err < BOUND, `${what}: relative error ${err.toExponential(2)} >= ${BOUND}`);
      // greedy: each token is the reference's argmax after the tokens before it
      generated.forEach((token, i) => assert.is(token, argmax(want[PROMPT.length - 1 + i]!), `${what}: token ${i}`));
    }
  } finally {
    engine.destroy();
  }
}

test("mistral: sliding-window attention (window 5 over a 13-token prompt and its decode), GQA", async () => {
  await familyMatches("mistral", { family: "mistral", slidingWindow: 5 });
});

test("gemma: GeGLU, RMSNorm by (1 + w), embeddings scaled by sqrt(hidden), tied embeddings, one kv head", async () => {
  await familyMatches("gemma", { family: "gemma", kvHeads: 1, tieEmbeddings: true, seed: 12 });
});

test("qwen2: biases on q, k and v, tied embeddings, its config's use_sliding_window false", async () => {
  await familyMatches("qwen2", { family: "qwen2", tieEmbeddings: true, seed: 13 });
});

test.run();
