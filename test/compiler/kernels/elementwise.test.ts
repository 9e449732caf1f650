// RMSNorm (w and gemma's 1 + w), SwiGLU, GeGLU, scale and bias against float64 references.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { biasKernel, gegluKernel, scaleKernel, swigluKernel } from "../../../compiler/kernels/elementwise.ts";
import { rmsNormKernel } from "../../../compiler/kernels/rmsnorm.ts";
import { nanFilled, openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(7);

test("rmsnorm matches float64 within 1e-6 relative (f32 sum of squares, one rounding per product)", async () => {
  for (const [rows, hidden, offset] of [[1, 17, 0], [3, 64, 0], [37, 1000, 0], [3, 64, 1], [5, 333, 1]] as const) {
    const x = randomFloats(random, rows * hidden, 3);
    const weight = randomFloats(random, hidden);
    const eps = 1e-5;
    const kernel = rmsNormKernel({ hidden, eps, ...(offset ? { offset } : {}) });
    const { out } = await runOnce(gpu, kernel, { x, weight, out: nanFilled(rows * hidden) }, { rows }, ["out"]);
    const want = new Float64Array(rows * hidden);
    for (let r = 0; r < rows; r++) {
      let sum = 0;
      for (let c = 0; c < hidden; c++) sum += x[r * hidden + c]! ** 2;
      const scale = 1 / Math.sqrt(sum / hidden + eps);
      for (let c = 0; c < hidden; c++) want[r * hidden + c] = x[r * hidden + c]! * scale * (offset + weight[c]!);
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

test("geglu is gelu_pytorch_tanh(gate) * up, finite for gates of magnitude 1e4", async () => {
  const n = 1001;
  const gate = randomFloats(random, n, 4);
  gate.set([1e4, -1e4, 30, -30, 0]);
  const up = randomFloats(random, n);
  const { out } = await runOnce(gpu, gegluKernel(), { gate, up, out: nanFilled(n) }, { n }, ["out"]);
  const gelu = (x: number) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)));
  const error = relativeError(out!, Array.from(gate, (g, i) => gelu(g) * up[i]!));
  assert.ok(error < 1e-6, `error ${error}`);
  assert.ok(out!.every(Number.isFinite));
});

test("scale multiplies in place by its factor; bias adds its row to every row in place", async () => {
  const n = 3 * 37;
  const x = randomFloats(random, n);
  const scaled = await runOnce(gpu, scaleKernel({ factor: Math.fround(Math.sqrt(2048)) }), { x: x.slice() }, { n }, ["x"]);
  assert.ok(relativeError(scaled.x!, Array.from(x, (v) => v * Math.sqrt(2048))) < 1e-7);
  const bias = randomFloats(random, 37);
  const biased = await runOnce(gpu, biasKernel({ width: 37 }), { bias, y: x.slice() }, { n }, ["y"]);
  assert.equal(Array.from(biased.y!), Array.from(x, (v, i) => Math.fround(v + bias[i % 37]!)));
});

test.after(() => gpu.context.destroy());
test.run();
