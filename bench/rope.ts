// What rotary scaling costs in the rope kernel: plain RoPE against linear and llama3 (their frequencies
// baked as constants, so the same instructions) and dynamic (a per-row exp2/log2 and one more binding),
// at Llama-3.2-1B's attention shape (32 query heads over 8 kv heads, head size 64) for a decode step and
// for prefills of 128 and 2048 rows.
//   node --import tsx bench/rope.ts [--repeats 5]
// Each figure is the best of `repeats` submits of ROUNDS dispatches, in microseconds per dispatch.
import { parseArgs } from "node:util";
import { ropeKernel, type RopeConstants } from "../compiler/kernels/rope.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage } from "../runtime/gpu/kernel-runner.ts";
import type { RopeScaling } from "../runtime/package/format.ts";

const { values } = parseArgs({ options: { repeats: { type: "string", default: "5" } } });
const REPEATS = Number(values.repeats);
const ROUNDS = 10;
const ROWS = [1, 128, 2048];
const SHAPE = { heads: 32, kvHeads: 8, headDim: 64, theta: 500000 };
const VARIANTS: [string, RopeScaling | undefined][] = [
  ["plain", undefined],
  ["linear", { type: "linear", factor: 4 }],
  ["llama3", { type: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 }],
  ["dynamic", { type: "dynamic", factor: 2, originalMaxPositions: 1024 }],
];

const gpu = await acquireDevice();
const device = gpu.device;
const step = new StepEncoder(device, new PipelineCache(device));
const maxRows = Math.max(...ROWS);
const floats = (n: number) => Float32Array.from({ length: n }, () => Math.random() * 2 - 1);
const q = createStorage(device, floats(maxRows * SHAPE.heads * SHAPE.headDim), "q");
const k = createStorage(device, floats(maxRows * SHAPE.kvHeads * SHAPE.headDim), "k");
const positions = createStorage(device, Uint32Array.from({ length: maxRows }, (_, i) => i), "positions");
// A prefill past the original context: every row scaled.
const lengths = createStorage(device, Uint32Array.from({ length: maxRows }, () => 2048), "lengths");

async function time(c: RopeConstants, rows: number): Promise<number> {
  const kernel = ropeKernel(c);
  const buffers = { q, k, positions, ...(c.scaling?.type === "dynamic" ? { lengths } : {}) };
  let best = Infinity;
  for (let r = 0; r <= REPEATS; r++) {
    for (let round = 0; round < ROUNDS; round++) step.dispatch(kernel, buffers, { rows });
    const start = performance.now();
    step.submit();
    await device.queue.onSubmittedWorkDone();
    // the first submit compiles the pipeline
    if (r > 0) best = Math.min(best, ((performance.now() - start) * 1000) / ROUNDS);
  }
  return best;
}

console.log(`device: ${adapterSummary(gpu.report)}; best of ${REPEATS}, ${ROUNDS} dispatches per submit; us per dispatch`);
console.log(`\n| rows | ${VARIANTS.map(([name]) => name).join(" | ")} |`);
console.log(`| ---: | ${VARIANTS.map(() => "---:").join(" | ")} |`);
for (const rows of ROWS) {
  const times: number[] = [];
  for (const [, scaling] of VARIANTS) times.push(await time({ ...SHAPE, ...(scaling ? { scaling } : {}) }, rows));
  console.log(`| ${rows} | ${times.map((t) => t.toFixed(0)).join(" | ")} |`);
}
for (const b of [q, k, positions, lengths]) b.destroy();
gpu.destroy();
