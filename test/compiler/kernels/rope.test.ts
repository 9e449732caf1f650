// Rotary scaling (rope_scaling linear, llama3, dynamic) in the rope kernels against the float64 reference
// written from Hugging Face's formulas (test/reference/rope.ts): the frequencies the kernels bake, the
// forward on the device at positions past the original context, dynamic's per-row lengths, and the
// backward's frequencies being the forward's.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { ropeBackwardKernel } from "../../../compiler/kernels/rope-backward.ts";
import { dynamicExponentStep, ropeInverseFrequencies, ropeKernel, type RopeConstants } from "../../../compiler/kernels/rope.ts";
import type { RopeScaling } from "../../../runtime/package/format.ts";
import { ropeBackward } from "../../reference/rope-gradients.ts";
import { applyRope, inverseFrequencies } from "../../reference/rope.ts";
import { openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(61);

const LLAMA31: RopeScaling = { type: "llama3", factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 };
/** A small original context, so that the test positions pass it and every band has pairs at head size 32. */
const SMALL_LLAMA3: RopeScaling = { type: "llama3", factor: 4, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 16 };
const LINEAR: RopeScaling = { type: "linear", factor: 3 };
const DYNAMIC: RopeScaling = { type: "dynamic", factor: 2, originalMaxPositions: 16 };

function maxRelative(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!) / Math.abs(b[i]!));
  return m;
}

test("the baked frequencies are Hugging Face's: linear divides by factor; llama3 keeps, scales and blends by wavelength band", () => {
  for (const [headDim, theta, scaling] of [[128, 500000, LLAMA31], [32, 10000, SMALL_LLAMA3], [18, 10000, LINEAR]] as const) {
    const got = ropeInverseFrequencies(headDim, theta, scaling);
    const want = inverseFrequencies({ headDim, ropeTheta: theta, ropeScaling: scaling }, 1);
    assert.ok(maxRelative(got, want) < 1e-14, `${scaling.type} at head size ${headDim}`);
  }
  // Llama 3.1 (theta 500000, head size 128): the wavelength 2 pi 500000^(i/64) is below 8192 / 4 for
  // i <= 28 and above 8192 / 1 for i >= 35, so 29 pairs keep their frequency, 29 are divided by 8 and 6 blend.
  const plain = ropeInverseFrequencies(128, 500000);
  const scaled = ropeInverseFrequencies(128, 500000, LLAMA31);
  const kept = scaled.filter((f, i) => f === plain[i]).length;
  const divided = scaled.filter((f, i) => Math.abs(f - plain[i]! / 8) < 1e-15 * plain[i]!).length;
  assert.equal([kept, divided], [29, 29]);
  for (let i = 29; i <= 34; i++) assert.ok(scaled[i]! < plain[i]! && scaled[i]! > plain[i]! / 8, `pair ${i} blends`);
});

test("dynamic: the kernel's plain frequency times s^(-2i/(d-2)) is Hugging Face's 1 / theta'^(2i/d)", () => {
  const [headDim, theta] = [32, 10000];
  const plain = ropeInverseFrequencies(headDim, theta, DYNAMIC);
  const step = dynamicExponentStep(headDim);
  assert.ok(maxRelative(plain, inverseFrequencies({ headDim, ropeTheta: theta, ropeScaling: DYNAMIC }, 16)) < 1e-14, "up to the original context: plain RoPE");
  for (const length of [17, 40, 300]) {
    const s = (2 * length) / 16 - 1;
    const got = plain.map((f, i) => f * s ** (-i * step));
    const want = inverseFrequencies({ headDim, ropeTheta: theta, ropeScaling: DYNAMIC }, length);
    assert.ok(maxRelative(got, want) < 1e-13, `length ${length}`);
    assert.ok(want[headDim / 2 - 1]! < plain[headDim / 2 - 1]!, "a longer sequence turns the slowest pair slower");
  }
});

/** The reference rotation of rows [rows, heads * headDim], row r at positions[r] with frequencies inv(r). */
function rotated(x: Float32Array, heads: number, headDim: number, positions: Uint32Array, inv: (row: number) => Float64Array): Float64Array {
  const out = Float64Array.from(x);
  for (let r = 0; r < positions.length; r++)
    for (let h = 0; h < heads; h++) applyRope(out.subarray((r * heads + h) * headDim, (r * heads + h + 1) * headDim), positions[r]!, inv(r));
  return out;
}

// Bound 2e-6 (measured 1e-7 to 4e-7 on llvmpipe): the angle is position * f32 frequency in f32 (HF's own
// rounding, ~6e-8 * position radians at most)
// for positions up to 100; dynamic adds the shader's exp2 and log2 of s (a few ulps of the frequency).
const BOUND = 2e-6;

