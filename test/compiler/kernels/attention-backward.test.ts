// Training attention forward (output and log-sum-exp) and its backward (dQ, dK, dV) against the float64
// reference on packed batches of sequences of a few hundred tokens, so every loop over key or query
// blocks of 64 runs several times. The backward runs on the GPU's own forward results, as in training.
import { test } from "uvu";
import * as assert from "uvu/assert";
import {
  attentionBackwardKeyValueKernel,
  attentionBackwardQueryKernel,
  attentionBackwardStatsKernel,
} from "../../../compiler/kernels/attention-backward.ts";
import { attentionTrainKernel, sequenceBounds } from "../../../compiler/kernels/attention-train.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { attentionBackward, attentionForward, type AttentionShape } from "../../reference/attention-gradients.ts";
import { nanFilled, openGpu, randomFloats, relativeError, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(41);

// Bound: relative L2 error < 1e-5 against float64 for out, lse, dQ, dK and dV. Every output element is a
// sum of at most a few hundred f32 products (scores, probabilities, their weighted sums), each a few
// ulps (~1e-7) off, far below the bound.
const BOUND = 1e-5;

async function check(shape: AttentionShape, qScale: number) {
  const { heads, kvHeads, headDim, lengths } = shape;
  const rows = lengths.reduce((a, b) => a + b, 0);
  const q = randomFloats(random, rows * heads * headDim, qScale);
  const k = randomFloats(random, rows * kvHeads * headDim);
  const v = randomFloats(random, rows * kvHeads * headDim);
  const dOut = randomFloats(random, rows * heads * headDim);
  const constants = { heads, kvHeads, headDim };

  const data = {
    q, k, v, dOut,
    sequences: sequenceBounds(lengths),
    out: nanFilled(rows * heads * headDim),
    lse: nanFilled(rows * heads),
    stats: nanFilled(2 * rows * heads),
    dQ: nanFilled(rows * heads * headDim),
    dK: nanFilled(rows * kvHeads * headDim),
    dV: nanFilled(rows * kvHeads * headDim),
  };
  const device = gpu.device;
  device.pushErrorScope("validation");
  const b = Object.fromEntries(Object.entries(data).map(([name, x]) => [name, createStorage(device, x, name)])) as Record<keyof typeof data, GPUBuffer>;
  const common = { q: b.q, k: b.k, v: b.v, dOut: b.dOut, stats: b.stats, sequences: b.sequences };
  gpu.step.dispatch(attentionTrainKernel(constants), { q: b.q, k: b.k, v: b.v, sequences: b.sequences, out: b.out, lse: b.lse }, { rows });
  gpu.step.dispatch(attentionBackwardStatsKernel(constants), { dOut: b.dOut, out: b.out, lse: b.lse, stats: b.stats }, { rows });
  gpu.step.dispatch(attentionBackwardQueryKernel(constants), { ...common, dQ: b.dQ }, { rows });
  gpu.step.dispatch(attentionBackwardKeyValueKernel(constants), { ...common, dK: b.dK, dV: b.dV }, { rows });
  gpu.step.submit();
  const got: Record<string, Float32Array> = {};
  for (const name of ["out", "lse", "dQ", "dK", "dV"] as const) got[name] = await readBuffer(device, b[name]);
  const error = await device.popErrorScope();
  for (const buffer of Object.values(b)) buffer.destroy();
  if (error) throw new Error(error.message);

  const forward = attentionForward(shape, q, k, v);
  const grads = attentionBackward(shape, q, k, v, dOut);
  const want: Record<string, Float64Array> = { out: forward.out, lse: forward.lse, ...grads };
  const errors = Object.fromEntries(Object.keys(want).map((name) => [name, relativeError(got[name]!, want[name]!)]));
  const label = `heads ${heads}/${kvHeads} dim ${headDim} lengths ${lengths.join(",")}`;
  console.log(`  ${label}: ${Object.entries(errors).map(([n, e]) => `${n} ${e.toExponential(2)}`).join(", ")}`);
  for (const [name, e] of Object.entries(errors)) assert.ok(e < BOUND, `${label}: ${name} relative error ${e}`);
}

test("GQA 4 heads over 2, three packed sequences of 200, 37 and 130 tokens", async () => {
  await check({ heads: 4, kvHeads: 2, headDim: 16, lengths: [200, 37, 130] }, 2);
});

test("multi-query (3 heads over 1), head_dim 72 above the workgroup size, a one-token sequence", async () => {
  await check({ heads: 3, kvHeads: 1, headDim: 72, lengths: [150, 1, 66] }, 1);
});

// q in [-10, 10): scores with a standard deviation about 3.3, so rows are dominated by a few keys and the
// lanes' maxima differ widely when merged.
test("multi-head (2 over 2), head_dim 128, one sequence of 260 tokens, peaked scores", async () => {
  await check({ heads: 2, kvHeads: 2, headDim: 128, lengths: [260] }, 10);
});

test.after(() => gpu.context.destroy());
test.run();
