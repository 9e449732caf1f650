// Token selection on the device against the float64 reference sampler (test/reference/sampling.ts)
// with the same settings and draws.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { packSamplingSettings, samplingKernel, type SamplingSettings } from "../../../compiler/kernels/sampling.ts";
import { referenceToken } from "../../reference/sampling.ts";
import { openGpu, randomFloats, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(5);

async function sampleOnGpu(logits: Float32Array, vocab: number, settings: readonly SamplingSettings[]): Promise<Uint32Array> {
  const rows = settings.length;
  const tokens = new Uint32Array(rows).fill(0xffffffff);
  const got = await runOnce(gpu, samplingKernel({ vocab }), { logits, settings: packSamplingSettings(settings), tokens }, { rows }, ["tokens"]);
  return new Uint32Array(got.tokens!.buffer);
}

const greedy: SamplingSettings = { temperature: 0, topK: 0, topP: 1, seed: 0, step: 0 };

test("greedy picks the argmax, the lowest index among ties", async () => {
  for (const vocab of [100, 1000]) {
    const logits = randomFloats(random, 3 * vocab, 4);
    logits[5] = logits[3] = 9; // row 0: tie at 3 and 5
    logits[vocab + vocab - 1] = 9; // row 1: maximum at the last index
    logits.fill(-2, 2 * vocab, 3 * vocab); // row 2: all equal
    const tokens = await sampleOnGpu(logits, vocab, [greedy, greedy, greedy]);
    assert.equal(Array.from(tokens), [3, vocab - 1, 0]);
  }
});

const distributions: readonly Omit<SamplingSettings, "step">[] = [
  { temperature: 1, topK: 0, topP: 1, seed: 1 },
  { temperature: 0.7, topK: 5, topP: 1, seed: 2 },
  { temperature: 1.3, topK: 0, topP: 0.9, seed: 3 },
  { temperature: 1, topK: 40, topP: 0.6, seed: 4 },
  { temperature: 2, topK: 1, topP: 1, seed: 5 },
];

test("seeded sampling equals the reference for several distributions, rows mixed in one batch", async () => {
  const vocab = 777;
  const settings = Array.from({ length: 20 }, (_, i) => ({ ...distributions[i % distributions.length]!, step: i }));
  const logits = randomFloats(random, settings.length * vocab, 3);
  const tokens = await sampleOnGpu(logits, vocab, settings);
  assert.equal(Array.from(tokens), settings.map((s, r) => referenceToken(logits.subarray(r * vocab, (r + 1) * vocab), s)));
  // top-k 1 leaves only the argmax, whatever the temperature.
  const row4 = logits.subarray(4 * vocab, 5 * vocab);
  assert.is(tokens[4], referenceToken(row4, greedy));
});

test("a seed reproduces its draws; steps vary them", async () => {
  const vocab = 50;
  const row = randomFloats(random, vocab, 0.5); // flat enough that draws differ
  const settings = Array.from({ length: 16 }, (_, step) => ({ temperature: 1, topK: 0, topP: 1, seed: 42, step }));
  const logits = new Float32Array(settings.length * vocab);
  settings.forEach((_, i) => logits.set(row, i * vocab));
  const first = await sampleOnGpu(logits, vocab, settings);
  const second = await sampleOnGpu(logits, vocab, settings);
  assert.equal(Array.from(first), Array.from(second));
  assert.ok(new Set(first).size > 4, `16 steps gave only ${new Set(first).size} distinct tokens`);
});

test.after(() => gpu.context.destroy());
test.run();
