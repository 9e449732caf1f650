// Training over a base stored as f16, q8 or q4 (docs/weights.md): the forward product and the backward's
// input gradient dequantise the frozen weights as inference does, so one training step's loss and
// every LoRA gradient equal the float64 reference run on the same rounded weights (the values the
// format holds, unpacked), at the usual f32 bound; f32 is the plain case.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { EXPERT_MODULES } from "../../../compiler/model.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { packWeights, unpackWeights } from "../../../runtime/engine/weight-storage.ts";
import { weightsFromMap } from "../../reference/llama.ts";
import { referenceTrainLoss } from "../../reference/train.ts";
import { referenceLora } from "./reference-adapters.ts";
import { STEP_BATCH, gradError, stepOnDevice, tinyModel } from "./step-check.ts";

const BOUND = 1e-5;
const batch = STEP_BATCH.slice(0, 2);

const root = mkdtempSync(join(tmpdir(), "milora-train-weights-"));
const tiny = tinyModel(join(root, "tiny"), { maxPositions: 16, seed: 3 });
const { base } = tiny;
const gpu = await acquireDevice();
test.after(() => {
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

for (const format of ["f32", "f16", "q8", "q4"] as const) {
  test(`a base stored as ${format}: the step's loss and every LoRA gradient equal float64 on the ${format} values`, async () => {
    const adapter = randomAdapter({ spec: peftSpec({ base, modules: EXPERT_MODULES, rank: 2, alpha: 4, seed: 1 }), seed: 2 });
    await stepOnDevice(gpu.device, tiny, adapter, batch, { plan: { maxLoraRank: 2, weights: format }, maxRows: 16 }, async ({ lossSum, supervised, params, plan }) => {
      // The reference's weights: each linear weight as the format stores it (checkpoint order, names as HF's).
      const original = tiny.reference.weights;
      const rounded = new Map(
        plan.tensors.map((t) => {
          const values = original.get(t.name);
          if (t.gpuDtype === "f32") return [t.name, values] as const;
          const what = `tensor "${t.name}"`;
          return [t.name, Float64Array.from(unpackWeights(t.gpuDtype, packWeights(t.gpuDtype, Float32Array.from(values), t.shape, what), t.shape, what))] as const;
        }),
      );
      const want = referenceTrainLoss(base, weightsFromMap(rounded), { lora: referenceLora(adapter), balance: 0 }, batch);
      const loss = lossSum / supervised;
      assert.ok(Math.abs(loss - want.lmLoss) / want.lmLoss < BOUND, `${format}: loss ${loss} vs ${want.lmLoss}`);
      for (const l of params.lora) {
        const key = `${l.layer}.${l.module}`;
        const errA = await gradError(gpu.device, l.a, want.lora.get(key)!.a);
        const errB = await gradError(gpu.device, l.b, want.lora.get(key)!.b);
        assert.ok(errA < BOUND && errB < BOUND, `${format} ${key}: lora_A ${errA.toExponential(2)}, lora_B ${errB.toExponential(2)}`);
      }
      if (format !== "f32") {
        // and the rounding is real: the f32 weights give a different loss than the stored ones
        const exact = referenceTrainLoss(base, original, { lora: new Map(), balance: 0 }, batch).lmLoss;
        const stored = referenceTrainLoss(base, weightsFromMap(rounded), { lora: new Map(), balance: 0 }, batch).lmLoss;
        assert.ok(Math.abs(exact - stored) > 1e-7 * exact, `${format} rounds the weights (${exact} vs ${stored})`);
      }
    });
  });
}

test.run();
