// The float64 RoPE gradient against central finite differences of L = sum(G * rope(x)).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { mulberry32 } from "../../examples/random-checkpoint.ts";
import { ropeBackward, ropeForward, type RopeShape } from "./rope-gradients.ts";

const random = mulberry32(6);
const uniform = (n: number) => Float64Array.from({ length: n }, () => random() * 2 - 1);

test("rope gradient matches central finite differences", () => {
  const shape: RopeShape = { heads: 3, headDim: 8, theta: 10000 };
  const positions = [0, 7, 130, 299];
  const x = uniform(positions.length * 24);
  const g = uniform(positions.length * 24);
  const loss = () => ropeForward(x, shape, positions).reduce((sum, y, i) => sum + g[i]! * y, 0);
  const grad = ropeBackward(g, shape, positions);
  const h = 1e-5;
  for (let trial = 0; trial < 12; trial++) {
    const at = Math.floor(random() * x.length);
    const saved = x[at]!;
    x[at] = saved + h;
    const up = loss();
    x[at] = saved - h;
    const down = loss();
    x[at] = saved;
    const fd = (up - down) / (2 * h);
    // L is linear in x, so the central difference is exact up to cancellation (~1e-16 |L| / h).
    assert.ok(Math.abs(fd - grad[at]!) < 1e-9, `dx[${at}]: analytic ${grad[at]}, finite difference ${fd}`);
  }
});

test("the backward undoes the forward: R(-angle) R(angle) = I", () => {
  const shape: RopeShape = { heads: 2, headDim: 6, theta: 500000 };
  const positions = [3, 250];
  const x = uniform(24);
  const back = ropeBackward(ropeForward(x, shape, positions), shape, positions);
  assert.ok(back.every((y, i) => Math.abs(y - x[i]!) < 1e-14));
});

test.run();
