// Reduced reproduction of the Mesa 22.3 llvmpipe miscompile behind the wrong top-p tokens (docs/drivers.md).
// One workgroup sums exp(x - top) over the logits at or above a key (a tree reduction in workgroup memory),
// first once for a goal, then in a loop of bisection steps that compare each sum with that goal. WGSL
// guarantees every sum; on Mesa 22.3.6 the sums inside the loop come out wrong when `goal` is held in a
// register across the loop's barriers, and right when it is re-read from workgroup memory.
//   node --import tsx bench/drivers/mesa22-reduction.ts
import { kernelSource } from "../../compiler/kernels/wgsl.ts";
import { acquireDevice, adapterSummary } from "../../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage, readBuffer } from "../../runtime/gpu/kernel-runner.ts";

const N = 777;
const STEPS = 8;

function body(goalInWorkgroupMemory: boolean): string {
  const goalDecl = goalInWorkgroupMemory ? "var<workgroup> wgGoal: f32;" : "";
  const setGoal = goalInWorkgroupMemory
    ? "let g0 = massAtLeast(lid, 0u) * 0.9; if (lid == 0u) { wgGoal = g0; }"
    : "let goal = massAtLeast(lid, 0u) * 0.9;";
  const goal = goalInWorkgroupMemory ? "wgGoal" : "goal";
  return /* wgsl */ `
var<workgroup> sums: array<f32, 256>;
${goalDecl}
fn orderKey(x: f32) -> u32 {
  let b = bitcast<u32>(x);
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}
fn sumAll(lid: u32, v: f32) -> f32 {
  sums[lid] = v;
  for (var stride = 128u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { sums[lid] += sums[lid + stride]; }
  }
  workgroupBarrier();
  let total = sums[0];
  workgroupBarrier();
  return total;
}
fn massAtLeast(lid: u32, key: u32) -> f32 {
  var m = 0.0;
  for (var i = lid; i < ${N}u; i += 256u) {
    let x = logits[i];
    if (orderKey(x) >= key) { m += exp(x - 3.0); }
  }
  return sumAll(lid, m);
}
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
  ${setGoal}
  var cut = 0u;
  for (var bit = 32u; bit > ${32 - STEPS}u; bit--) {
    let candidate = cut | (1u << (bit - 1u));
    let mass = massAtLeast(lid, candidate);
    if (lid == 0u) { out[32u - bit] = mass; keys[32u - bit] = candidate; }
    if (mass >= ${goal}) { cut = candidate; }
  }
}`;
}

function orderKey(x: number): number {
  const b = new Uint32Array(new Float32Array([x]).buffer)[0]!;
  return (b & 0x80000000 ? ~b : b | 0x80000000) >>> 0;
}

const context = await acquireDevice();
const device = context.device;
const step = new StepEncoder(device, new PipelineCache(device));
let seed = 7;
const logits = Float32Array.from({ length: N }, () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 6 - 3);
console.log(adapterSummary(context.report));
for (const inWorkgroup of [false, true]) {
  const kernel = kernelSource({
    name: inWorkgroup ? "goal_in_workgroup" : "goal_in_register",
    constants: {},
    storage: [
      { name: "logits", access: "read", type: "array<f32>" },
      { name: "out", access: "read_write", type: "array<f32>" },
      { name: "keys", access: "read_write", type: "array<u32>" },
    ],
    params: [],
    body: body(inWorkgroup),
    dispatch: { groups: [1, 1, 1] },
  });
  const buffers = {
    logits: createStorage(device, logits, "logits"),
    out: createStorage(device, new Float32Array(STEPS), "out"),
    keys: createStorage(device, new Uint32Array(STEPS), "keys"),
  };
  step.dispatch(kernel, buffers, {});
  step.submit();
  const got = await readBuffer(device, buffers.out, 0, STEPS * 4);
  const keys = new Uint32Array((await readBuffer(device, buffers.keys, 0, STEPS * 4)).buffer);
  let worst = 0;
  for (let j = 0; j < STEPS; j++) {
    let want = 0;
    for (const x of logits) if (orderKey(x) >= keys[j]!) want += Math.exp(x - 3);
    worst = Math.max(worst, Math.abs(got[j]! - want) / want);
  }
  console.log(`${kernel.name.padEnd(18)} worst relative error of the loop's sums: ${worst.toExponential(2)} ${worst < 1e-5 ? "ok" : "MISCOMPUTED"}`);
}
context.destroy();
