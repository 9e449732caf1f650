// Training over a base stored as f16 or q8 (docs/weights.md): the forward product and the backward's
// input gradient dequantise the frozen weights as inference does, so one training step's loss and
// every LoRA gradient equal the float64 reference run on the same rounded weights (the values the
// format holds, unpacked), at the usual f32 bound; f32 is the plain case.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { EXPERT_MODULES } from "../../../compiler/model.ts";
import { planBase } from "../../../compiler/plan.ts";
import { trainKernelResolver } from "../../../compiler/train-kernels.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { openCheckpoint } from "../../../runtime/formats/checkpoint.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { PipelineCache, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { IGNORE_INDEX as I } from "../../../runtime/training/data.ts";
import { TrainingGraph, packBatch } from "../../../runtime/training/graph.ts";
import { TrainableParams } from "../../../runtime/training/params.ts";
import { packWeights, unpackWeights } from "../../../runtime/engine/weight-storage.ts";
import { uploadWeights } from "../../../runtime/engine/weights.ts";
import { loadReferenceWeights, weightsFromMap } from "../../reference/llama.ts";
import { referenceTrainLoss, type ReferenceLora } from "../../reference/train.ts";

const BOUND = 1e-5;
const MODEL = { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 61, maxPositions: 16, seed: 3 };
const batch = [
  { tokens: [3, 14, 15, 9, 26, 5, 35], labels: [I, I, I, 9, 26, 5, 35] },
  { tokens: [8, 9, 7, 9, 3], labels: [I, I, 7, 9, 3] },
];

const root = mkdtempSync(join(tmpdir(), "milora-train-weights-"));
const dir = join(root, "tiny");
writeRandomCheckpoint(dir, MODEL);
const base = readHfConfig(dir);
const gpu = await acquireDevice();
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

function relative(got: Float32Array, want: Float64Array): number {
  let d = 0;
  let n = 0;
  for (let i = 0; i < want.length; i++) {
    d += (got[i]! - want[i]!) ** 2;
    n += want[i]! ** 2;
  }
  return Math.sqrt(d / n);
}

for (const format of ["f32", "f16", "q8"] as const) {
  test(`a base stored as ${format}: the step's loss and every LoRA gradient equal float64 on the ${format} values`, async () => {
    const adapter = randomAdapter({ spec: peftSpec({ base, modules: EXPERT_MODULES, rank: 2, alpha: 4, seed: 1 }), seed: 2 });
    const plan = planBase(base, { maxLoraRank: 2, weights: format });
    const checkpoint = openCheckpoint(dir);
    const weights = await uploadWeights(gpu.device, checkpoint, plan, plan.maxBindingBytes);
    checkpoint.close();
    const params = new TrainableParams(gpu.device, adapter);
    const graph = new TrainingGraph({ device: gpu.device, plan, weights, params, kernel: trainKernelResolver(), pipelines: new PipelineCache(gpu.device), maxRows: 16 });
    try {
      const packed = packBatch(batch);
      const supervised = packed.supervisedRows.length;
      const { lossSum } = await graph.run(packed, 1 / supervised, { backward: true });
      // The reference's weights: each linear weight as the format stores it (checkpoint order, names as HF's).
      const original = loadReferenceWeights(dir).weights;
      const rounded = new Map(
        plan.tensors.map((t) => {
          const values = original.get(t.name);
          if (t.gpuDtype === "f32") return [t.name, values] as const;
          const what = `tensor "${t.name}"`;
          return [t.name, Float64Array.from(unpackWeights(t.gpuDtype, packWeights(t.gpuDtype, Float32Array.from(values), t.shape, what), t.shape, what))] as const;
        }),
      );
      const want = referenceTrainLoss(base, weightsFromMap(rounded), {
        lora: new Map([...adapter.lora].map(([key, w]): [string, ReferenceLora] => [key, { a: Float64Array.from(w.a), b: Float64Array.from(w.b), rank: w.rank, scaling: w.scaling }])),
        balance: 0,
      }, batch);
      const loss = lossSum / supervised;
      assert.ok(Math.abs(loss - want.lmLoss) / want.lmLoss < BOUND, `${format}: loss ${loss} vs ${want.lmLoss}`);
      for (const l of params.lora) {
        const key = `${l.layer}.${l.module}`;
        const errA = relative(await readBuffer(gpu.device, l.a.grad, 0, l.a.count * 4), want.lora.get(key)!.a);
        const errB = relative(await readBuffer(gpu.device, l.b.grad, 0, l.b.count * 4), want.lora.get(key)!.b);
        assert.ok(errA < BOUND && errB < BOUND, `${format} ${key}: lora_A ${errA.toExponential(2)}, lora_B ${errB.toExponential(2)}`);
      }
      if (format !== "f32") {
        // and the rounding is real: the f32 weights give a different loss than the stored ones
        const exact = referenceTrainLoss(base, original, { lora: new Map(), balance: 0 }, batch).lmLoss;
        const stored = referenceTrainLoss(base, weightsFromMap(rounded), { lora: new Map(), balance: 0 }, batch).lmLoss;
        assert.ok(Math.abs(exact - stored) > 1e-7 * exact, `${format} rounds the weights (${exact} vs ${stored})`);
      }
    } finally {
      graph.destroy();
      params.destroy();
      weights.destroy();
    }
  });
}

test.run();
