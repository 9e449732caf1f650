// The storage layouts of runtime/package/format.ts WEIGHT_FORMATS word by word (docs/weights.md's
// examples), the rounding each format does, packing what was unpacked giving the same words (merged
// mode's exact unmerge), and the errors for what a format cannot hold.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { WeightFormatError, packWeights, unpackWeights } from "../../../runtime/engine/weight-storage.ts";
import { f16BitsToF32, f32ToF16Bits } from "../../../runtime/formats/safetensors.ts";
import { storageRowWords } from "../../../runtime/package/format.ts";
import { mulberry32 } from "../../../examples/random-checkpoint.ts";

const f32Bits = (x: number) => new Uint32Array(Float32Array.of(x).buffer)[0]!;

test("row sizes: f32 one word an element, f16 two elements a word padded to 8, q8 (q4) 8 (4) words of quants per 32 and the scales padded to 4", () => {
  assert.equal([1, 4, 5, 8].map((K) => storageRowWords("f32", K)), [1, 4, 5, 8]);
  assert.equal([1, 8, 9, 16].map((K) => storageRowWords("f16", K)), [4, 4, 8, 8]);
  assert.equal([1, 32, 33, 128, 129].map((K) => storageRowWords("q8", K)), [12, 12, 20, 36, 48]);
  assert.equal([1, 32, 33, 128, 129].map((K) => storageRowWords("q4", K)), [8, 8, 12, 20, 28]);
  // 0.625 bytes a weight on whole groups of 4 blocks: 128 elements in 20 words.
  assert.is((storageRowWords("q4", 4096) * 4) / 4096, 0.625);
});

test("f16: element 2j in the low half of word j, 2j + 1 in the high half, zero padding to 8 elements", () => {
  const words = packWeights("f16", Float32Array.of(1, -2, 0.5, 3, 65504, 1 / 3), [2, 3], "w");
  assert.equal([...words], [0xc0003c00, 0x3800, 0, 0, 0x7bff4200, 0x3555, 0, 0]);
  assert.equal([...unpackWeights("f16", words, [2, 3], "w")], [1, -2, 0.5, 3, 65504, f16BitsToF32(f32ToF16Bits(1 / 3))]);
});

test("q8: int8 four a word, element k in byte k % 4 of word k / 4, then the blocks' scales as f32 bits", () => {
  // Block 0: max |x| = 127 * 0.5, so d = 0.5 and q = x / d. Block 1 (elements 32, 33): d = 2 / 127.
  const x = new Float32Array(34);
  x.set([63.5, -63.5, 1, -1.25, 0.25, 0.2]);
  x.set([2, -1], 32);
  const words = packWeights("q8", x, [1, 34], "w");
  assert.is(words.length, 20);
  // q = 127, -127, 2, -3 (ties away from zero), 1 (0.5), 0 (0.4); block 1: 127, -64 (63.5 away from zero)
  assert.equal([...words.slice(0, 16)].map((w) => w.toString(16)), ["fd02817f", "1", "0", "0", "0", "0", "0", "0", "c07f", "0", "0", "0", "0", "0", "0", "0"]);
  assert.equal([...words.slice(16)], [f32Bits(0.5), f32Bits(2 / 127), 0, 0]);
  const back = unpackWeights("q8", words, [1, 34], "w");
  assert.equal([...back.slice(0, 6)], [63.5, -63.5, 1, -1.5, 0.5, 0]);
  assert.equal([...back.slice(32)], [Math.fround(2 / 127) * 127, Math.fround(Math.fround(2 / 127) * -64)].map(Math.fround));
});

test("q8 rounds each element to its block's grid: error at most half a step d / 2, blocks scaled on their own", () => {
  const random = mulberry32(5);
  const [rows, K] = [3, 70];
  const x = Float32Array.from({ length: rows * K }, (_, i) => (random() * 2 - 1) * 10 ** (i % 3));
  const back = unpackWeights("q8", packWeights("q8", x, [rows, K], "w"), [rows, K], "w");
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b * 32 < K; b++) {
      const span = Array.from({ length: Math.min(32, K - b * 32) }, (_, i) => r * K + b * 32 + i);
      const d = Math.max(...span.map((i) => Math.abs(x[i]!))) / 127;
      for (const i of span) assert.ok(Math.abs(back[i]! - x[i]!) <= d / 2 + 1e-6 * d, `element ${i}: ${x[i]} -> ${back[i]} with d ${d}`);
    }
  }
});

