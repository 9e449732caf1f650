// The self-test's sampling reference (what `milora doctor` grades the device's sampler by) against the
// float64 sampler written from the definitions, on the CPU: the same tokens for every setting, ties
// and flat rows included, and the same draws as the PCG hash defines.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { sampleRowCpu } from "../../../bin/commands/sampling-reference.ts";
import { uniformDraw } from "../../../compiler/kernels/sampling.ts";
import { mulberry32 } from "../../../runtime/random.ts";
import { referenceDraw, referenceToken } from "../../reference/sampling.ts";

test("its draws are PCG's: (pcg(pcg(seed) ^ step) >> 8) / 2^24", () => {
  // Worked out apart from both (Python integers): pcg(0) = 129708002, so the draw of (0, 0) is
  // (pcg(129708002) >> 8) / 2^24 = 3194371 / 2^24; that of (42, 7) 0.4519132971763611.
  assert.is(referenceDraw(0, 0), 3194371 / 2 ** 24);
  assert.is(referenceDraw(42, 7), 0.4519132971763611);
  for (const [seed, step] of [[0, 0], [1, 0], [0, 1], [42, 7], [0xffffffff, 123456], [1234, 5]] as const) {
    assert.is(uniformDraw(seed, step), referenceDraw(seed, step), `seed ${seed} step ${step}`);
  }
  const draws = Array.from({ length: 2000 }, (_, step) => referenceDraw(9, step));
  const mean = draws.reduce((a, b) => a + b, 0) / draws.length;
  assert.ok(Math.abs(mean - 0.5) < 0.02, `mean of 2000 draws ${mean}`);
  assert.ok(draws.every((u) => u >= 0 && u < 1));
});

test("it picks the reference's token for greedy, top-k, top-p and both, on random, tied and flat rows", () => {
  const random = mulberry32(17);
  const settings = [
    { temperature: 0, topK: 0, topP: 1 },
    { temperature: 1, topK: 0, topP: 1 },
    { temperature: 0.7, topK: 5, topP: 1 },
    { temperature: 1.3, topK: 0, topP: 0.9 },
    { temperature: 1, topK: 40, topP: 0.6 },
    { temperature: 2, topK: 1, topP: 1 },
    { temperature: 0.5, topK: 3, topP: 0.2 },
  ];
  let rows = 0;
  for (let r = 0; r < 300; r++) {
    const vocab = [7, 50, 777][r % 3]!;
    const logits = Float32Array.from({ length: vocab }, () => (random() * 2 - 1) * 3);
    // Every fourth row has ties at the top, and every ninth is flat.
    if (r % 4 === 0) logits[vocab - 1] = logits[1] = logits[2] = 4;
    if (r % 9 === 0) logits.fill(0.25);
    for (const [i, s] of settings.entries()) {
      const full = { ...s, seed: r * 31 + i, step: r };
      assert.is(sampleRowCpu(logits, full), referenceToken(logits, full), `row ${r} (vocab ${vocab}) with ${JSON.stringify(full)}`);
      rows++;
    }
  }
  assert.is(rows, 2100);
});

test("greedy is the argmax with the lowest index among ties; top-k 1 is greedy at any temperature", () => {
  const row = [0.5, 3, -1, 3, 2];
  assert.is(referenceToken(row, { temperature: 0, topK: 0, topP: 1, seed: 0, step: 0 }), 1);
  for (let step = 0; step < 20; step++) assert.is(referenceToken([0.5, 2, 3.5, 1], { temperature: 5, topK: 1, topP: 1, seed: 3, step }), 2);
  // top-p 0.5 over p = [0.1, 0.6, 0.3] keeps the single most probable token
  const logits = [Math.log(0.1), Math.log(0.6), Math.log(0.3)];
  for (let step = 0; step < 20; step++) assert.is(referenceToken(logits, { temperature: 1, topK: 0, topP: 0.5, seed: 8, step }), 1);
});

test.run();
