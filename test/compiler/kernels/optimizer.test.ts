// Gradient norm and clip factor on the device, and AdamW / SGD steps reading that factor, against
// float64 references of torch's definitions (test/reference/optimizer.ts).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { NORM_PARTIALS_PER_BUFFER, gradClipKernel, gradSquaresKernel } from "../../../compiler/kernels/grad-norm.ts";
import { adamwKernel, adamwParams, sgdKernel, type AdamWSettings } from "../../../compiler/kernels/optimizer.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { adamwStep, clipFactor, globalNorm, sgdStep } from "../../reference/optimizer.ts";
import { nanFilled, openGpu, randomFloats, relativeError, seeded, type Gpu } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(47);

/** Records the norm of `grads` (one buffer each) into clip = [factor, norm]. */
function recordClip(g: Gpu, grads: readonly { buffer: GPUBuffer; count: number }[], partials: GPUBuffer, clip: GPUBuffer, maxNorm: number, gradScale: number) {
  grads.forEach(({ buffer, count }, slot) => g.step.dispatch(gradSquaresKernel(), { grad: buffer, partials }, { count, slot }));
  g.step.dispatch(gradClipKernel(), { partials, clip }, { partialCount: grads.length * NORM_PARTIALS_PER_BUFFER, maxNorm, gradScale });
}

async function deviceClip(sizes: readonly number[], data: readonly Float32Array[], maxNorm: number, gradScale: number) {
  const device = gpu.device;
  const buffers = data.map((d, i) => ({ buffer: createStorage(device, d, `grad${i}`), count: sizes[i]! }));
  const partials = createStorage(device, nanFilled(sizes.length * NORM_PARTIALS_PER_BUFFER), "partials");
  const clip = createStorage(device, nanFilled(2), "clip");
  recordClip(gpu, buffers, partials, clip, maxNorm, gradScale);
  gpu.step.submit();
  const got = await readBuffer(device, clip);
  for (const b of [...buffers.map((x) => x.buffer), partials, clip]) b.destroy();
  return got;
}

// Bound: norm and factor within 1e-6 relative of float64: sums of at most ~300 f32 squares per lane,
// then two tree sums, about 1e-7.
test("global gradient norm over three buffers (5, 1000 and 70001 elements) and clip_grad_norm_'s factor", async () => {
  const sizes = [1000, 70001, 5];
  const grads = sizes.map((n) => randomFloats(random, n, 0.3));
  const gradScale = 0.5;
  const norm = gradScale * globalNorm(grads);
  for (const maxNorm of [1, 1e6, 0]) {
    const [factor, gotNorm] = await deviceClip(sizes, grads, maxNorm, gradScale);
    const normError = Math.abs(gotNorm! - norm) / norm;
    const factorError = Math.abs(factor! - clipFactor(norm, maxNorm)) / clipFactor(norm, maxNorm);
    console.log(`  max_norm ${maxNorm}: norm ${gotNorm} (float64 ${norm.toFixed(6)}, error ${normError.toExponential(2)}), factor ${factor} (error ${factorError.toExponential(2)})`);
    assert.ok(normError < 1e-6, `norm ${gotNorm} vs ${norm}`);
    assert.ok(factorError < 1e-6, `factor ${factor} vs ${clipFactor(norm, maxNorm)}`);
    if (maxNorm !== 1) assert.is(factor, 1, "no clipping below max_norm or with max_norm 0");
  }
  const again = await deviceClip(sizes, grads, 1, gradScale);
  const first = await deviceClip(sizes, grads, 1, gradScale);
  assert.equal(Array.from(again), Array.from(first), "deterministic: the same gradients give the same bits");
});

