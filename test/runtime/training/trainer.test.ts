// The training loop against float64: three SGD and three AdamW steps (clipped) give the parameters the
// reference gives after the same steps; an interrupted run resumed from its checkpoint ends where the
// uninterrupted one does, bit for bit.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import type { OptimizerSettings } from "../../../runtime/training/optimizer.ts";
import { referenceTrainLoss } from "../../reference/train.ts";
import { referenceLora } from "./reference-adapters.ts";
import { TRAIN_DATA, byName, checkResume, referenceSteps, trainSettings, trainerBed, updateError } from "./step-check.ts";

const bed = await trainerBed("trainer", 4);
test.after(() => bed.close());
const { base, reference } = bed;

function start(dropout = 0): LoadedAdapter {
  const spec = peftSpec({ base, modules: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], rank: 4, alpha: 8, seed: 1 });
  return randomAdapter({ spec: { ...spec, experts: spec.experts.map((e) => ({ ...e, dropout })) }, seed: 9 });
}

async function checkSteps(optimizer: Partial<OptimizerSettings>, what: string): Promise<void> {
  const adapter = start();
  const s = trainSettings(optimizer);
  const trainer = bed.trainer(adapter, s, what);
  for (let i = 0; i < 3; i++) await trainer.trainStep();
  const got = await trainer.weights();
  trainer.destroy();
  // The float64 parameters after the same steps on the whole data set each step.
  const lora = referenceLora(adapter);
  const want = byName(lora);
  referenceSteps(want, s, () => byName(referenceTrainLoss(base, reference.weights, { lora, balance: 0 }, TRAIN_DATA).lora));
  for (const [key, w] of lora) {
    const g = got.lora.get(key as `${number}.q_proj`)!;
    const before = adapter.lora.get(key as `${number}.q_proj`)!;
    for (const [name, gv, wv, bv] of [["lora_A", g.a, w.a, before.a], ["lora_B", g.b, w.b, before.b]] as const) {
      const { error, moved } = updateError(gv, wv, bv);
      assert.ok(moved > 0 && error < 1e-4, `${what} ${key} ${name}: ${error.toExponential(2)} of the update`);
    }
  }
}

test("three SGD steps give the float64 reference's parameters", async () => {
  await checkSteps({ kind: "sgd", maxGradNorm: 0 }, "sgd");
});

test("three AdamW steps with weight decay and clipping to norm 0.05 give the float64 reference's parameters", async () => {
  await checkSteps({ kind: "adamw", weightDecay: 0.1, maxGradNorm: 0.05 }, "adamw");
});

test("an interrupted run resumed from its checkpoint ends with the uninterrupted run's weights, bit for bit", async () => {
  const s = trainSettings({ kind: "adamw" }, { steps: 6, batchSize: 1, gradAccum: 2, shuffle: true, schedule: "linear", warmup: 2 });
  await checkResume(bed, "resume", s, () => start(0.3), 3);
});

test.run();