async function forwardMatches(c: RopeConstants, positions: Uint32Array, lengths?: Uint32Array): Promise<void> {
  const { heads, kvHeads, headDim } = c;
  const rows = positions.length;
  const q = randomFloats(random, rows * heads * headDim);
  const k = randomFloats(random, rows * kvHeads * headDim);
  const inv = (row: number) => inverseFrequencies({ headDim, ropeTheta: c.theta, ...(c.scaling ? { ropeScaling: c.scaling } : {}) }, lengths?.[row] ?? 1);
  const got = await runOnce(gpu, ropeKernel(c), { q, k, positions, ...(lengths ? { lengths } : {}) }, { rows }, ["q", "k"]);
  const qError = relativeError(got.q!, rotated(q, heads, headDim, positions, inv));
  const kError = relativeError(got.k!, rotated(k, kvHeads, headDim, positions, inv));
  console.log(`  rope ${c.scaling?.type}: q ${qError.toExponential(2)}, k ${kError.toExponential(2)}`);
  assert.ok(qError < BOUND && kError < BOUND, `q ${qError}, k ${kError}`);
}

const POSITIONS = Uint32Array.from([0, 1, 5, 15, 16, 17, 40, 63, 99, 31]);

test("linear and llama3 on the device: rows past the original context, GQA 4 over 2", async () => {
  await forwardMatches({ heads: 4, kvHeads: 2, headDim: 32, theta: 10000, scaling: SMALL_LLAMA3 }, POSITIONS);
  await forwardMatches({ heads: 2, kvHeads: 1, headDim: 18, theta: 10000, scaling: LINEAR }, POSITIONS);
});

test("dynamic on the device: each row scaled by its own sequence length, plain RoPE up to the original context", async () => {
  const c: RopeConstants = { heads: 4, kvHeads: 2, headDim: 32, theta: 10000, scaling: DYNAMIC };
  // A prefill of 20 rows (length 20 for all), decode rows at lengths 41 and 100, and short rows.
  const positions = Uint32Array.from([...Array.from({ length: 20 }, (_, p) => p), 40, 99, 3, 15]);
  const lengths = Uint32Array.from([...Array.from({ length: 20 }, () => 20), 41, 100, 4, 16]);
  await forwardMatches(c, positions, lengths);
  // Rows within the original context get exactly what the plain kernel gives.
  const short = { positions: Uint32Array.from([3, 15, 9]), lengths: Uint32Array.from([4, 16, 16]) };
  const q = randomFloats(random, 3 * 4 * 32);
  const k = randomFloats(random, 3 * 2 * 32);
  const dynamic = await runOnce(gpu, ropeKernel(c), { q, k, ...short }, { rows: 3 }, ["q", "k"]);
  const plain = await runOnce(gpu, ropeKernel({ ...c, scaling: undefined }), { q, k, positions: short.positions }, { rows: 3 }, ["q", "k"]);
  assert.equal(Array.from(dynamic.q!), Array.from(plain.q!));
  assert.equal(Array.from(dynamic.k!), Array.from(plain.k!));
});

test("plain RoPE keeps its kernel: no lengths binding, the same key and WGSL", () => {
  const plain = ropeKernel({ heads: 4, kvHeads: 2, headDim: 16, theta: 10000 });
  assert.is(plain.key, "rope(heads=4,kvHeads=2,headDim=16,theta=10000)");
  assert.equal(plain.bindings.map((b) => b.name), ["q", "k", "positions", "params"]);
  const dynamic = ropeKernel({ heads: 4, kvHeads: 2, headDim: 16, theta: 10000, scaling: DYNAMIC });
  assert.equal(dynamic.bindings.map((b) => b.name), ["q", "k", "positions", "lengths", "params"]);
  assert.is(dynamic.key, "rope(heads=4,kvHeads=2,headDim=16,theta=10000,scaling=dynamic,factor=2,originalMaxPositions=16)");
});

test("the backward rotates by the forward's llama3 frequencies, and refuses dynamic scaling", async () => {
  const c: RopeConstants = { heads: 2, kvHeads: 1, headDim: 32, theta: 10000, scaling: SMALL_LLAMA3 };
  const INV_FREQ_LINE = /^const INV_FREQ = .*$/m;
  assert.is(ropeBackwardKernel(c).wgsl.match(INV_FREQ_LINE)?.[0], ropeKernel(c).wgsl.match(INV_FREQ_LINE)?.[0]);
  const rows = POSITIONS.length;
  const dq = randomFloats(random, rows * 2 * 32);
  const dk = randomFloats(random, rows * 32);
  const got = await runOnce(gpu, ropeBackwardKernel(c), { dq, dk, positions: POSITIONS }, { rows }, ["dq", "dk"]);
  const qError = relativeError(got.dq!, ropeBackward(dq, { heads: 2, headDim: 32, theta: 10000, scaling: SMALL_LLAMA3 }, POSITIONS));
  const kError = relativeError(got.dk!, ropeBackward(dk, { heads: 1, headDim: 32, theta: 10000, scaling: SMALL_LLAMA3 }, POSITIONS));
  assert.ok(qError < 1e-5 && kError < 1e-5, `dq ${qError}, dk ${kError}`);
  assert.throws(() => ropeBackwardKernel({ ...c, scaling: DYNAMIC }), /dynamic rope scaling is not supported in training/);
});

test.after(() => gpu.context.destroy());
test.run();
