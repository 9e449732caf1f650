// Rotary embedding, the KV cache write and causal GQA attention against float64 references, on a batch
// that mixes prefill rows and decode rows of several sequences at different cache offsets.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { attentionKernel } from "../../../compiler/kernels/attention.ts";
import { kvWriteKernel } from "../../../compiler/kernels/kv-write.ts";
import { ropeInverseFrequencies, ropeKernel } from "../../../compiler/kernels/rope.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { nanFilled, openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(23);

function ropeReference(x: Float32Array, rows: number, heads: number, headDim: number, positions: Uint32Array, theta: number) {
  const out = Float64Array.from(x);
  const half = headDim / 2;
  const frequencies = ropeInverseFrequencies(headDim, theta);
  for (let r = 0; r < rows; r++)
    for (let h = 0; h < heads; h++)
      for (let i = 0; i < half; i++) {
        const at = (r * heads + h) * headDim + i;
        const angle = positions[r]! * frequencies[i]!;
        out[at] = x[at]! * Math.cos(angle) - x[at + half]! * Math.sin(angle);
        out[at + half] = x[at + half]! * Math.cos(angle) + x[at]! * Math.sin(angle);
      }
  return out;
}

// The angle is position * f32(inverse frequency) in f32, as in HF: its error grows with the position
// (~6e-8 * position radians), so positions stay below 64 for a 1e-5 bound.
test("rope rotates q and k heads by position, rotate_half convention", async () => {
  const [heads, kvHeads, headDim, theta] = [4, 2, 18, 10000];
  const positions = Uint32Array.from([0, 1, 5, 63, 17, 2, 40]);
  const rows = positions.length;
  const q = randomFloats(random, rows * heads * headDim);
  const k = randomFloats(random, rows * kvHeads * headDim);
  const got = await runOnce(gpu, ropeKernel({ heads, kvHeads, headDim, theta }), { q, k, positions }, { rows }, ["q", "k"]);
  const qError = relativeError(got.q!, ropeReference(q, rows, heads, headDim, positions, theta));
  const kError = relativeError(got.k!, ropeReference(k, rows, kvHeads, headDim, positions, theta));
  assert.ok(qError < 1e-5 && kError < 1e-5, `q ${qError}, k ${kError}`);
  assert.equal(Array.from(got.q!.subarray(0, heads * headDim)), Array.from(q.subarray(0, heads * headDim)), "position 0 is the identity");
});

interface Sequence {
  readonly slot: number;
  /** Positions already in the cache before this step. */
  readonly cached: number;
  /** Rows this step adds (many for prefill, one for decode). */
  readonly fresh: number;
}

