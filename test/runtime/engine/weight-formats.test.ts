// The engine with its linear weights stored as f32, f16, q8 and q4 (runtime/package/format.ts
// WEIGHT_FORMATS), on a random checkpoint whose sizes are off the 32-element block (hidden 80: K = 80
// is 2.5 blocks, intermediate 200, vocab 97). Two numbers per format:
// - against a float64 reference run on the same rounded weights (what the packed words hold): the
//   kernels' correctness, under the float32 bound of engine.test.ts (1e-4);
// - against the float64 reference on the checkpoint's f32 weights: the format's cost, printed and
//   bounded (docs/weights.md records it).
// Merged mode repacks the folded weights into the storage format, and unmerging restores them exactly.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { EXPERT_MODULES } from "../../../compiler/model.ts";
import { plannedEngine, weightsFor } from "../../../bin/engine-plan.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint, type RandomCheckpointOptions } from "../../../examples/random-checkpoint.ts";
import { Engine } from "../../../runtime/engine/engine.ts";
import { packWeights, unpackWeights } from "../../../runtime/engine/weight-storage.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { CheckpointError, SafetensorsFile, writeSafetensors } from "../../../runtime/formats/safetensors.ts";
import type { Plan, WeightFormat } from "../../../runtime/package/format.ts";
import { loadReferenceWeights, referenceLogits, weightsFromMap, type ReferenceWeights } from "../../reference/llama.ts";
import { foldLora } from "../../reference/milora.ts";

const BOUND = 1e-4;
/** The formats' costs on this model: 2.5e-7 (f32), 4.5e-4 (f16), 1.2e-2 (q8), 2.0e-1 (q4); bounds with margin. */
const COST_BOUND: Readonly<Record<WeightFormat, number>> = { f32: 1e-4, f16: 3e-3, q8: 3e-2, q4: 0.5 };
const MODEL: RandomCheckpointOptions = { hiddenSize: 80, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 200, vocabSize: 97, maxPositions: 64, seed: 31 };
const PROMPT = [5, 17, 3, 88, 42, 9, 60, 1, 33, 70, 12];

const root = mkdtempSync(join(tmpdir(), "milora-weight-formats-"));
const dir = join(root, "f32");
writeRandomCheckpoint(dir, MODEL);
const { base, weights } = loadReferenceWeights(dir);
let gpu: GpuContext;

test.before(async () => {
  gpu = await acquireDevice();
});
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

function relativeError(got: readonly Float32Array[], want: readonly Float64Array[]): number {
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => row.forEach((w, i) => ((diff += (got[r]![i]! - w) ** 2), (norm += w * w))));
  return Math.sqrt(diff / norm);
}

/** `from` with every tensor the plan stores packed replaced by the values its packed words hold. */
function asStored(plan: Plan, from: ReferenceWeights): ReferenceWeights {
  const map = new Map<string, Float64Array>();
  for (const t of plan.tensors) {
    const values = Float32Array.from(from.get(t.name));
    const held = t.gpuDtype === "f32" ? values : unpackWeights(t.gpuDtype, packWeights(t.gpuDtype, values, t.shape, t.name), t.shape, t.name);
    map.set(t.name, Float64Array.from(held));
  }
  return weightsFromMap(map);
}

const load = (weights: WeightFormat, extra: { maxAdapters?: number } = {}) =>
  Engine.load(plannedEngine({ base, checkpointDir: dir, gpu, ctx: 64, maxSequences: 1, weights, maxAdapters: 0, ...extra }));

