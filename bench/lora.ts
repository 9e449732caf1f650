// What one LoRA module costs at decode next to its base matrix-vector product: shrink and expand apart,
// the pair with the module on for every row, and with it switched off (gate 0), for 1 row, 8 rows of
// one tenant and 8 rows of 8 distinct tenants. Expand is the engine's DoRA-capable kernel over a fused
// residual (o_proj's and down_proj's): "expand" on plain LoRA slots (factors 1), "DoRA expand" on DoRA
// slots (factors not 1: it also reads each output's factor and residual), against the plain kernel.
//   node --import tsx bench/lora.ts [--hidden 1024] [--rank 8] [--repeats 5]
// Each figure is the best of `repeats` runs of 50 dispatches recorded as one step.
import { parseArgs } from "node:util";
import { loraExpandKernel, loraShrinkKernel, packLoraSlots } from "../compiler/kernels/lora.ts";
import { matvecKernel } from "../compiler/kernels/matvec.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage } from "../runtime/gpu/kernel-runner.ts";
import { bestMicros } from "../bin/measure/kernel-timing.ts";

const { values } = parseArgs({ options: { hidden: { type: "string", default: "1024" }, rank: { type: "string", default: "8" }, repeats: { type: "string", default: "5" } } });
const hidden = Number(values.hidden);
const rank = Number(values.rank);
const repeats = Number(values.repeats);
const TENANTS = 8;
const DISPATCHES = 50;

const gpu = await acquireDevice();
const device = gpu.device;
const step = new StepEncoder(device, new PipelineCache(device));
const random = () => Math.random() * 2 - 1;
const floats = (n: number) => Float32Array.from({ length: n }, random);

const dims = { inFeatures: hidden, outFeatures: hidden, maxRank: rank };
const shrink = loraShrinkKernel(dims);
const plainExpand = loraExpandKernel(dims);
const expand = loraExpandKernel({ ...dims, dora: true, residual: true });
const matvec = matvecKernel({ K: hidden, N: hidden, residual: false });
const b = {
  x: createStorage(device, floats(TENANTS * hidden), "x"),
  w: createStorage(device, floats(hidden * hidden), "w"),
  y: createStorage(device, TENANTS * hidden * 4, "y"),
  a: createStorage(device, floats(TENANTS * rank * hidden), "a"),
  b: createStorage(device, floats(TENANTS * hidden * rank), "b"),
  t: createStorage(device, TENANTS * rank * 4, "t"),
  slots: createStorage(device, packLoraSlots(Array.from({ length: TENANTS }, () => ({ rank, scaling: 2 }))), "slots"),
  distinct: createStorage(device, Uint32Array.from({ length: TENANTS }, (_, i) => i), "one tenant per row"),
  same: createStorage(device, new Uint32Array(TENANTS), "one tenant for all rows"),
  residual: createStorage(device, floats(TENANTS * hidden), "residual"),
  ones: createStorage(device, new Float32Array(TENANTS * hidden).fill(1), "DoRA factors of plain slots"),
  factors: createStorage(device, Float32Array.from({ length: TENANTS * hidden }, () => 1 + 0.1 * random()), "DoRA factors"),
  on: createStorage(device, new Float32Array(TENANTS).fill(1), "gates on"),
  off: createStorage(device, new Float32Array(TENANTS), "gates off"),
};

/** Best time of one dispatch group, in microseconds. */
const time = (record: () => void) => bestMicros(step, device, record, { repeats, rounds: DISPATCHES });

/** Recorders of shrink alone, expand alone and the pair, for `rows` rows of `rowAdapter` under `gates`. */
function lora(rows: number, rowAdapter: GPUBuffer, gates: GPUBuffer) {
  const params = { rows, gateStride: 1, gateIndex: 0 };
  const common = { slots: b.slots, rowAdapter, gates };
  const shrinkOnly = () => step.dispatch(shrink, { x: b.x, a: b.a, t: b.t, ...common }, params);
  const expandOnly = () => step.dispatch(expand, { t: b.t, b: b.b, y: b.y, dora: b.ones, residual: b.residual, ...common }, params);
  const doraExpand = () => step.dispatch(expand, { t: b.t, b: b.b, y: b.y, dora: b.factors, residual: b.residual, ...common }, params);
  const plainOnly = () => step.dispatch(plainExpand, { t: b.t, b: b.b, y: b.y, ...common }, params);
  return { shrinkOnly, expandOnly, doraExpand, plainOnly, pair: () => (shrinkOnly(), expandOnly()) };
}

console.log(`${adapterSummary(gpu.report)}; module ${hidden}x${hidden}, rank ${rank}\n`);
console.log("| rows | base matvec (us) | shrink (us) | expand (us) | LoRA on (us) | on / base | LoRA off (us) | off / base | plain-kernel expand (us) | DoRA expand (us) |");
console.log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
const cases = [
  { label: "1", rows: 1, rowAdapter: b.distinct },
  { label: `${TENANTS}, 1 tenant`, rows: TENANTS, rowAdapter: b.same },
  { label: `${TENANTS}, ${TENANTS} tenants`, rows: TENANTS, rowAdapter: b.distinct },
];
for (const { label, rows, rowAdapter } of cases) {
  const on = lora(rows, rowAdapter, b.on);
  await time(on.pair); // compile and warm up
  const base = await time(() => step.dispatch(matvec, { x: b.x, w: b.w, y: b.y }, { rows }));
  const [shrinkUs, expandUs, onUs] = [await time(on.shrinkOnly), await time(on.expandOnly), await time(on.pair)];
  const off = await time(lora(rows, rowAdapter, b.off).pair);
  const [plainUs, doraUs] = [await time(on.plainOnly), await time(on.doraExpand)];
  const f = (x: number) => x.toFixed(0);
  console.log(`| ${label} | ${f(base)} | ${f(shrinkUs)} | ${f(expandUs)} | ${f(onUs)} | ${(onUs / base).toFixed(2)}x | ${f(off)} | ${(off / base).toFixed(2)}x | ${f(plainUs)} | ${f(doraUs)} |`);
}
gpu.destroy();
