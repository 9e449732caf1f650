// The float64 optimizer references against closed forms of torch's definitions.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { adamwStep, clipFactor, globalNorm, sgdStep } from "./optimizer.ts";

const close = (a: number, b: number) => Math.abs(a - b) <= 1e-15 * Math.max(1, Math.abs(b));

test("AdamW's first step is p (1 - lr wd) - lr g / (|g| + eps): the bias corrections undo the zero start", () => {
  const s = { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1 };
  const p = Float64Array.of(0.5, -0.25, 0);
  const g = [0.3, -2, 1e-3];
  const want = Array.from(p, (x, i) => x * (1 - s.lr * s.weightDecay) - (s.lr * g[i]!) / (Math.abs(g[i]!) + s.eps));
  const m = new Float64Array(3);
  const v = new Float64Array(3);
  adamwStep(p, g, m, v, s, 1);
  assert.ok(want.every((w, i) => close(p[i]!, w)), `${Array.from(p)} vs ${want}`);
  assert.ok(close(m[0]!, 0.1 * 0.3) && close(v[1]!, 0.001 * 4));
  // Step 2 with the same gradient: m / bc1 = g and v / bc2 = g^2 again, so the same update.
  const before = p[0]!;
  adamwStep(p, g, m, v, s, 2);
  assert.ok(close(p[0]!, before * (1 - s.lr * s.weightDecay) - (s.lr * 0.3) / (0.3 + s.eps)));
});

test("clip_grad_norm_: the norm over all buffers and min(1, max / (norm + 1e-6)); SGD is p - lr g", () => {
  assert.is(globalNorm([[3], [0, 4]]), 5);
  assert.is(clipFactor(5, 1), 1 / (5 + 1e-6));
  assert.is(clipFactor(5, 10), 1);
  assert.is(clipFactor(5, 0), 1);
  const p = Float64Array.of(1, 2);
  sgdStep(p, [0.5, -1], 0.1);
  assert.equal(Array.from(p), [1 - 0.05, 2 + 0.1]);
});

test.run();
