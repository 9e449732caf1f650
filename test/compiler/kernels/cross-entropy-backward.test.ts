// The fused cross-entropy (loss per row, logits overwritten with their gradient) against float64
// (test/reference/gradients.ts). Bound: 1e-5 relative (L2) for the losses and for the gradient, over
// all rows and, row by row, on rows whose label is nearly certain (loss down to 1.5e-6), where p - 1
// and log(sum) in f32 would be a few percent off; vocabularies of 7 to 32000 and
// logits offset by 1e4 (the kernel subtracts the max before anything else).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { IGNORE_LABEL, crossEntropyKernel } from "../../../compiler/kernels/cross-entropy.ts";
import { crossEntropyBackward } from "../../reference/gradients.ts";
import { nanFilled, openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(61);
const BOUND = 1e-5;

interface Row {
  readonly label: number;
  /** Raise the label's logit this far above the row's max (a confident row). */
  readonly lead?: number;
}

async function check(name: string, vocab: number, rows: readonly Row[], scale: number, offset = 0) {
  const logits = randomFloats(random, rows.length * vocab, scale).map((v) => v + offset);
  const labels = Uint32Array.from(rows, (r) => r.label);
  rows.forEach((r, i) => {
    if (r.lead === undefined) return;
    const row = logits.subarray(i * vocab, (i + 1) * vocab);
    row[r.label] = Math.max(...row) + r.lead;
  });
  const supervised = rows.filter((r) => r.label !== IGNORE_LABEL).length;
  const lossScale = 1 / Math.max(supervised, 1);
  const want = crossEntropyBackward(logits, labels, rows.length, vocab, lossScale);
  const got = await runOnce(gpu, crossEntropyKernel({ vocab }), { logits: logits.slice(), labels, loss: nanFilled(rows.length) }, { rows: rows.length, lossScale }, ["logits", "loss"]);
  const errors = { loss: relativeError(got.loss!, want.loss), dLogits: relativeError(got.logits!, want.dLogits) };
  for (const [k, e] of Object.entries(errors)) assert.ok(e < BOUND, `${name}: ${k} relative error ${e}`);
  let confident = 0;
  rows.forEach((r, i) => {
    const row = (a: ArrayLike<number>) => Array.from(a).slice(i * vocab, (i + 1) * vocab);
    if (r.label === IGNORE_LABEL) {
      assert.is(got.loss![i], 0, `${name}: unsupervised row ${i} has loss 0`);
      assert.ok(row(got.logits!).every((v) => v === 0), `${name}: unsupervised row ${i} has gradient 0`);
    } else if (r.lead !== undefined) {
      const lossError = Math.abs(got.loss![i]! - want.loss[i]!) / want.loss[i]!;
      const gradError = relativeError(row(got.logits!), row(want.dLogits));
      confident = Math.max(confident, lossError, gradError);
      assert.ok(lossError < BOUND && gradError < BOUND, `${name}: confident row ${i} (loss ${want.loss[i]}): loss error ${lossError}, gradient error ${gradError}`);
    }
  });
  const rowWise = rows.some((r) => r.lead !== undefined) ? `, worst confident row ${confident.toExponential(2)}` : "";
  console.log(`  ${name}: loss ${errors.loss.toExponential(2)}, dLogits ${errors.dLogits.toExponential(2)}${rowWise}`);
}

function randomRows(n: number, vocab: number): Row[] {
  return Array.from({ length: n }, () => ({ label: random() < 0.2 ? IGNORE_LABEL : Math.floor(random() * vocab) }));
}

test("vocab 1000 (not a multiple of 256), 13 rows with unsupervised ones, and vocab 7 below the workgroup", async () => {
  await check("vocab 1000", 1000, [...randomRows(12, 1000), { label: 999 }, { label: IGNORE_LABEL }], 5);
  await check("vocab 7", 7, [{ label: 0 }, { label: 6 }, { label: IGNORE_LABEL }, { label: 3 }], 3);
});

test("a 32000-token vocabulary, logits of scale 10 offset by 1e4", async () => {
  await check("vocab 32000", 32000, [{ label: 0 }, { label: 31999 }, { label: IGNORE_LABEL }, { label: 12345 }], 10);
  await check("offset 1e4", 4096, randomRows(6, 4096), 10, 1e4);
});

test("rows whose label is nearly certain keep their loss and gradient to 1e-5 relative", async () => {
  await check("confident", 3000, [{ label: 5, lead: 12 }, { label: 2999, lead: 20 }, { label: 17 }, { label: 0, lead: 0 }], 2);
});

test("a label out of range (not IGNORE_LABEL) makes that row's loss and gradient NaN, and only that row's", async () => {
  const vocab = 50;
  const logits = randomFloats(random, 3 * vocab);
  const labels = Uint32Array.from([4, vocab, 7]);
  const got = await runOnce(gpu, crossEntropyKernel({ vocab }), { logits, labels, loss: nanFilled(3) }, { rows: 3, lossScale: 1 }, ["logits", "loss"]);
  assert.ok(Number.isNaN(got.loss![1]) && got.logits!.subarray(vocab, 2 * vocab).every(Number.isNaN));
  assert.ok(Number.isFinite(got.loss![0]) && Number.isFinite(got.loss![2]));
  assert.ok(got.logits!.subarray(0, vocab).every(Number.isFinite) && got.logits!.subarray(2 * vocab).every(Number.isFinite));
});

test.after(() => gpu.context.destroy());
test.run();
