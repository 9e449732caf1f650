// The prefill matmul and the decode matvec against a float64 product, on sizes that are not multiples
// of any tile, with and without the residual epilogue. Bound: an f32 dot product of K terms carries a
// relative error of about sqrt(K) * 2^-24 for random data (~2e-6 at K = 1024), so 1e-5 leaves margin.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { matmulKernel } from "../../../compiler/kernels/matmul.ts";
import { MATVEC_GROUP_ROWS, matvecKernel } from "../../../compiler/kernels/matvec.ts";
import { nanFilled, openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(11);
const BOUND = 1e-5;

function product(x: Float32Array, w: Float32Array, M: number, N: number, K: number, residual?: Float32Array): Float64Array {
  const y = new Float64Array(M * N);
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let sum = residual ? residual[m * N + n]! : 0;
      for (let k = 0; k < K; k++) sum += x[m * K + k]! * w[n * K + k]!;
      y[m * N + n] = sum;
    }
  return y;
}

async function check(kind: "matmul" | "matvec", M: number, N: number, K: number, residual: boolean) {
  const x = randomFloats(random, M * K);
  const w = randomFloats(random, N * K);
  const r = residual ? randomFloats(random, M * N) : undefined;
  const kernel = (kind === "matmul" ? matmulKernel : matvecKernel)({ K, N, residual });
  const { y } = await runOnce(gpu, kernel, { x, w, ...(r ? { residual: r } : {}), y: nanFilled(M * N) }, { rows: M }, ["y"]);
  const error = relativeError(y!, product(x, w, M, N, K, r));
  assert.ok(error < BOUND, `${kernel.key} M=${M}: relative error ${error}`);
}

test("matmul on odd sizes", async () => {
  for (const M of [1, 3, 37]) for (const [N, K] of [[33, 17], [100, 64], [33, 130]] as const) await check("matmul", M, N, K, false);
});

test("matmul with the residual epilogue, and K = 1024 spanning many K tiles", async () => {
  await check("matmul", 37, 100, 130, true);
  await check("matmul", 70, 65, 1024, true);
});

test("matvec on odd sizes, for one row, part of a row group and a whole one", async () => {
  for (const M of [1, 3, MATVEC_GROUP_ROWS]) for (const [N, K] of [[33, 17], [100, 64], [33, 130]] as const) await check("matvec", M, N, K, false);
});

test("matvec over several row groups (decode batches past 8 rows), the last one partial, with the residual", async () => {
  for (const M of [12, 20, 4 * MATVEC_GROUP_ROWS]) for (const [N, K] of [[33, 17], [100, 130]] as const) await check("matvec", M, N, K, true);
});

test("matvec over a whole prefill step's rows, as a device calibrated past the matmul runs it (milora bench --calibrate)", async () => {
  for (const M of [129, 256]) await check("matvec", M, 100, 130, true);
});

test("matvec with the residual epilogue, and a wide output (logits-like)", async () => {
  await check("matvec", 2, 100, 130, true);
  await check("matvec", 1, 1001, 1024, false);
});

/**
 * A weight of `S` output rows computed as row blocks of `block` rows, each block's kernel writing its
 * columns straight into y (row stride S) and adding the residual from the same place.
 */
async function checkBlocks(kind: "matmul" | "matvec", M: number, S: number, K: number, block: number, residual: boolean) {
  const x = randomFloats(random, M * K);
  const w = randomFloats(random, S * K);
  const r = residual ? randomFloats(random, M * S) : undefined;
  let y = nanFilled(M * S);
  for (let column = 0; column < S; column += block) {
    const N = Math.min(block, S - column);
    const kernel = (kind === "matmul" ? matmulKernel : matvecKernel)({ K, N, residual, stride: S });
    const wBlock = w.subarray(column * K, (column + N) * K);
    y = (await runOnce(gpu, kernel, { x, w: wBlock, ...(r ? { residual: r } : {}), y }, { rows: M, column }, ["y"])).y!;
  }
  const error = relativeError(y, product(x, w, M, S, K, r));
  assert.ok(error < BOUND, `${kind} blocks of ${block} of ${S} columns, M=${M}: relative error ${error}`);
}

test("row blocks of a split weight write their columns into place, residual included", async () => {
  await checkBlocks("matmul", 37, 101, 130, 40, true);
  await checkBlocks("matmul", 3, 70, 17, 33, false);
  await checkBlocks("matvec", MATVEC_GROUP_ROWS, 101, 130, 40, true);
  await checkBlocks("matvec", 2 * MATVEC_GROUP_ROWS + 3, 101, 130, 40, true);
  await checkBlocks("matvec", 1, 70, 17, 33, false);
});

test("a row block's key names its stride, and the stride cannot be narrower than the block", () => {
  assert.is(matvecKernel({ K: 8, N: 3, residual: true, stride: 10 }).key, "matvec(K=8,N=3,residual=true,stride=10)");
  assert.equal(matmulKernel({ K: 8, N: 3, residual: false, stride: 10 }).params.map((p) => p.name), ["rows", "column"]);
  assert.throws(() => matmulKernel({ K: 8, N: 12, residual: false, stride: 10 }), /stride of at least 12/);
});

test.after(() => gpu.context.destroy());
test.run();
