// RMSNorm's input gradient against float64 (test/reference/gradients.ts), writing and accumulating,
// on widths below, at and above the workgroup size. Bound: 1e-5 relative (L2 over all rows): each
// element is two f32 terms built from sums over `hidden` values (~sqrt(hidden) * 2^-24 each).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { rmsNormInputGradKernel } from "../../../compiler/kernels/rmsnorm-backward.ts";
import { rmsNormInputGrad } from "../../reference/gradients.ts";
import { nanFilled, openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(41);
const BOUND = 1e-5;

async function check(rows: number, hidden: number, eps: number, scale: number, accumulate: boolean): Promise<number> {
  const x = randomFloats(random, rows * hidden, scale);
  const weight = Float32Array.from({ length: hidden }, () => 0.5 + random());
  const dy = randomFloats(random, rows * hidden);
  const before = accumulate ? randomFloats(random, rows * hidden) : nanFilled(rows * hidden);
  const kernel = rmsNormInputGradKernel({ hidden, eps, accumulate });
  const { dx } = await runOnce(gpu, kernel, { x, weight, dy, dx: before }, { rows }, ["dx"]);
  const want = rmsNormInputGrad(x, weight, dy, rows, hidden, eps);
  if (accumulate) want.forEach((v, i) => (want[i] = v + before[i]!));
  const error = relativeError(dx!, want);
  assert.ok(error < BOUND, `${kernel.key} rows=${rows} scale=${scale}: relative error ${error}`);
  return error;
}

test("dx = RMSNorm input gradient for widths 7 to 2048 and inputs of scale 0.01 to 30", async () => {
  let worst = 0;
  for (const [rows, hidden] of [[3, 7], [5, 256], [17, 300], [4, 2048]] as const)
    for (const scale of [0.01, 1, 30]) worst = Math.max(worst, await check(rows, hidden, 1e-5, scale, false));
  console.log(`  rmsnorm_dx worst relative error ${worst.toExponential(2)}`);
});

test("dx += the gradient (the residual stream's gradient), eps 1e-6, 70 rows", async () => {
  const worst = Math.max(await check(70, 1000, 1e-6, 1, true), await check(2, 64, 1e-6, 3, true));
  console.log(`  rmsnorm_dx (accumulate) worst relative error ${worst.toExponential(2)}`);
});

test("the key names hidden, eps and accumulate", () => {
  assert.is(rmsNormInputGradKernel({ hidden: 8, eps: 1e-5, accumulate: false }).key, "rmsnorm_dx(hidden=8,eps=0.00001,accumulate=false)");
});

test.after(() => gpu.context.destroy());
test.run();
