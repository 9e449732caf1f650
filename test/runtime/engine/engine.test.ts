// The whole model on the GPU against the float64 reference, on tiny random checkpoints written here.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { kernelSources, planBase } from "../../../compiler/plan.ts";
import { writeRandomCheckpoint, type RandomCheckpointOptions } from "../../../examples/random-checkpoint.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { Engine, EngineError, type EngineOptions } from "../../../runtime/engine/engine.ts";
import type { Generation } from "../../../runtime/engine/requests.ts";
import { CheckpointError, SafetensorsFile, writeSafetensors } from "../../../runtime/formats/safetensors.ts";
import { referenceToken } from "../../reference/sampling.ts";
import { loadReferenceWeights, referenceGreedy, referenceLogits } from "../../reference/llama.ts";
import { plannedEngine } from "../../../bin/engine-plan.ts";

// f32 on the GPU against float64: every kernel rounds at about 6e-8 per operation, and two layers of
// K <= 176 sums and softmaxes stay well below 1e-4 relative to the logits' norm.
const BOUND = 1e-4;

const TINY = { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 97, maxPositions: 64, seed: 7 } as const;

let gpu: GpuContext;
const root = mkdtempSync(join(tmpdir(), "milora-engine-"));

test.before(async () => {
  gpu = await acquireDevice();
});
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

function checkpoint(name: string, options: Partial<RandomCheckpointOptions> = {}): string {
  const dir = join(root, name);
  writeRandomCheckpoint(dir, { ...TINY, ...options });
  return dir;
}

type Extra = { maxBindingBytes?: number; maxBatchRows?: number; maxSequences?: number };

async function load(dir: string, extra: Extra = {}): Promise<Engine> {
  return Engine.load(plannedEngine({ base: readHfConfig(dir), checkpointDir: dir, gpu, ctx: 64, maxSequences: 4, ...extra }));
}

/** ||got - want|| / ||want|| over all rows. */
function relativeError(got: readonly Float32Array[], want: readonly Float64Array[]): number {
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => {
    row.forEach((w, i) => {
      diff += (got[r]![i]! - w) ** 2;
      norm += w * w;
    });
  });
  return Math.sqrt(diff / norm);
}

const PROMPT = [5, 17, 3, 88, 42, 9, 60, 1, 33, 70, 12];

async function promptLogitsMatch(dir: string, engineOptions: Extra = {}) {
  const { base, weights } = loadReferenceWeights(dir);
  const engine = await load(dir, engineOptions);
  try {
    const result = await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" });
    assert.is(result.logits?.length, PROMPT.length);
    const err = relativeError(result.logits!, referenceLogits(base, weights, PROMPT));
    assert.ok(err < BOUND, `relative error ${err.toExponential(2)} >= ${BOUND}`);
  } finally {
    engine.destroy();
  }
}

test("prompt logits at every position match the reference: GQA, untied, F32", async () => {
  await promptLogitsMatch(checkpoint("gqa-f32"));
});

test("MHA with tied embeddings, stored as F16", async () => {
  await promptLogitsMatch(checkpoint("mha-tied-f16", { kvHeads: 4, tieEmbeddings: true, dtype: "F16", seed: 8 }));
});

test("BF16 in three shards", async () => {
  await promptLogitsMatch(checkpoint("bf16-sharded", { dtype: "BF16", shards: 3, seed: 9 }));
});

test("embedding and lm_head larger than a storage binding are split into row blocks; long prompts into chunks", async () => {
  // [1000, 16] f32 = 64 KB: a 20 KB binding splits it into blocks of 312 rows, and a 4 KB logits row
  // limits a step to 5 rows, so the 11-token prompt runs as 5 + 5 + 1.
  const dir = checkpoint("big-vocab", { hiddenSize: 16, heads: 2, kvHeads: 1, intermediateSize: 32, vocabSize: 1000, seed: 10 });
  await promptLogitsMatch(dir, { maxBindingBytes: 20_000, maxSequences: 1 });
});