test("each format's logits match float64 on the same rounded weights; its cost against the f32 weights is stated", async () => {
  const exact = referenceLogits(base, weights, PROMPT);
  const costs: string[] = [];
  for (const format of ["f32", "f16", "q8", "q4"] as const) {
    const engine = await load(format);
    try {
      const linear = engine.plan.tensors.filter((t) => t.role === "linear" || t.role === "lm_head");
      assert.ok(linear.every((t) => t.gpuDtype === format), `${format}: the plan stores every linear weight as ${format}`);
      const logits = (await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" })).logits!;
      const kernelError = relativeError(logits, referenceLogits(base, asStored(engine.plan, weights), PROMPT));
      assert.ok(kernelError < BOUND, `${format}: ${kernelError.toExponential(2)} against float64 on the same weights`);
      const cost = relativeError(logits, exact);
      assert.ok(cost < COST_BOUND[format], `${format}: cost ${cost.toExponential(2)} against the f32 weights, above ${COST_BOUND[format]}`);
      costs.push(`${format} ${cost.toExponential(2)} (kernels ${kernelError.toExponential(2)})`);
    } finally {
      engine.destroy();
    }
  }
  console.log(`  logit error against float64 on the f32 weights: ${costs.join(", ")}`);
});

test("f16, q8 and q4 weights over a storage binding run as row blocks of their own row size", async () => {
  // A 20 KB binding: gate/up_proj [200, 80] take 112 bytes a row as q8 (blocks of 178 rows) and 160 as
  // f16 (125), down_proj [80, 200] 256 as q8 (78) and 400 as f16 (50). q4 fits 20 KB whole, so an 8 KB
  // binding (and 16 positions, whose KV cache fits it): gate/up_proj 64 bytes a row (125), down_proj 144 (55).
  const blocks = { f16: [125, 75], q8: [178, 22], q4: [125, 75] };
  for (const format of ["f16", "q8", "q4"] as const) {
    const [maxBindingBytes, ctx] = format === "q4" ? [8_000, 16] : [20_000, 64];
    const engine = await Engine.load(plannedEngine({ base, checkpointDir: dir, gpu, ctx, maxSequences: 1, weights: format, maxAdapters: 0, maxBindingBytes }));
    try {
      const gate = engine.plan.layer.find((op) => op.op === "linear" && op.module === "gate_proj");
      assert.equal(gate?.op === "linear" ? gate.blocks?.map((b) => b.rows) : undefined, blocks[format]);
      const logits = (await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" })).logits!;
      const error = relativeError(logits, referenceLogits(base, asStored(engine.plan, weights), PROMPT));
      assert.ok(error < BOUND, `${format} in row blocks: ${error.toExponential(2)}`);
    } finally {
      engine.destroy();
    }
  }
});

test("merged mode repacks W + s B A into f16, q8 and q4 (float64 on the rounded folded weights agrees); unmerging restores the bytes", async () => {
  const spec = peftSpec({ base, modules: EXPERT_MODULES, rank: 4, alpha: 8, seed: 0, name: "lora" });
  const adapter = randomAdapter({ spec, seed: 5 });
  for (const format of ["f16", "q8", "q4"] as const) {
    const engine = await load(format, { maxAdapters: 1 });
    try {
      engine.loadAdapter("lora", adapter);
      const before = (await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" })).logits!;
      await engine.mergeAdapter("lora");
      const merged = (await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" })).logits!;
      // The engine folds the stored values in f32 and packs the sum: so does this, in float64.
      const want = referenceLogits(base, asStored(engine.plan, foldLora(asStored(engine.plan, weights), adapter)), PROMPT);
      const error = relativeError(merged, want);
      assert.ok(error < BOUND, `${format} merged: ${error.toExponential(2)}`);
      await engine.unmergeAdapter();
      assert.equal((await engine.generate({ prompt: PROMPT, maxTokens: 0, logits: "all" })).logits, before, `${format}: unmerged logits are the base's exactly`);
    } finally {
      engine.destroy();
    }
  }
});

test("the default: f16 for an F16 or BF16 checkpoint, f32 for F32; the spec's weights key before it", () => {
  for (const [dtype, want] of [["F16", "f16"], ["BF16", "f16"], ["F32", "f32"]] as const) {
    const d = join(root, `default-${dtype}`);
    writeRandomCheckpoint(d, { ...MODEL, dtype });
    assert.is(weightsFor(base, d), want, dtype);
    assert.is(weightsFor({ ...base, weights: "q8" }, d), "q8");
    assert.is(weightsFor({ ...base, weights: "q4" }, d), "q4");
  }
  assert.is(weightsFor(base, undefined), "f32");
});

test("a BF16 value beyond f16's range is refused at upload, naming the tensor; f32, q8 and q4 take it", async () => {
  const d = join(root, "bf16-big");
  writeRandomCheckpoint(d, { ...MODEL, dtype: "BF16" });
  const path = join(d, "model.safetensors");
  const file = SafetensorsFile.open(path);
  const name = "model.layers.1.mlp.up_proj.weight";
  const tensors = [...file.tensors.values()].map((t) => {
    const data = file.readF32(t.name);
    if (t.name === name) data[3] = 1e6;
    return { name: t.name, dtype: "BF16" as const, shape: [...t.shape], data };
  });
  file.close();
  writeSafetensors(path, tensors);
  const attempt = (weights?: WeightFormat) => Engine.load(plannedEngine({ base, checkpointDir: d, gpu, ctx: 64, maxSequences: 1, maxAdapters: 0, ...(weights ? { weights } : {}) }));
  await attempt().then(
    (e) => (e.destroy(), assert.unreachable("stored 1e6 as f16")),
    (e: Error) => assert.ok(e instanceof CheckpointError && e.message.includes(`tensor "${name}" [200, 80] holds 999424 at [0, 3], beyond f16's range`), e.message),
  );
  for (const weights of ["f32", "q8", "q4"] as const) (await attempt(weights)).destroy();
});

test.run();