test("q4: nibbles q + 8 eight a word, element k in bits 4 (k % 8) of word k / 8, then the blocks' scales as f32 bits", () => {
  // Block 0: max |x| = 7 * 0.5, so d = 0.5. Block 1 (elements 32, 33): max 1.75, d = 0.25.
  const x = new Float32Array(34);
  x.set([3.5, -3.5, 1, -1.25, 0.25, 0.2]);
  x.set([1.75, -0.3], 32);
  const words = packWeights("q4", x, [1, 34], "w");
  assert.is(words.length, 12);
  // q = 7, -7, 2, -3 (ties away from zero), 1 (0.5), 0 (0.4), then 0 (the nibble 8); block 1: 7, -1 (-1.2),
  // and past K q = 0 as well.
  assert.equal([...words.slice(0, 8)].map((w) => w.toString(16)), ["88895a1f", "88888888", "88888888", "88888888", "8888887f", "88888888", "88888888", "88888888"]);
  assert.equal([...words.slice(8)], [f32Bits(0.5), f32Bits(0.25), 0, 0]);
  const back = unpackWeights("q4", words, [1, 34], "w");
  assert.equal([...back.slice(0, 6)], [3.5, -3.5, 1, -1.5, 0.5, 0]);
  assert.equal([...back.slice(6, 32)], new Array(26).fill(0));
  assert.equal([...back.slice(32)], [1.75, -0.25]);
  // An all-zero block: d = 0 and every nibble 8.
  assert.equal([...packWeights("q4", new Float32Array(40), [1, 40], "w")], [...new Array(8).fill(0x88888888), 0, 0, 0, 0]);
});

test("q4 rounds each element to its block's grid of 15 steps: error at most half a step d / 2, blocks scaled on their own", () => {
  const random = mulberry32(6);
  const [rows, K] = [3, 70];
  const x = Float32Array.from({ length: rows * K }, (_, i) => (random() * 2 - 1) * 10 ** (i % 3));
  const back = unpackWeights("q4", packWeights("q4", x, [rows, K], "w"), [rows, K], "w");
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b * 32 < K; b++) {
      const span = Array.from({ length: Math.min(32, K - b * 32) }, (_, i) => r * K + b * 32 + i);
      const d = Math.max(...span.map((i) => Math.abs(x[i]!))) / 7;
      for (const i of span) {
        assert.ok(Math.abs(back[i]! - x[i]!) <= d / 2 + 1e-6 * d, `element ${i}: ${x[i]} -> ${back[i]} with d ${d}`);
        const q = back[i]! / Math.fround(d);
        assert.ok(Math.abs(q - Math.round(q)) < 1e-6 && Math.abs(q) <= 7 + 1e-6, `element ${i}: ${back[i]} is not d q with |q| <= 7`);
      }
    }
  }
});

test("the largest value of a q8 (q4) block, f32(127 d) (f32(7 d)), gives back d: every f32 mantissa of the block's max", () => {
  // d = f32(max / qMax). A power of two scales max, d and 7 d alike while they are normal, so the
  // mantissas of max in [1, 2) cover every normal d. The max element's q is qMax, so it unpacks to
  // f32(qMax d), which must repack to the same d (and round back to qMax) for unmerge to be exact.
  const f = Math.fround;
  for (const qMax of [127, 7]) {
    let bad = 0;
    for (let m = 0; m < 2 ** 23; m++) {
      const max = 1 + m * 2 ** -23;
      const d = f(max / qMax);
      const top = f(qMax * d);
      if (f(top / qMax) !== d || Math.round(max / d) !== qMax || Math.round(top / d) !== qMax) bad++;
    }
    assert.is(bad, 0, `qMax ${qMax}: ${bad} mantissas whose block max does not give back d`);
  }
});

test("packing what was unpacked gives the same words (merged mode's unmerge is exact)", () => {
  const random = mulberry32(9);
  for (const format of ["f16", "q8", "q4"] as const) {
    for (let trial = 0; trial < 20; trial++) {
      const [rows, K] = [1 + Math.floor(random() * 9), 1 + Math.floor(random() * 200)];
      const scale = 10 ** (random() * 8 - 6);
      const x = Float32Array.from({ length: rows * K }, () => (random() * 2 - 1) * scale);
      const words = packWeights(format, x, [rows, K], "w");
      assert.equal(packWeights(format, unpackWeights(format, words, [rows, K], "w"), [rows, K], "w"), words, `${format} [${rows}, ${K}] at scale ${scale}`);
    }
  }
  const zeros = new Float32Array(40);
  assert.equal([...packWeights("q8", zeros, [1, 40], "w")], new Array(20).fill(0));
});

test("errors name the tensor and shape: f16's range, a packed format on a vector, a wrong length", () => {
  const refused = (f: () => unknown, pattern: RegExp) => assert.throws(f, (e: Error) => e instanceof WeightFormatError && pattern.test(e.message));
  refused(() => packWeights("f16", Float32Array.of(1, 70000), [1, 2], 'tensor "big"'), /tensor "big" \[1, 2\] holds 70000 at \[0, 1\], beyond f16's range/);
  refused(() => packWeights("q8", new Float32Array(8), [8], 'tensor "norm"'), /tensor "norm" \[8\]: q8 storage holds \[rows, K\] matrices only/);
  refused(() => packWeights("q4", new Float32Array(8), [8], 'tensor "norm"'), /tensor "norm" \[8\]: q4 storage holds \[rows, K\] matrices only/);
  refused(() => packWeights("f16", new Float32Array(5), [2, 3], 'tensor "w"'), /tensor "w" \[2, 3\]: 5 values, expected 6/);
  refused(() => unpackWeights("q8", new Uint32Array(8), [1, 3], 'tensor "w"'), /8 q8 words, expected 12/);
  refused(() => unpackWeights("q4", new Uint32Array(12), [1, 3], 'tensor "w"'), /12 q4 words, expected 8/);
});

test.run();
