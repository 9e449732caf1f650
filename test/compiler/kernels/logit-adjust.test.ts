// The logit processing kernel (penalties, bias, min_p) and the chosen-logprob kernel against float64
// definitions (test/reference/sampling.ts) and against their CPU mirror, on random rows.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { ADJUST_ENTRY_WORDS, ADJUST_ROW_WORDS, MASKED, chosenLogprobKernel, logitAdjustKernel } from "../../../compiler/kernels/logit-adjust.ts";
import { LogitAdjust } from "../../../runtime/engine/logit-adjust.ts";
import { allowedTokens, logSoftmax64, penalisedLogits } from "../../reference/sampling.ts";
import { openGpu, randomFloats, runOnce, seeded } from "./gpu-check.ts";

/**
 * The kernel's procedure on the CPU in f32 steps, as the kernel computes, which the kernel must match bit
 * for bit: the row `work` the sampler then reads. `entries` as LogitAdjust packs them.
 */
function adjustRowCpu(logits: ArrayLike<number>, entries: Uint32Array, minP: number, temperature: number): Float32Array {
  const work = Float32Array.from(logits);
  const floats = new Float32Array(entries.buffer, entries.byteOffset, entries.length);
  for (let e = 0; e < entries.length / ADJUST_ENTRY_WORDS; e++) {
    const at = e * ADJUST_ENTRY_WORDS;
    const t = entries[at]!;
    const x = work[t]!;
    work[t] = Math.fround(Math.fround(x * (x > 0 ? floats[at + 1]! : floats[at + 2]!)) + floats[at + 3]!);
  }
  if (minP > 0 && temperature > 0) {
    let m = -3.4e38;
    for (const x of work) m = Math.max(m, x);
    const cut = Math.fround(m + Math.fround(Math.fround(temperature) * Math.fround(Math.log(Math.fround(minP)))));
    for (let i = 0; i < work.length; i++) if (work[i]! < cut) work[i] = MASKED;
  }
  return work;
}

const gpu = await openGpu();
const random = seeded(21);

test("penalties and bias: each row's processed logits equal the float64 definition (f32 rounding), min_p masks exactly the tokens below its cut", async () => {
  const vocab = 1000;
  const rows = 3;
  const logits = randomFloats(random, rows * vocab, 4);
  const prompts = [[1, 5, 5, 900], [], [7]];
  const outputs = [[5, 17, 17, 17, 999, 3], [2, 2], []];
  const settings = [
    { presence: 0.5, frequency: 0.3, repetition: 1.3, bias: new Map([[17, 2], [400, -100]]) },
    { presence: -0.7, frequency: 0, repetition: 1, bias: new Map([[0, 10]]) },
    { presence: 0, frequency: 0, repetition: 0.8, bias: new Map<number, number>() },
  ];
  const minP = [0, 0.3, 0.05];
  const temperature = [1, 0.7, 1.5];
  const adjusts = settings.map((s, r) => {
    const a = new LogitAdjust(prompts[r]!, s);
    for (const t of outputs[r]!) a.observe(t);
    return a;
  });
  const info = new Uint32Array(rows * ADJUST_ROW_WORDS);
  const infoF = new Float32Array(info.buffer);
  const all: number[] = [];
  adjusts.forEach((a, r) => {
    info[r * ADJUST_ROW_WORDS] = all.length / 4;
    info[r * ADJUST_ROW_WORDS + 1] = a.size;
    infoF[r * ADJUST_ROW_WORDS + 2] = minP[r]!;
    infoF[r * ADJUST_ROW_WORDS + 3] = temperature[r]!;
    all.push(...a.words);
  });
  const entries = Uint32Array.from(all);
  const got = await runOnce(gpu, logitAdjustKernel({ vocab }), { logits, info, entries, work: new Float32Array(rows * vocab) }, { rows }, ["work"]);
  for (let r = 0; r < rows; r++) {
    const row = logits.subarray(r * vocab, (r + 1) * vocab);
    const work = got.work!.subarray(r * vocab, (r + 1) * vocab);
    const want = penalisedLogits(row, prompts[r]!, outputs[r]!, settings[r]!);
    const mirror = adjustRowCpu(row, adjusts[r]!.words, minP[r]!, temperature[r]!);
    const allowed = minP[r]! > 0 ? allowedTokens(want, temperature[r]!, minP[r]!, 0) : undefined;
    for (let i = 0; i < vocab; i++) {
      assert.is(work[i], mirror[i], `row ${r} token ${i}: kernel and CPU mirror`);
      if (work[i] === Math.fround(MASKED)) {
        assert.ok(allowed && !allowed.has(i), `row ${r} token ${i} masked but allowed by min_p`);
        continue;
      }
      assert.ok(!allowed || allowed.has(i), `row ${r} token ${i} kept but below min_p`);
      assert.ok(Math.abs(work[i]! - want[i]!) <= 1e-5 * Math.max(1, Math.abs(want[i]!)), `row ${r} token ${i}: ${work[i]} vs ${want[i]}`);
    }
  }
});

test("the chosen token's log-probability equals the float64 log-softmax of the raw row", async () => {
  for (const vocab of [97, 4099]) {
    const rows = 4;
    const logits = randomFloats(random, rows * vocab, 8);
    const tokens = Uint32Array.from({ length: rows }, (_, r) => (r * 31 + 7) % vocab);
    const got = await runOnce(gpu, chosenLogprobKernel({ vocab }), { logits, tokens, out: new Float32Array(rows) }, { rows }, ["out"]);
    for (let r = 0; r < rows; r++) {
      const want = logSoftmax64(logits.subarray(r * vocab, (r + 1) * vocab))[tokens[r]!]!;
      assert.ok(Math.abs(got.out![r]! - want) < 1e-5, `vocab ${vocab} row ${r}: ${got.out![r]} vs ${want}`);
    }
  }
});

test.run();
