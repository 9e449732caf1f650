// Where a step should switch from the matvec kernels to the prefill matmul: the time of one layer's
// seven linear products plus the output head, for 1 and 8 to 64 rows, run three ways: the matvec kernel over
// all rows (groups of 8 in one dispatch), ceil(rows / 8) separate 8-row matvec dispatches, and the
// register-tiled matmul. Shapes are those of bench/milora.ts and of bench/serve.ts --model small.
//   node --import tsx bench/linear-rows.ts [--repeats 3]
// Each figure is the best of `repeats` submits of 3 rounds of the layer; the plan's MATVEC_MAX_ROWS
// (compiler/plan.ts) comes from where the matvec column stops beating the matmul column; `milora bench
// --calibrate` measures the same crossover per device and weight format with the shared LinearTimer.
import { parseArgs } from "node:util";
import { matmulKernel } from "../compiler/kernels/matmul.ts";
import { matvecKernel } from "../compiler/kernels/matvec.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { LinearTimer, type TimedLinear } from "../bin/measure/crossover.ts";

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
console.log(`device: ${adapterSummary(gpu.report)}; best of ${REPEATS}, ${ROUNDS} rounds per submit; us per layer (7 linears) + lm_head`);
for (const model of MODELS) {
  // f32 weights, no residual: the shapes alone (milora bench --calibrate times a plan's own kernels)
  const timed: TimedLinear[] = model.shapes.map(([K, N]) => ({
    K,
    N,
    format: "f32",
    residual: false,
    blocks: [{ firstRow: 0, rows: N, matvec: matvecKernel({ K, N, residual: false }), matmul: matmulKernel({ K, N, residual: false }) }],
  }));
  const timer = new LinearTimer(gpu, timed, MAX_ROWS);
  const o = { repeats: REPEATS, rounds: ROUNDS };
  for (const way of ["matvec", "matmul"] as const) await timer.time(MAX_ROWS, way, o); // compile and warm up
  console.log(`\n${model.name}\n`);
  console.log("| rows | matvec us | 8-row dispatches us | matmul us | matvec / matmul |");
  console.log("| ---: | ---: | ---: | ---: | ---: |");
  for (const rows of ROWS) {
    const [matvec, dispatches, matmul] = [await timer.time(rows, "matvec", o), await timer.time(rows, "8-row dispatches", o), await timer.time(rows, "matmul", o)];
    console.log(`| ${rows} | ${matvec.toFixed(0)} | ${dispatches.toFixed(0)} | ${matmul.toFixed(0)} | ${(matvec / matmul).toFixed(2)}x |`);
  }
  timer.destroy();
}
gpu.destroy();
