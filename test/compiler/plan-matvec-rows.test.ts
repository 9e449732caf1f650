// The plan's matvec row limit: MATVEC_MAX_ROWS unless a device's calibration gives its own, and the
// CLI's planning picks the calibrated figure of the weight format it plans.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { MATVEC_MAX_ROWS, PlanError, planBase } from "../../compiler/plan.ts";
import { randomCheckpointBase } from "../../examples/random-checkpoint.ts";
import { enginePlan } from "../../bin/engine-plan.ts";

const base = randomCheckpointBase({ hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 512, seed: 1 });

test("without the option the plan uses MATVEC_MAX_ROWS, which is 28", () => {
  assert.is(MATVEC_MAX_ROWS, 28);
  assert.is(planBase(base).matvecMaxRows, 28);
});

test("the planner takes the matvec row limit it is given", () => {
  assert.is(planBase(base, { matvecMaxRows: 12 }).matvecMaxRows, 12);
  assert.is(planBase(base, { matvecMaxRows: 1 }).matvecMaxRows, 1);
  assert.is(planBase(base, { matvecMaxRows: 200 }).matvecMaxRows, 200);
});

test("a row limit below one row or not whole is a PlanError naming it", () => {
  for (const rows of [0, -3, 1.5, Number.NaN]) {
    assert.throws(() => planBase(base, { matvecMaxRows: rows }), (e: unknown) => e instanceof PlanError && e.message.includes(`matvec row limit must be a whole number of rows, at least 1, got ${rows}`));
  }
});

test("the CLI's plan takes the calibrated limit of the format it stores the weights in, else the default", () => {
  const calibration = {
    formats: [
      { weights: "f32", matvecMaxRows: 40, bounded: true, timings: [] },
      { weights: "f16", matvecMaxRows: 9, bounded: true, timings: [] },
    ],
  } as const;
  assert.is(enginePlan({ base, weights: "f32", calibration }).plan.matvecMaxRows, 40);
  assert.is(enginePlan({ base, weights: "f16", calibration }).plan.matvecMaxRows, 9);
  assert.is(enginePlan({ base, weights: "q8", calibration }).plan.matvecMaxRows, 28, "q8 was not measured");
  assert.is(enginePlan({ base, weights: "f16" }).plan.matvecMaxRows, 28, "no calibration");
});

test.run();