test("decoding token by token gives the logits a full prefill of the same tokens gives", async () => {
  const dir = checkpoint("gqa-f32");
  const engine = await load(dir);
  try {
    const full = (await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" })).logits!;
    const seq = engine.createSequence(PROMPT.slice(0, 4), { logits: "last" });
    const incremental = [(await engine.prefill([seq])).get(seq)!.logits![0]!];
    for (const token of PROMPT.slice(4)) {
      seq.append([token]);
      incremental.push((await engine.decode([seq])).get(seq)!.logits![0]!);
    }
    engine.release(seq);
    const want = full.slice(3).map((row) => Float64Array.from(row));
    const err = relativeError(incremental, want);
    assert.ok(err < 1e-5, `relative error ${err.toExponential(2)}`);
  } finally {
    engine.destroy();
  }
});

test("a batch of three sequences of different lengths gives what each gives alone; batches of 12 and 20 give the reference's", async () => {
  const dir = checkpoint("gqa-f32");
  const { base, weights } = loadReferenceWeights(dir);
  const engine = await load(dir, { maxSequences: 20 });
  const prompts = [PROMPT, [40, 2], [9, 9, 9, 9, 9, 31]];
  try {
    const alone: Generation[] = [];
    for (const prompt of prompts) alone.push(await engine.generate({ prompt, maxTokens: 5, logits: "all" }));
    const together = await engine.generateBatch(prompts.map((prompt) => ({ prompt, maxTokens: 5, logits: "all" as const })));
    together.forEach((got, i) => {
      assert.equal(got.tokens, alone[i]!.tokens);
      const err = relativeError(got.logits!, alone[i]!.logits!.map((row) => Float64Array.from(row)));
      assert.ok(err < 1e-5, `prompt ${i}: relative error ${err.toExponential(2)}`);
    });
    // Prefilled together on the matmul; then decode steps of 12 and 20 rows, one per sequence, on the matvec.
    for (const n of [12, 20]) {
      const batch = Array.from({ length: n }, (_, i) => Array.from({ length: 1 + (i % 5) }, (_, j) => (i * 13 + j * 7 + 1) % TINY.vocabSize));
      assert.ok(batch.flat().length > engine.plan.matvecMaxRows && n <= engine.plan.matvecMaxRows, "prefill runs matmul, decode matvec");
      const seqs = batch.map((prompt) => engine.createSequence(prompt, { logits: "last" }));
      const logits = new Map(seqs.map((s) => [s, [] as Float32Array[]]));
      let out = await engine.prefill(seqs);
      for (let step = 0; step < 2; step++) {
        for (const s of seqs) {
          logits.get(s)!.push(out.get(s)!.logits![0]!);
          s.append([out.get(s)!.token]);
        }
        out = await engine.decode(seqs);
      }
      for (const s of seqs) logits.get(s)!.push(out.get(s)!.logits![0]!);
      seqs.forEach((s, i) => {
        const want = referenceLogits(base, weights, s.tokens).slice(batch[i]!.length - 1);
        const err = relativeError(logits.get(s)!, want);
        assert.ok(err < BOUND, `${n} sequences, sequence ${i}: relative error ${err.toExponential(2)}`);
        engine.release(s);
      });
    }
    assert.is(engine.freeSlots, 20);
  } finally {
    engine.destroy();
  }
});

test("greedy generation gives the reference's greedy tokens", async () => {
  const dir = checkpoint("mha-tied-f16", { kvHeads: 4, tieEmbeddings: true, dtype: "F16", seed: 8 });
  const { base, weights } = loadReferenceWeights(dir);
  const engine = await load(dir);
  try {
    const got = await engine.generate({ prompt: [3, 14, 15, 92], maxTokens: 8 });
    assert.equal(got.tokens, referenceGreedy(base, weights, [3, 14, 15, 92], 8));
    assert.is(got.finish, "length");
  } finally {
    engine.destroy();
  }
});

test("seeded sampling on the device picks what the reference sampler picks from the same logits, and repeats", async () => {
  const engine = await load(checkpoint("gqa-f32"));
  try {
    const sampling = { temperature: 1.3, topK: 40, topP: 0.9, seed: 1234 };
    const seq = engine.createSequence(PROMPT, { sampling, logits: "last" });
    const drawn: number[] = [];
    for (let step = 0; step < 6; step++) {
      const out = (await engine.prefill([seq])).get(seq)!;
      assert.is(out.token, referenceToken(out.logits![0]!, { ...sampling, step }), `step ${step}`);
      drawn.push(out.token);
      seq.append([out.token]);
    }
    engine.release(seq);
    const again = await engine.generate({ prompt: PROMPT, maxTokens: 6, sampling });
    assert.equal(again.tokens, drawn);
  } finally {
    engine.destroy();
  }
});

test("a checkpoint that does not fit the base is refused with every problem named", async () => {
  const dir = checkpoint("broken", { seed: 11 });
  const file = SafetensorsFile.open(join(dir, "model.safetensors"));
  const kept = [...file.tensors.values()]
    .filter((t) => t.name !== "model.layers.1.mlp.up_proj.weight")
    .map((t) => {
      const wrong = t.name === "model.layers.0.self_attn.k_proj.weight";
      return { name: t.name, dtype: "F32" as const, shape: wrong ? [t.shape[0]! / 2, t.shape[1]! * 2] : [...t.shape], data: file.readF32(t.name) };
    });
  file.close();
  writeSafetensors(join(dir, "model.safetensors"), kept);
  const error = await load(dir).then(
    (engine) => (engine.destroy(), undefined),
    (e: unknown) => e,
  );
  assert.instance(error, CheckpointError);
  const message = (error as Error).message;
  assert.match(message, 'missing tensor "model.layers.1.mlp.up_proj.weight"');
  assert.match(message, 'tensor "model.layers.0.self_attn.k_proj.weight" has shape [16, 128], expected [32, 64]');
});

test("a NaN or infinity in a weight is refused at load, naming the tensor and the element", async () => {
  for (const [bad, dtype] of [[NaN, "F32"], [-Infinity, "BF16"]] as const) {
    const dir = checkpoint(`non-finite-${dtype}`, { seed: 12 });
    const file = SafetensorsFile.open(join(dir, "model.safetensors"));
    const tensors = [...file.tensors.values()].map((t) => {
      const data = file.readF32(t.name);
      if (t.name === "model.layers.1.mlp.down_proj.weight") data[3 * t.shape[1]! + 5] = bad; // row 3, column 5
      return { name: t.name, dtype, shape: [...t.shape], data };
    });
    file.close();
    writeSafetensors(join(dir, "model.safetensors"), tensors);
    const error = await load(dir).then(
      (engine) => (engine.destroy(), undefined),
      (e: unknown) => e,
    );
    assert.instance(error, CheckpointError, dtype);
    assert.match((error as Error).message, `tensor "model.layers.1.mlp.down_proj.weight" [64, 176] holds ${bad} at [3, 5]`);
  }
});

test("a given plan runs the caller's kernels; a kernel it lacks, or a context beside the plan, is refused", async () => {
  const dir = checkpoint("given-plan");
  const base = readHfConfig(dir);
  const plan = planBase(base, { ctx: 32, maxLoraRank: 4 });
  const kernels = new Map(kernelSources(plan));
  const engine = await Engine.load({ base, checkpointDir: dir, gpu, plan, kernels });
  try {
    assert.is(engine.plan, plan);
    const reference = loadReferenceWeights(dir);
    assert.equal((await engine.generate({ prompt: PROMPT, maxTokens: 4 })).tokens, referenceGreedy(reference.base, reference.weights, PROMPT, 4));
  } finally {
    engine.destroy();
  }
  const sampler = plan.kernels.find((k) => k.family === "sampling")!.key;
  kernels.delete(sampler);
  await refused(() => Engine.load({ base, checkpointDir: dir, gpu, plan, kernels }), `no WGSL was given for kernel ${sampler} of the plan`);
  // The plan fixes the context: the engine has no option beside it (a type error, not a run-time check).
  // @ts-expect-error ctx is not an engine option
  const _withContext: EngineOptions = { base, checkpointDir: dir, gpu, plan, kernels, ctx: 64 };
});

async function refused(load: () => Promise<Engine>, message: string) {
  try {
    (await load()).destroy();
    assert.unreachable("loaded");
  } catch (e) {
    assert.instance(e, EngineError);
    assert.match((e as Error).message, message);
  }
}

test.run();
