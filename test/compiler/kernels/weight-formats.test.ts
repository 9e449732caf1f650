// The linear kernels reading f16, q8 and q4 weights (compiler/kernels/weight-rows.ts) against a float64
// product over the values the packed words hold (runtime/engine/weight-storage.ts unpackWeights), on
// fresh random data: K not a multiple of 4 or of the q8/q4 block of 32, N odd, several row groups, the
// residual epilogue and row blocks of a split weight. Dequantising is exact in f32 (an f16 value, or
// d * q with |q| <= 127 or 7), so the bound is the f32 kernels' (matmul.test.ts): sqrt(K) * 2^-24, 1e-5.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { matmulKernel } from "../../../compiler/kernels/matmul.ts";
import { MATVEC_GROUP_ROWS, matvecKernel } from "../../../compiler/kernels/matvec.ts";
import type { PackedWeightFormat } from "../../../compiler/kernels/weight-rows.ts";
import { packWeights, unpackWeights } from "../../../runtime/engine/weight-storage.ts";
import { storageRowWords, type WeightFormat } from "../../../runtime/package/format.ts";
import { nanFilled, openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(23);
const BOUND = 1e-5;
const FORMATS: readonly PackedWeightFormat[] = ["f16", "q8", "q4"];

/** y = x w^T (+ residual) in float64, y's rows `S` wide with w's N columns at `column`. */
function product(x: Float32Array, w: Float32Array, M: number, N: number, K: number, S = N, column = 0, residual?: Float32Array): Float64Array {
  const y = new Float64Array(M * S);
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let sum = residual ? residual[m * S + column + n]! : 0;
      for (let k = 0; k < K; k++) sum += x[m * K + k]! * w[n * K + k]!;
      y[m * S + column + n] = sum;
    }
  return y;
}

async function check(kind: "matmul" | "matvec", weights: WeightFormat, M: number, N: number, K: number, residual: boolean) {
  const x = randomFloats(random, M * K);
  // Rows of different magnitudes, so q8's per-block scales differ.
  const w = Float32Array.from(randomFloats(random, N * K), (v, i) => v * 2 ** ((Math.floor(i / K) % 7) - 3));
  const packed = packWeights(weights, w, [N, K], "w");
  const held = unpackWeights(weights, packed, [N, K], "w");
  const r = residual ? randomFloats(random, M * N) : undefined;
  const kernel = (kind === "matmul" ? matmulKernel : matvecKernel)({ K, N, residual, ...(weights === "f32" ? {} : { weights }) });
  const { y } = await runOnce(gpu, kernel, { x, w: packed, ...(r ? { residual: r } : {}), y: nanFilled(M * N) }, { rows: M }, ["y"]);
  const error = relativeError(y!, product(x, held, M, N, K, N, 0, r));
  assert.ok(error < BOUND, `${kernel.key} M=${M}: relative error ${error}`);
}

test("matvec reads f16, q8 and q4 weights: odd N, K off the quad and the 32-element block, one row to several row groups", async () => {
  for (const weights of FORMATS) {
    for (const M of [1, 3, MATVEC_GROUP_ROWS, 2 * MATVEC_GROUP_ROWS + 5]) {
      for (const [N, K] of [[33, 17], [7, 1], [101, 64], [35, 130]] as const) await check("matvec", weights, M, N, K, M % 2 === 1);
    }
    await check("matvec", weights, 1, 1001, 1000, false);
  }
});

test("matvec over a long K, where 2 to 8 invocations share a column group and meet in workgroup memory", async () => {
  // K = 2050: 513 f32 quads (8 lanes), 257 f16 units (4 lanes), 129 q8 units (2 lanes), 65 q4 units (1
  // lane); K = 8200: 8 lanes each but q4's 257 units (4 lanes).
  for (const M of [1, MATVEC_GROUP_ROWS + 3]) {
    for (const weights of ["f32", ...FORMATS] as const) {
      await check("matvec", weights, M, 37, 2050, true);
      await check("matvec", weights, M, 5, 8200, false);
    }
    await check("matvec", "q4", M, 3, 16400, true); // 513 q4 units: 8 lanes
  }
});