async function checkAttention(heads: number, kvHeads: number, headDim: number, sequences: readonly Sequence[], window?: number) {
  const maxPositions = 80;
  const slots = 3;
  const width = kvHeads * headDim;
  // Cache history is random; everything never written stays NaN, so reading past a row's position shows.
  const history = { k: randomFloats(random, slots * maxPositions * width), v: randomFloats(random, slots * maxPositions * width) };
  const kCache = nanFilled(history.k.length);
  const vCache = nanFilled(history.v.length);
  for (const s of sequences)
    for (let p = 0; p < s.cached; p++) {
      const at = (s.slot * maxPositions + p) * width;
      kCache.set(history.k.subarray(at, at + width), at);
      vCache.set(history.v.subarray(at, at + width), at);
    }
  const rowSlot = Uint32Array.from(sequences.flatMap((s) => Array<number>(s.fresh).fill(s.slot)));
  const positions = Uint32Array.from(sequences.flatMap((s) => Array.from({ length: s.fresh }, (_, i) => s.cached + i)));
  const rows = rowSlot.length;
  const q = randomFloats(random, rows * heads * headDim);
  const k = randomFloats(random, rows * width);
  const v = randomFloats(random, rows * width);

  // Reference: the full cache after the write, then softmax(q k^T / sqrt(d)) v over positions 0..p (or,
  // with a sliding window, over p - window < j <= p).
  const fullK = Float64Array.from(history.k);
  const fullV = Float64Array.from(history.v);
  for (let r = 0; r < rows; r++) {
    const at = (rowSlot[r]! * maxPositions + positions[r]!) * width;
    fullK.set(k.subarray(r * width, (r + 1) * width), at);
    fullV.set(v.subarray(r * width, (r + 1) * width), at);
  }
  const want = new Float64Array(rows * heads * headDim);
  for (let r = 0; r < rows; r++)
    for (let h = 0; h < heads; h++) {
      const kvHead = Math.floor(h / (heads / kvHeads));
      const keyAt = (p: number) => (rowSlot[r]! * maxPositions + p) * width + kvHead * headDim;
      const first = window === undefined ? 0 : Math.max(0, positions[r]! - window + 1);
      const scores = Array.from({ length: positions[r]! + 1 - first }, (_, i) => {
        const p = first + i;
        let s = 0;
        for (let d = 0; d < headDim; d++) s += q[(r * heads + h) * headDim + d]! * fullK[keyAt(p) + d]!;
        return s / Math.sqrt(headDim);
      });
      const top = Math.max(...scores);
      const weights = scores.map((s) => Math.exp(s - top));
      const total = weights.reduce((a, b) => a + b, 0);
      for (let d = 0; d < headDim; d++)
        want[(r * heads + h) * headDim + d] = weights.reduce((sum, w, i) => sum + w * fullV[keyAt(first + i) + d]!, 0) / total;
    }

  const device = gpu.device;
  const buffers = Object.fromEntries(
    Object.entries({ q, k, v, kCache, vCache, rowSlot, positions, out: nanFilled(rows * heads * headDim) }).map(([name, data]) => [name, createStorage(device, data, name)]),
  );
  const b = buffers as Record<string, GPUBuffer>;
  gpu.step.dispatch(kvWriteKernel({ kvHeads, headDim, maxPositions }), { k: b.k!, v: b.v!, kCache: b.kCache!, vCache: b.vCache!, rowSlot: b.rowSlot!, positions: b.positions! }, { rows });
  gpu.step.dispatch(attentionKernel({ heads, kvHeads, headDim, maxPositions, ...(window === undefined ? {} : { window }) }), { q: b.q!, kCache: b.kCache!, vCache: b.vCache!, rowSlot: b.rowSlot!, positions: b.positions!, out: b.out! }, { rows });
  gpu.step.submit();
  const out = await readBuffer(device, b.out!);
  const writtenK = await readBuffer(device, b.kCache!);
  for (const buffer of Object.values(b)) buffer.destroy();

  for (let r = 0; r < rows; r++) {
    const at = (rowSlot[r]! * maxPositions + positions[r]!) * width;
    assert.equal(Array.from(writtenK.subarray(at, at + width)), Array.from(k.subarray(r * width, (r + 1) * width)), `row ${r} k in the cache`);
  }
  const error = relativeError(out, want);
  // Softmax weights and sums of at most 80 f32 terms: a few ulps each, far below 1e-5.
  assert.ok(error < 1e-5, `heads ${heads}/${kvHeads} dim ${headDim}: relative error ${error}`);
}

test("attention: prefill and decode rows of three sequences in one batch, GQA 4 heads over 2", async () => {
  await checkAttention(4, 2, 16, [
    { slot: 0, cached: 0, fresh: 10 }, // a prompt from scratch
    { slot: 2, cached: 70, fresh: 1 }, // decode past one block of 64 keys
    { slot: 1, cached: 5, fresh: 3 }, // a prompt continued at an offset
  ]);
});

test("attention: head_dim above the workgroup size, multi-query (one KV head)", async () => {
  await checkAttention(3, 1, 72, [
    { slot: 1, cached: 66, fresh: 2 },
    { slot: 0, cached: 0, fresh: 1 },
  ]);
});

test("attention: a sliding window (mistral) shorter than, equal to and longer than the rows' pasts", async () => {
  const sequences = [
    { slot: 0, cached: 0, fresh: 12 }, // a prompt: its early rows see everything, its late rows a window
    { slot: 2, cached: 75, fresh: 1 }, // decode: a window of 7 starts inside the second block of keys
    { slot: 1, cached: 5, fresh: 3 },
  ];
  for (const window of [1, 7, 70, 200]) await checkAttention(4, 2, 16, sequences, window);
});

test.after(() => gpu.context.destroy());
test.run();
