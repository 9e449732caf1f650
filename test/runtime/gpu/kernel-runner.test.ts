// The step encoder: many dispatches with their own params in one submit, copies between them,
// buffer ranges, pipeline reuse by key, and clear errors for a wrong dispatch.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "../../../compiler/kernels/wgsl.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";

/** out = a + b over n floats: a kernel to drive the encoder with (no plan has an elementwise add). */
function addKernel() {
  return kernelSource({
    name: "add",
    constants: {},
    storage: [
      { name: "a", access: "read", type: "array<f32>" },
      { name: "b", access: "read", type: "array<f32>" },
      { name: "out", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "n", type: "u32" }],
    body: /* wgsl */ `
@compute @workgroup_size(64)
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * 64u + lid;
  if (i >= params.n) { return; }
  out[i] = a[i] + b[i];
}`,
    dispatch: { grid: { param: "n", per: 64 } },
  });
}

const context = await acquireDevice();
const device = context.device;
const cache = new PipelineCache(device);
const step = new StepEncoder(device, cache);

test("one step chains dispatches with different params, split by a copy, then reuses its arena", async () => {
  const ones = createStorage(device, new Float32Array(64).fill(1), "ones");
  const a = createStorage(device, new Float32Array(64), "a");
  const b = createStorage(device, new Float32Array(64).fill(NaN), "b");
  const add = addKernel();
  for (let round = 0; round < 2; round++) {
    step.dispatch(add, { a, b: ones, out: b }, { n: 64 }); // b = a + 1
    step.dispatch(add, { a: b, b: ones, out: a }, { n: 10 }); // a[:10] += 2 in total
    step.copy(a, 0, b, 0, 16); // b[:4] = a[:4]
    step.dispatch(add, { a: b, b: ones, out: a }, { n: 3 }); // a[:3] = b[:3] + 1
    step.submit();
  }
  const got = Array.from(await readBuffer(device, a, 0, 48));
  // Round 1: a = [3,3,3,2 x7,0...]; round 2 starts from it: b = a+1, a[:10] = b+1, a[:3] = a+1.
  assert.equal(got.slice(0, 12), [6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 0, 0]);
  assert.is(cache.size, 1, "one pipeline for one key");
  for (const buffer of [ones, a, b]) buffer.destroy();
});

test("buffer ranges bind at 256-byte offsets", async () => {
  const data = createStorage(device, Float32Array.from({ length: 128 }, (_, i) => i), "data");
  const out = createStorage(device, new Float32Array(64).fill(NaN), "out");
  step.dispatch(addKernel(), { a: { buffer: data, offset: 256, size: 256 }, b: { buffer: data, offset: 0, size: 256 }, out }, { n: 64 });
  step.submit();
  const got = await readBuffer(device, out);
  assert.equal(Array.from(got.subarray(0, 3)), [64, 66, 68]);
  data.destroy();
  out.destroy();
});

test("a wrong dispatch is refused with the kernel and the name at fault", () => {
  const buffer = createStorage(device, 16, "x");
  assert.throws(() => step.dispatch(addKernel(), { a: buffer, b: buffer }, { n: 1 }), /add\(\): no buffer for binding "out"/);
  assert.throws(() => step.dispatch(addKernel(), { a: buffer, b: buffer, out: buffer, c: buffer }, { n: 1 }), /no binding "c"/);
  assert.throws(() => step.dispatch(addKernel(), { a: buffer, b: buffer, out: buffer }, {}), /no value for param "n"/);
  assert.throws(() => step.dispatch(addKernel(), { a: buffer, b: buffer, out: buffer }, { n: 1.5 }), /must be an integer/);
  assert.throws(() => step.dispatch(addKernel(), { a: { buffer, offset: 4, size: 4 }, b: buffer, out: buffer }, { n: 1 }), /offset 4/);
  buffer.destroy();
});

test.after(() => {
  step.destroy();
  context.destroy();
});
test.run();
