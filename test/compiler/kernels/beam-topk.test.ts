// Beam candidates on the device against a float64 log-softmax and a stable sort of each row.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { BEAM_CANDIDATE_WORDS, beamTopKKernel } from "../../../compiler/kernels/beam-topk.ts";
import { logSoftmax } from "../../reference/beam.ts";
import { openGpu, randomFloats, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(9);
// f32 max, exp-sum over at most a few thousand terms and one log: about 1e-6 absolute on log-probabilities near 0..-20.
const LOGPROB_BOUND = 1e-5;

async function topK(logits: Float32Array, vocab: number, rows: number, k: number) {
  const candidates = new Uint32Array(rows * k * BEAM_CANDIDATE_WORDS).fill(0xffffffff);
  const got = await runOnce(gpu, beamTopKKernel({ vocab }), { logits, candidates }, { rows, k }, ["candidates"]);
  const words = new Uint32Array(got.candidates!.buffer);
  const floats = got.candidates!;
  return Array.from({ length: rows }, (_, r) => ({
    tokens: Array.from({ length: k }, (_, j) => words[(r * k + j) * 2]!),
    logprobs: Array.from({ length: k }, (_, j) => floats[(r * k + j) * 2 + 1]!),
  }));
}

/** The k most likely tokens of a row, ties to the lower index, with float64 log-probabilities. */
function expected(row: Float32Array, k: number) {
  const lp = logSoftmax(row);
  const order = Array.from(row, (_, i) => i).sort((a, b) => row[b]! - row[a]! || a - b);
  return { tokens: order.slice(0, k), logprobs: order.slice(0, k).map((i) => lp[i]!) };
}

test("each row's top k tokens and log-probabilities, several vocabularies and k", async () => {
  for (const [vocab, k, rows] of [[97, 6, 5], [1000, 9, 3], [4099, 4, 2], [300, 1, 4]] as const) {
    const logits = randomFloats(random, rows * vocab, 6);
    const got = await topK(logits, vocab, rows, k);
    for (let r = 0; r < rows; r++) {
      const want = expected(logits.subarray(r * vocab, (r + 1) * vocab), k);
      assert.equal(got[r]!.tokens, want.tokens, `vocab ${vocab} row ${r}`);
      got[r]!.logprobs.forEach((lp, j) => assert.ok(Math.abs(lp - want.logprobs[j]!) < LOGPROB_BOUND, `vocab ${vocab} row ${r} pick ${j}: ${lp} vs ${want.logprobs[j]}`));
    }
  }
});

test("ties go to the lower token id, across lanes; a flat row is log(1/vocab) everywhere", async () => {
  const vocab = 600;
  const logits = randomFloats(random, 2 * vocab, 1);
  for (const i of [599, 3, 257, 300]) logits[i] = 5; // row 0: four-way tie at the top, spread over lanes
  logits.fill(0.25, vocab, 2 * vocab);
  const got = await topK(logits, vocab, 2, 5);
  assert.equal(got[0]!.tokens.slice(0, 4), [3, 257, 300, 599]);
  assert.equal(got[1]!.tokens, [0, 1, 2, 3, 4]);
  for (const lp of got[1]!.logprobs) assert.ok(Math.abs(lp - Math.log(1 / vocab)) < LOGPROB_BOUND);
});

test.after(() => gpu.context.destroy());
test.run();
