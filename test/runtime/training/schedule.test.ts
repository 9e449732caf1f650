// Learning-rate schedules against values written out from Hugging Face's formulas by hand.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { learningRate, warmupSteps, type Schedule } from "../../../runtime/training/schedule.ts";

const close = (a: number, b: number) => Math.abs(a - b) < 1e-15;

test("linear: warm-up 0, 0.25, 0.5, 0.75 of lr over 4 steps, then decay to 0 at the last step", () => {
  const s: Schedule = { kind: "linear", lr: 1e-4, warmup: 4, total: 12 };
  const got = Array.from({ length: 13 }, (_, i) => learningRate(s, i));
  const want = [0, 0.25, 0.5, 0.75, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0].map((f) => f * 1e-4);
  got.forEach((g, i) => assert.ok(close(g, want[i]!), `step ${i}: ${g} vs ${want[i]}`));
});

test("cosine halves at mid-decay; constant stays after warm-up", () => {
  assert.ok(close(learningRate({ kind: "cosine", lr: 2, warmup: 2, total: 10 }, 6), 1));
  assert.ok(close(learningRate({ kind: "cosine", lr: 2, warmup: 2, total: 10 }, 10), 0));
  assert.is(learningRate({ kind: "constant", lr: 3, warmup: 2, total: 10 }, 1), 1.5);
  assert.is(learningRate({ kind: "constant", lr: 3, warmup: 2, total: 10 }, 9), 3);
});

test("warm-up as a ratio rounds up (the paper's 6% of 100 steps is 6); as steps it is taken as is", () => {
  assert.is(warmupSteps(0.06, 100), 6);
  assert.is(warmupSteps(0.06, 101), 7);
  assert.is(warmupSteps(10, 100), 10);
  assert.is(warmupSteps(0, 100), 0);
  assert.throws(() => warmupSteps(2.5, 100), /integer/);
});

test.run();
