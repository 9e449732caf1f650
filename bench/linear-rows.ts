// Where a step should switch from the matvec kernels to the prefill matmul: the time of one layer's
// seven linear products plus the output head, for 1 and 8 to 64 rows, run three ways: the matvec kernel over
// all rows (groups of 8 in one dispatch), ceil(rows / 8) separate 8-row matvec dispatches, and the
// register-tiled matmul. Shapes are those of bench/milora.ts and of bench/serve.ts --model small.
//   node --import tsx bench/linear-rows.ts [--repeats 3]
// Each figure is the best of `repeats` submits of 3 rounds of the layer; the plan's MATVEC_MAX_ROWS
// (compiler/plan.ts) comes from where the matvec column stops beating the matmul column.
import { parseArgs } from "node:util";
import type { KernelSource } from "../compiler/kernels/kernel.ts";
import { matmulKernel } from "../compiler/kernels/matmul.ts";
import { MATVEC_GROUP_ROWS, matvecKernel } from "../compiler/kernels/matvec.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage } from "../runtime/gpu/kernel-runner.ts";

const { values } = parseArgs({ options: { repeats: { type: "string", default: "3" } } });
const REPEATS = Number(values.repeats);
const ROUNDS = 3;
const ROWS = [1, 8, 12, 16, 20, 24, 32, 40, 48, 64];
const MAX_ROWS = Math.max(...ROWS);

/** [K, N] of each linear: q, k, v, o, gate, up, down, lm_head. */
function linears(hidden: number, kvWidth: number, intermediate: number, vocab: number): [number, number][] {
  return [[hidden, hidden], [hidden, kvWidth], [hidden, kvWidth], [hidden, hidden], [hidden, intermediate], [hidden, intermediate], [intermediate, hidden], [hidden, vocab]];
}
const MODELS = [
  { name: "bench/milora.ts (hidden 512, intermediate 1344, vocab 4096)", shapes: linears(512, 256, 1344, 4096) },
  { name: "bench/serve.ts --model small (hidden 512, intermediate 1408, vocab 512)", shapes: linears(512, 256, 1408, 512) },
];

const gpu = await acquireDevice();
const device = gpu.device;
const step = new StepEncoder(device, new PipelineCache(device));
const floats = (n: number) => Float32Array.from({ length: n }, () => Math.random() * 2 - 1);

type Way = "matvec" | "8-row dispatches" | "matmul";

/** Best microseconds of one pass of `shapes` at `rows` rows, run `way`. */
async function time(shapes: readonly { K: number; N: number; w: GPUBuffer; x: GPUBuffer; y: GPUBuffer; matvec: KernelSource; matmul: KernelSource }[], rows: number, way: Way): Promise<number> {
  let best = Infinity;
  for (let r = 0; r < REPEATS; r++) {
    for (let round = 0; round < ROUNDS; round++) {
      for (const s of shapes) {
        const buffers = { x: s.x, w: s.w, y: s.y };
        if (way === "matmul") step.dispatch(s.matmul, buffers, { rows });
        else if (way === "matvec") step.dispatch(s.matvec, buffers, { rows });
        else for (let first = 0; first < rows; first += MATVEC_GROUP_ROWS) step.dispatch(s.matvec, buffers, { rows: Math.min(MATVEC_GROUP_ROWS, rows - first) });
      }
    }
    const start = performance.now();
    step.submit();
    await device.queue.onSubmittedWorkDone();
    best = Math.min(best, ((performance.now() - start) * 1000) / ROUNDS);
  }
  return best;
}

console.log(`device: ${adapterSummary(gpu.report)}; best of ${REPEATS}, ${ROUNDS} rounds per submit; us per layer (7 linears) + lm_head`);
for (const model of MODELS) {
  const shapes = model.shapes.map(([K, N]) => ({
    K,
    N,
    w: createStorage(device, floats(N * K), `w ${N}x${K}`),
    x: createStorage(device, floats(MAX_ROWS * K), "x"),
    y: createStorage(device, MAX_ROWS * N * 4, "y"),
    matvec: matvecKernel({ K, N, residual: false }),
    matmul: matmulKernel({ K, N, residual: false }),
  }));
  for (const way of ["matvec", "matmul"] as const) await time(shapes, MAX_ROWS, way); // compile and warm up
  console.log(`\n${model.name}\n`);
  console.log("| rows | matvec us | 8-row dispatches us | matmul us | matvec / matmul |");
  console.log("| ---: | ---: | ---: | ---: | ---: |");
  for (const rows of ROWS) {
    const [matvec, dispatches, matmul] = [await time(shapes, rows, "matvec"), await time(shapes, rows, "8-row dispatches"), await time(shapes, rows, "matmul")];
    console.log(`| ${rows} | ${matvec.toFixed(0)} | ${dispatches.toFixed(0)} | ${matmul.toFixed(0)} | ${(matvec / matmul).toFixed(2)}x |`);
  }
  for (const s of shapes) for (const b of [s.w, s.x, s.y]) b.destroy();
}
gpu.destroy();
