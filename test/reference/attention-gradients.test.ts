// The float64 attention gradients against central finite differences of L = sum(G * forward).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { mulberry32 } from "../../examples/random-checkpoint.ts";
import { attentionBackward, attentionForward, type AttentionShape } from "./attention-gradients.ts";

const random = mulberry32(5);
const uniform = (n: number) => Float64Array.from({ length: n }, () => random() * 2 - 1);

function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
}

/** (L(x + h e_at) - L(x - h e_at)) / 2h, restoring x. */
function centralDifference(x: Float64Array, at: number, loss: () => number, h = 1e-5): number {
  const saved = x[at]!;
  x[at] = saved + h;
  const up = loss();
  x[at] = saved - h;
  const down = loss();
  x[at] = saved;
  return (up - down) / (2 * h);
}

// h = 1e-5: truncation ~h^2 |L'''| and cancellation ~1e-16 |L| / h, both below 1e-8 here.
const FD_BOUND = 1e-7;

test("attention gradients (GQA, two packed sequences) match central finite differences", () => {
  const shape: AttentionShape = { heads: 4, kvHeads: 2, headDim: 6, lengths: [5, 3] };
  const rows = 8;
  const q = uniform(rows * 24);
  const k = uniform(rows * 12);
  const v = uniform(rows * 12);
  const g = uniform(rows * 24);
  const loss = () => dot(g, attentionForward(shape, q, k, v).out);
  const grads = attentionBackward(shape, q, k, v, g);
  let worst = 0;
  for (const [name, x, grad] of [["q", q, grads.dQ], ["k", k, grads.dK], ["v", v, grads.dV]] as const)
    for (let trial = 0; trial < 8; trial++) {
      const at = Math.floor(random() * x.length);
      const fd = centralDifference(x, at, loss);
      const diff = Math.abs(fd - grad[at]!) / Math.max(1, Math.abs(fd));
      worst = Math.max(worst, diff);
      assert.ok(diff < FD_BOUND, `d${name}[${at}]: analytic ${grad[at]}, finite difference ${fd}`);
    }
  console.log(`  attention reference vs finite differences: worst difference ${worst.toExponential(2)}`);
});

test("attention lse is the log of the softmax denominator, and rows attend only within their sequence", () => {
  const shape: AttentionShape = { heads: 2, kvHeads: 1, headDim: 4, lengths: [3, 4] };
  const q = uniform(7 * 8);
  const k = uniform(7 * 4);
  const v = uniform(7 * 4);
  const { out, lse } = attentionForward(shape, q, k, v);
  // Row 3 is the first of the second sequence: it sees only itself, so out = v[3] and lse = q.k / 2.
  for (let h = 0; h < 2; h++) {
    assert.ok(Math.abs(lse[3 * 2 + h]! - dot(q.subarray((3 * 2 + h) * 4, (3 * 2 + h + 1) * 4), k.subarray(12, 16)) / 2) < 1e-12);
    for (let d = 0; d < 4; d++) assert.ok(Math.abs(out[(3 * 2 + h) * 4 + d]! - v[12 + d]!) < 1e-12);
  }
});

test.run();