// Bound: every parameter, m and v within 1e-6 relative (L2) of float64 after 3 steps. Parameters start
// small (|p| < 0.05) and lr is 1e-2 so the updates are as large as the parameters and an error in them
// shows; weight decay 0.1 so the decoupled decay does too.
test("AdamW: 3 steps over two parameter buffers sharing a clipped global norm, with a gradient scale", async () => {
  const settings: AdamWSettings = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1 };
  const sizes = [3000, 777];
  const gradScale = 0.5;
  const maxNorms = [5, 1e3, 2]; // clipping on steps 1 and 3 only
  const device = gpu.device;
  const initial = sizes.map((n) => randomFloats(random, n, 0.05));
  const state = sizes.map((n, i) => ({
    param: createStorage(device, initial[i]!, `param${i}`),
    grad: createStorage(device, n * 4, `grad${i}`),
    m: createStorage(device, n * 4, `m${i}`),
    v: createStorage(device, n * 4, `v${i}`),
  }));
  const partials = createStorage(device, nanFilled(sizes.length * NORM_PARTIALS_PER_BUFFER), "partials");
  const clip = createStorage(device, nanFilled(2), "clip");
  const want = sizes.map((n, i) => ({ p: Float64Array.from(initial[i]!), m: new Float64Array(n), v: new Float64Array(n) }));

  device.pushErrorScope("validation");
  for (let t = 1; t <= 3; t++) {
    const grads = sizes.map((n) => randomFloats(random, n));
    grads.forEach((g, i) => device.queue.writeBuffer(state[i]!.grad, 0, g));
    recordClip(gpu, state.map((s, i) => ({ buffer: s.grad, count: sizes[i]! })), partials, clip, maxNorms[t - 1]!, gradScale);
    state.forEach((s, i) => gpu.step.dispatch(adamwKernel(), { ...s, scale: clip }, adamwParams(settings, t, sizes[i]!, gradScale)));
    gpu.step.submit();

    const factor = gradScale * clipFactor(gradScale * globalNorm(grads), maxNorms[t - 1]!);
    want.forEach((w, i) => adamwStep(w.p, Array.from(grads[i]!, (g) => g * factor), w.m, w.v, settings, t));
  }
  for (let i = 0; i < sizes.length; i++) {
    const s = state[i]!;
    const errors = { p: relativeError(await readBuffer(device, s.param), want[i]!.p), m: relativeError(await readBuffer(device, s.m), want[i]!.m), v: relativeError(await readBuffer(device, s.v), want[i]!.v) };
    console.log(`  buffer ${i} (${sizes[i]}): ${Object.entries(errors).map(([n, e]) => `${n} ${e.toExponential(2)}`).join(", ")}`);
    for (const [name, e] of Object.entries(errors)) assert.ok(e < 1e-6, `buffer ${i} ${name}: relative error ${e}`);
  }
  const error = await device.popErrorScope();
  for (const b of [...state.flatMap((s) => Object.values(s)), partials, clip]) b.destroy();
  if (error) throw new Error(error.message);
});

// Bound: 1e-6 relative (one f32 multiply-add per element).
test("SGD: one step with a gradient scale and the clip factor read from the device", async () => {
  const n = 1234;
  const p0 = randomFloats(random, n, 0.05);
  const grad = randomFloats(random, n);
  const device = gpu.device;
  const b = { param: createStorage(device, p0, "param"), grad: createStorage(device, grad, "grad"), scale: createStorage(device, Float32Array.of(0.8), "scale") };
  gpu.step.dispatch(sgdKernel(), b, { count: n, lr: 0.03, gradScale: 0.25 });
  gpu.step.submit();
  const got = await readBuffer(device, b.param);
  for (const x of Object.values(b)) x.destroy();
  const want = Float64Array.from(p0);
  sgdStep(want, Array.from(grad, (g) => g * 0.25 * 0.8), 0.03);
  const error = relativeError(got, want);
  console.log(`  sgd: ${error.toExponential(2)}`);
  assert.ok(error < 1e-6, `relative error ${error}`);
});

test.after(() => gpu.context.destroy());
test.run();
