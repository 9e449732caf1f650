// RMSNorm and SwiGLU against float64 references.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { swigluKernel } from "../../../compiler/kernels/elementwise.ts";
import { rmsNormKernel } from "../../../compiler/kernels/rmsnorm.ts";
import { nanFilled, openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(7);

test("rmsnorm matches float64 within 1e-6 relative (f32 sum of squares, one rounding per product)", async () => {
  for (const [rows, hidden] of [[1, 17], [3, 64], [37, 1000]] as const) {
    const x = randomFloats(random, rows * hidden, 3);
    const weight = randomFloats(random, hidden);
    const eps = 1e-5;
    const { out } = await runOnce(gpu, rmsNormKernel({ hidden, eps }), { x, weight, out: nanFilled(rows * hidden) }, { rows }, ["out"]);
    const want = new Float64Array(rows * hidden);
    for (let r = 0; r < rows; r++) {
      let sum = 0;
      for (let c = 0; c < hidden; c++) sum += x[r * hidden + c]! ** 2;
      const scale = 1 / Math.sqrt(sum / hidden + eps);
      for (let c = 0; c < hidden; c++) want[r * hidden + c] = x[r * hidden + c]! * scale * weight[c]!;
    }
    const error = relativeError(out!, want);
    assert.ok(error < 1e-6, `rows ${rows} hidden ${hidden}: error ${error}`);
  }
});

test("swiglu is silu(gate) * up, finite for gates of magnitude 1e4", async () => {
  const n = 1001;
  const gate = randomFloats(random, n, 8);
  gate.set([1e4, -1e4, 90, -90, 0]);
  const up = randomFloats(random, n);
  const { out } = await runOnce(gpu, swigluKernel(), { gate, up, out: nanFilled(n) }, { n }, ["out"]);
  const want = Array.from(gate, (g, i) => (g / (1 + Math.exp(-g))) * up[i]!);
  const error = relativeError(out!, want);
  assert.ok(error < 1e-6, `error ${error}`);
  assert.ok(out!.every(Number.isFinite));
});

test.after(() => gpu.context.destroy());
test.run();
