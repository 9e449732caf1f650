// Kernel micro-benchmark: `node --import tsx bench/kernels.ts`. Prints the tiled matmul's GFLOP/s
// against a naive one-output-per-invocation matmul, and the matvec's GB/s against a plain buffer copy,
// all measured in this one run, so the ratios hold whatever the machine; then the matvec with the LoRA
// epilogue (decode's fused LoRA, rank 32, every row its own slot) against the plain matvec on the small
// model's MLP shapes, 1 and 8 rows.
import type { KernelSource } from "../compiler/kernels/kernel.ts";
import { matmulKernel } from "../compiler/kernels/matmul.ts";
import { matvecKernel } from "../compiler/kernels/matvec.ts";
import { loraRowColumns } from "../runtime/gpu/layouts.ts";
import { kernelSource } from "../compiler/kernels/wgsl.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage, readBuffer, type BufferArg } from "../runtime/gpu/kernel-runner.ts";

const context = await acquireDevice();
const device = context.device;
const step = new StepEncoder(device, new PipelineCache(device));

/** The baseline a register-tiled kernel should beat: one invocation per output, K loop from memory. */
function naiveMatmul(K: number, N: number): KernelSource {
  return kernelSource({
    name: "naive_matmul",
    constants: { K, N },
    storage: [
      { name: "x", access: "read", type: "array<f32>" },
      { name: "w", access: "read", type: "array<f32>" },
      { name: "y", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: `
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  let row = id.y;
  let col = id.x;
  if (row >= params.rows || col >= ${N}u) { return; }
  var sum = 0.0;
  for (var k = 0u; k < ${K}u; k++) { sum += x[row * ${K}u + k] * w[col * ${K}u + k]; }
  y[row * ${N}u + col] = sum;
}`,
    dispatch: { groups: [Math.ceil(N / 64), { param: "rows" }, 1] },
  });
}

/** Seconds per run of `record`, after one warm-up, timing `repeats` runs in one submit. */
async function time(record: () => void, repeats: number, sync: GPUBuffer): Promise<number> {
  record();
  step.submit();
  await readBuffer(device, sync, 0, 4);
  const started = performance.now();
  for (let i = 0; i < repeats; i++) record();
  step.submit();
  await readBuffer(device, sync, 0, 4);
  return (performance.now() - started) / 1000 / repeats;
}

function run(k: KernelSource, buffers: Record<string, BufferArg>, rows: number) {
  return () => step.dispatch(k, buffers, { rows });
}

const random = (n: number) => Float32Array.from({ length: n }, () => Math.random() - 0.5);
const [M, K, N] = [256, 1024, 1024];
const x = createStorage(device, random(M * K), "x");
const w = createStorage(device, random(N * K), "w");
const y = createStorage(device, M * N * 4, "y");
const flops = 2 * M * N * K;
const tiled = flops / (await time(run(matmulKernel({ K, N, residual: false }), { x, w, y }, M), 3, y)) / 1e9;
const naive = flops / (await time(run(naiveMatmul(K, N), { x, w, y }, M), 1, y)) / 1e9;

const V = 4096;
const wide = createStorage(device, random(V * V), "w 4096x4096");
const vector = createStorage(device, random(V), "x");
const out = createStorage(device, V * 4, "y");
const copyTarget = createStorage(device, V * V * 4, "copy");
const bytes = V * V * 4;
const matvec = bytes / (await time(run(matvecKernel({ K: V, N: V, residual: false }), { x: vector, w: wide, y: out }, 1), 5, out)) / 1e9;
const copy = (2 * bytes) / (await time(() => step.copy(wide, 0, copyTarget, 0, bytes), 5, copyTarget)) / 1e9;

const f = (v: number) => v.toFixed(2);
console.log(`device: ${adapterSummary(context.report)}`);
console.log(`matmul ${M}x${K}x${N}: ${f(tiled)} GFLOP/s tiled, ${f(naive)} GFLOP/s naive (${f(tiled / naive)}x)`);
console.log(`matvec 1x${V}x${V}: ${f(matvec)} GB/s of weights, buffer copy ${f(copy)} GB/s read+write (${f(matvec / copy)}x)`);

/** t as the LoRA shrink leaves it for `rows` rows, row r on slot r at full rank R (lora.ts rowInfo). */
function loraT(rows: number, R: number): Uint32Array {
  const T = loraRowColumns(R, true);
  const words = new Uint32Array(rows * T);
  const floats = new Float32Array(words.buffer);
  for (let r = 0; r < rows; r++) {
    for (let j = 0; j < R; j++) floats[r * T + j] = Math.random() - 0.5;
    const info = r * T + 4 * Math.ceil(R / 4);
    words[info] = r;
    floats[info + 1] = 1;
    floats[info + 2] = 2;
    words[info + 3] = R;
  }
  return words;
}

const RANK = 32;
const LORA_ROWS = 8;
for (const [inF, outF] of [[512, 1344], [1344, 512]] as const) {
  const bufs = {
    x: createStorage(device, random(LORA_ROWS * inF), "x"),
    w: createStorage(device, random(outF * inF), "w"),
    t: createStorage(device, loraT(LORA_ROWS, RANK), "t"),
    b: createStorage(device, random(LORA_ROWS * outF * RANK), "b"),
    dora: createStorage(device, new Float32Array(LORA_ROWS * outF).fill(1), "dora"),
    y: createStorage(device, LORA_ROWS * outF * 4, "y"),
  };
  const plain = matvecKernel({ K: inF, N: outF, residual: false });
  const fused = matvecKernel({ K: inF, N: outF, residual: false, loraRank: RANK });
  const parts: string[] = [];
  for (const rows of [1, LORA_ROWS]) {
    // 32 dispatches a submit, plain and fused alternated twice, each figure the better of its two
    const times = { plain: Infinity, fused: Infinity };
    for (let round = 0; round < 2; round++) {
      times.plain = Math.min(times.plain, await time(() => step.dispatch(plain, { x: bufs.x, w: bufs.w, y: bufs.y }, { rows }), 32, bufs.y));
      times.fused = Math.min(times.fused, await time(() => step.dispatch(fused, bufs, { rows }), 32, bufs.y));
    }
    parts.push(`${rows} row${rows === 1 ? "" : "s"} ${f(times.plain * 1e3)} / ${f(times.fused * 1e3)} ms (${f(times.fused / times.plain)}x)`);
  }
  console.log(`matvec ${inF}x${outF}, plain / with the rank-${RANK} LoRA epilogue: ${parts.join(", ")}`);
  for (const b of Object.values(bufs)) b.destroy();
}
for (const b of [x, w, y, wide, vector, out, copyTarget]) b.destroy();
step.destroy();
context.destroy();
