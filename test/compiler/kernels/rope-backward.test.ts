// RoPE backward (the transposed rotation) against the float64 reference, at the positions of packed
// training sequences up to 300 tokens, and the forward kernel followed by the backward kernel as identity.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { sequencePositions } from "../../../compiler/kernels/attention-train.ts";
import { ropeBackwardKernel } from "../../../compiler/kernels/rope-backward.ts";
import { ropeKernel } from "../../../compiler/kernels/rope.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { ropeBackward } from "../../reference/rope-gradients.ts";
import { openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(43);

const INV_FREQ_LINE = /^const INV_FREQ = .*$/m;

test("forward and backward bake the same f32 inverse frequencies, so their angles are bit-identical", () => {
  for (const c of [{ heads: 4, kvHeads: 2, headDim: 64, theta: 10000 }, { heads: 2, kvHeads: 1, headDim: 18, theta: 500000 }]) {
    const forward = ropeKernel(c).wgsl.match(INV_FREQ_LINE)?.[0];
    assert.ok(forward, "the forward declares INV_FREQ");
    assert.is(ropeBackwardKernel(c).wgsl.match(INV_FREQ_LINE)?.[0], forward);
  }
});

// Bound: relative L2 error < 1e-5 against float64 with the f32 angle (the reference models it; see
// rope-gradients.ts): what remains is the device's cos and sin of angles up to 300 radians and one f32
// rounding per product.
test("rope backward: dq and dk of three packed sequences (positions 0..299), GQA 4 over 2", async () => {
  const [heads, kvHeads, headDim, theta] = [4, 2, 16, 10000];
  const positions = sequencePositions([300, 7, 120]);
  const rows = positions.length;
  const dq = randomFloats(random, rows * heads * headDim);
  const dk = randomFloats(random, rows * kvHeads * headDim);
  const got = await runOnce(gpu, ropeBackwardKernel({ heads, kvHeads, headDim, theta }), { dq, dk, positions }, { rows }, ["dq", "dk"]);
  const qError = relativeError(got.dq!, ropeBackward(dq, { heads, headDim, theta }, positions));
  const kError = relativeError(got.dk!, ropeBackward(dk, { heads: kvHeads, headDim, theta }, positions));
  console.log(`  rope backward: dq ${qError.toExponential(2)}, dk ${kError.toExponential(2)}`);
  assert.ok(qError < 1e-5 && kError < 1e-5, `dq ${qError}, dk ${kError}`);
});

// Bound: 1e-6 relative; rotating by an angle and back by the same f32 angle loses a few ulps.
test("rope forward then rope backward on the device gives back q and k", async () => {
  const [heads, kvHeads, headDim, theta] = [3, 1, 10, 10000];
  const positions = sequencePositions([260, 40]);
  const rows = positions.length;
  const q = randomFloats(random, rows * heads * headDim);
  const k = randomFloats(random, rows * kvHeads * headDim);
  const device = gpu.device;
  const b = { q: createStorage(device, q, "q"), k: createStorage(device, k, "k"), positions: createStorage(device, positions, "positions") };
  gpu.step.dispatch(ropeKernel({ heads, kvHeads, headDim, theta }), b, { rows });
  gpu.step.dispatch(ropeBackwardKernel({ heads, kvHeads, headDim, theta }), { dq: b.q, dk: b.k, positions: b.positions }, { rows });
  gpu.step.submit();
  const [gotQ, gotK] = [await readBuffer(device, b.q), await readBuffer(device, b.k)];
  for (const buffer of Object.values(b)) buffer.destroy();
  const [qError, kError] = [relativeError(gotQ, q), relativeError(gotK, k)];
  console.log(`  rope round trip: q ${qError.toExponential(2)}, k ${kError.toExponential(2)}`);
  assert.ok(qError < 1e-6 && kError < 1e-6, `q ${qError}, k ${kError}`);
});

test.after(() => gpu.context.destroy());
test.run();
