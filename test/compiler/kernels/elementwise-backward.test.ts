// SwiGLU's backward against float64 (test/reference/gradients.ts), into new buffers and in place.
// Bound: 1e-5 relative (L2), as the project's f32 kernels;
// each element is a few f32 operations on one exp, so also every element on its own within 1e-5 of
// float64 relative to its size, |gate| up to 30 included (where a cancelling 1 - sigmoid would lose it).
// dGate's size there is that of its terms, |dAct up| s (1 + |g| (1 - s)): silu' has a root near
// g = -1.278, where the sum cancels (2e-6 of the value seen at g = -1.2706).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { swigluBackwardKernel } from "../../../compiler/kernels/elementwise-backward.ts";
import { swigluBackward } from "../../reference/gradients.ts";
import { nanFilled, openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(53);
const BOUND = 1e-5;

/** Largest |got - want| / size over the elements; size defaults to |want|. */
function worstElement(got: Float32Array, want: Float64Array, size: (i: number) => number = (i) => Math.abs(want[i]!)): number {
  let worst = 0;
  for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!) / Math.max(size(i), 1e-30));
  return worst;
}

/** The size of dGate's terms (see the header). */
function dGateSize(gate: Float32Array, up: Float32Array, dAct: Float32Array): (i: number) => number {
  return (i) => {
    const s = 1 / (1 + Math.exp(-gate[i]!));
    return Math.abs(dAct[i]! * up[i]!) * s * (1 + Math.abs(gate[i]!) * (1 - s));
  };
}

function swigluInputs(n: number) {
  const gate = randomFloats(random, n, 6);
  gate.set([30, -30, 12.5, -12.5, 0, 1e-4, -1e-4], 0);
  return { gate, up: randomFloats(random, n), dAct: randomFloats(random, n) };
}

test("swiglu_backward into dGate and dUp, 1000 values and a partial last workgroup", async () => {
  for (const n of [1000, 7]) {
    const { gate, up, dAct } = swigluInputs(n);
    const got = await runOnce(gpu, swigluBackwardKernel({ inPlace: false }), { gate, up, dAct, dGate: nanFilled(n), dUp: nanFilled(n) }, { n }, ["dGate", "dUp"]);
    const want = swigluBackward(gate, up, dAct);
    const errors = [relativeError(got.dGate!, want.dGate), relativeError(got.dUp!, want.dUp)];
    const elements = [worstElement(got.dGate!, want.dGate, dGateSize(gate, up, dAct)), worstElement(got.dUp!, want.dUp)];
    assert.ok(Math.max(...errors, ...elements) < BOUND, `n=${n}: errors ${errors}, worst elements ${elements}`);
    if (n === 1000) console.log(`  swiglu_backward dGate ${errors[0]!.toExponential(2)} dUp ${errors[1]!.toExponential(2)}, worst element ${Math.max(...elements).toExponential(2)}`);
  }
});

test("swiglu_backward in place overwrites gate and up with their gradients", async () => {
  const n = 513;
  const { gate, up, dAct } = swigluInputs(n);
  const want = swigluBackward(gate, up, dAct);
  const got = await runOnce(gpu, swigluBackwardKernel({ inPlace: true }), { gate, up, dAct }, { n }, ["gate", "up"]);
  assert.ok(relativeError(got.gate!, want.dGate) < BOUND && relativeError(got.up!, want.dUp) < BOUND);
  assert.equal(swigluBackwardKernel({ inPlace: true }).bindings.map((b) => `${b.name}:${b.access}`), ["gate:read_write", "up:read_write", "dAct:read", "params:uniform"]);
});

test.after(() => gpu.context.destroy());
test.run();