test("matmul reads f16, q8 and q4 weights: odd sizes, K spanning many tiles and blocks, the residual epilogue", async () => {
  for (const weights of FORMATS) {
    for (const M of [1, 37]) for (const [N, K] of [[33, 17], [100, 64], [33, 130]] as const) await check("matmul", weights, M, N, K, M > 1);
    await check("matmul", weights, 70, 65, 1027, true);
  }
});

test("row blocks of a split f16, q8 or q4 weight are slices of its rows and write their columns in place", async () => {
  const [M, S, K, block] = [MATVEC_GROUP_ROWS + 3, 101, 130, 40];
  for (const weights of FORMATS) {
    const x = randomFloats(random, M * K);
    const w = randomFloats(random, S * K);
    const packed = packWeights(weights, w, [S, K], "w");
    const held = unpackWeights(weights, packed, [S, K], "w");
    const r = randomFloats(random, M * S);
    const rowWords = storageRowWords(weights, K);
    for (const kind of ["matvec", "matmul"] as const) {
      let y = nanFilled(M * S);
      for (let column = 0; column < S; column += block) {
        const N = Math.min(block, S - column);
        const kernel = (kind === "matmul" ? matmulKernel : matvecKernel)({ K, N, residual: true, stride: S, weights });
        y = (await runOnce(gpu, kernel, { x, w: packed.subarray(column * rowWords, (column + N) * rowWords), residual: r, y }, { rows: M, column }, ["y"])).y!;
      }
      const error = relativeError(y, product(x, held, M, S, K, S, 0, r));
      assert.ok(error < BOUND, `${kind} ${weights} blocks of ${block} of ${S}: relative error ${error}`);
    }
  }
});

test("the storage format is in the kernel's key and its w binding; f32 keys are unchanged", () => {
  assert.is(matvecKernel({ K: 8, N: 3, residual: false }).key, "matvec(K=8,N=3,residual=false)");
  assert.is(matvecKernel({ K: 8, N: 3, residual: false, weights: "q8" }).key, "matvec(K=8,N=3,residual=false,weights=q8)");
  assert.is(matmulKernel({ K: 8, N: 3, residual: true, stride: 10, weights: "f16" }).key, "matmul(K=8,N=3,residual=true,stride=10,weights=f16)");
  // The matvec reads a 16-byte unit a load (8 f16, 16 q8), the matmul stages a quad (4 elements) a load.
  assert.match(matvecKernel({ K: 8, N: 3, residual: false, weights: "f16" }).wgsl, /var<storage, read> w: array<vec4<u32>>/);
  assert.match(matvecKernel({ K: 8, N: 3, residual: false, weights: "q8" }).wgsl, /var<storage, read> w: array<vec4<u32>>/);
  assert.match(matmulKernel({ K: 8, N: 3, residual: false, weights: "f16" }).wgsl, /var<storage, read> w: array<vec2<u32>>/);
  assert.match(matmulKernel({ K: 8, N: 3, residual: false, weights: "q8" }).wgsl, /var<storage, read> w: array<u32>/);
  // q4: a 16-byte unit is a whole block of 32, eight quads behind one scale.
  assert.match(matvecKernel({ K: 8, N: 3, residual: false, weights: "q4" }).wgsl, /var<storage, read> w: array<vec4<u32>>/);
  assert.match(matvecKernel({ K: 8, N: 3, residual: false, weights: "q4" }).wgsl, /fn load_w\(row: u32, unit: u32\) -> array<vec4<f32>, 8>/);
  assert.match(matmulKernel({ K: 8, N: 3, residual: false, weights: "q4" }).wgsl, /var<storage, read> w: array<u32>/);
});

test.after(() => gpu.context.destroy());
test.run();
