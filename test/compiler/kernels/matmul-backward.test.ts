// The linear input gradient dx = dy w against float64 (test/reference/gradients.ts), on sizes that
// are not multiples of 4 or of the 64x64 tile, writing and accumulating, whole weights and row blocks,
// and weights stored as f16, q8 or q4 (against float64 over the values they hold).
// Bound: each dx element is an f32 dot product of N terms (~sqrt(N) * 2^-24 relative, 2e-6 at
// N = 1024), so 1e-5 as for the forward matmul.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { matmulInputGradKernel } from "../../../compiler/kernels/matmul-backward.ts";
import { workgroups } from "../../../runtime/gpu/kernel.ts";
import { packWeights, unpackWeights } from "../../../runtime/engine/weight-storage.ts";
import { linearInputGrad } from "../../reference/gradients.ts";
import { nanFilled, openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(23);
const BOUND = 1e-5;

async function check(M: number, N: number, K: number, accumulate: boolean) {
  const dy = randomFloats(random, M * N);
  const w = randomFloats(random, N * K);
  const before = accumulate ? randomFloats(random, M * K) : nanFilled(M * K);
  const kernel = matmulInputGradKernel({ K, N, accumulate });
  const { dx } = await runOnce(gpu, kernel, { dy, w, dx: before }, { rows: M }, ["dx"]);
  const want = linearInputGrad(dy, w, M, N, K);
  if (accumulate) want.forEach((v, i) => (want[i] = v + before[i]!));
  const error = relativeError(dx!, want);
  assert.ok(error < BOUND, `${kernel.key} M=${M}: relative error ${error}`);
  return error;
}

test("dx = dy w on odd sizes: one row, a partial tile, several row and column tiles", async () => {
  let worst = 0;
  for (const M of [1, 37, 130])
    for (const [N, K] of [[33, 17], [100, 64], [45, 130], [7, 3]] as const) worst = Math.max(worst, await check(M, N, K, false));
  console.log(`  matmul_dx worst relative error ${worst.toExponential(2)}`);
});

test("dx += dy w, and N = 1024 over many reduction steps at M = 300", async () => {
  let worst = 0;
  for (const [M, N, K] of [[37, 100, 130], [300, 1024, 96], [64, 1027, 65]] as const) worst = Math.max(worst, await check(M, N, K, true));
  console.log(`  matmul_dx (accumulate) worst relative error ${worst.toExponential(2)}`);
});

test("row blocks of a split weight each read their columns of the whole dy and sum into dx", async () => {
  for (const [M, S, K, block] of [[37, 101, 130, 40], [3, 70, 17, 33], [20, 96, 64, 32]] as const) {
    const dy = randomFloats(random, M * S);
    const w = randomFloats(random, S * K);
    let dx = nanFilled(M * K);
    for (let column = 0; column < S; column += block) {
      const N = Math.min(block, S - column);
      const kernel = matmulInputGradKernel({ K, N, accumulate: column > 0, stride: S });
      dx = (await runOnce(gpu, kernel, { dy, w: w.subarray(column * K, (column + N) * K), dx }, { rows: M, column }, ["dx"])).dx!;
    }
    const error = relativeError(dx, linearInputGrad(dy, w, M, S, K));
    assert.ok(error < BOUND, `blocks of ${block} of ${S}, M=${M}: relative error ${error}`);
  }
});

test("w stored as f16, q8 or q4 (a training base in fewer bytes): dx equals float64 over the values the format holds, on odd sizes", async () => {
  for (const format of ["f16", "q8", "q4"] as const) {
    let worst = 0;
    for (const [M, N, K] of [[1, 33, 17], [37, 100, 130], [70, 45, 64]] as const) {
      const dy = randomFloats(random, M * N);
      const w = randomFloats(random, N * K);
      const what = `w [${N}, ${K}]`;
      const packed = packWeights(format, w, [N, K], what);
      const kernel = matmulInputGradKernel({ K, N, accumulate: false, weights: format });
      const { dx } = await runOnce(gpu, kernel, { dy, w: packed, dx: nanFilled(M * K) }, { rows: M }, ["dx"]);
      const error = relativeError(dx!, linearInputGrad(dy, unpackWeights(format, packed, [N, K], what), M, N, K));
      assert.ok(error < BOUND, `${kernel.key} M=${M}: relative error ${error}`);
      worst = Math.max(worst, error);
    }
    console.log(`  matmul_dx ${format} worst relative error ${worst.toExponential(2)}`);
  }
});

test("the key names the variant; zero rows dispatch nothing", () => {
  const k = matmulInputGradKernel({ K: 8, N: 3, accumulate: true, stride: 10 });
  assert.is(k.key, "matmul_dx(K=8,N=3,accumulate=true,stride=10)");
  assert.equal(k.params.map((p) => p.name), ["rows", "column"]);
  assert.equal(workgroups(k, { rows: 0, column: 0 }), [0, 0, 1]);
  assert.throws(() => matmulInputGradKernel({ K: 0, N: 3, accumulate: false }), /positive integer/);
});

test.after(() => gpu.context.destroy());
test.run();
