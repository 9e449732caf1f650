// The float64 gradients against central finite differences of their forwards, a few elements of each
// gradient on small random inputs: L = <upstream, forward(inputs)>, dL/dz ~ (L(z + h) - L(z - h)) / 2h.
// With h = 1e-5 in float64 the difference quotient is good to about 1e-9 here, so the bound is 1e-7
// relative to max(1, |gradient|). The forwards are first checked against the model's own references.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { mulberry32 } from "../../examples/random-checkpoint.ts";
import {
  IGNORE_LABEL,
  crossEntropyBackward,
  crossEntropyForward,
  linearForward,
  linearInputGrad,
  loraBackward,
  loraForward,
  rmsNormForward,
  rmsNormInputGrad,
  swigluBackward,
  swigluForward,
} from "./gradients.ts";
import { logSoftmax } from "./beam.ts";
import { matmulTransposed, rmsNorm, silu } from "./llama.ts";

const random = mulberry32(5);
const H = 1e-5;
const BOUND = 1e-7;

function uniform(n: number, scale = 1): Float64Array {
  return Float64Array.from({ length: n }, () => (random() * 2 - 1) * scale);
}

function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
}

/** Checks `grad` (dL/dz) on `count` random elements of z (which `loss` reads) and on its last one. */
function checkGradient(name: string, z: Float64Array, grad: ArrayLike<number>, loss: () => number, count = 6) {
  assert.is(grad.length, z.length, `${name}: gradient length`);
  const picks = [...Array.from({ length: count }, () => Math.floor(random() * z.length)), z.length - 1];
  for (const i of picks) {
    const saved = z[i]!;
    z[i] = saved + H;
    const plus = loss();
    z[i] = saved - H;
    const minus = loss();
    z[i] = saved;
    const numeric = (plus - minus) / (2 * H);
    const error = Math.abs(numeric - grad[i]!) / Math.max(1, Math.abs(grad[i]!));
    assert.ok(error < BOUND, `${name}[${i}]: analytic ${grad[i]} numeric ${numeric} (error ${error})`);
  }
}

function rowsOf(flat: Float64Array, width: number): Float64Array[] {
  return Array.from({ length: flat.length / width }, (_, r) => flat.slice(r * width, (r + 1) * width));
}

test("the forwards agree with the model's references (matmulTransposed, rmsNorm, silu, logSoftmax)", () => {
  const [M, N, K] = [3, 5, 7];
  const x = uniform(M * K);
  const w = uniform(N * K);
  const want = matmulTransposed(rowsOf(x, K), w, N);
  assert.ok(Math.max(...Array.from(linearForward(x, w, M, N, K), (v, i) => Math.abs(v - want[Math.floor(i / N)]![i % N]!))) < 1e-14);
  const norm = rmsNorm(rowsOf(x, K), w.subarray(0, K), 1e-5);
  assert.ok(Math.max(...Array.from(rmsNormForward(x, w, M, K, 1e-5), (v, i) => Math.abs(v - norm[Math.floor(i / K)]![i % K]!))) < 1e-14);
  const up = uniform(x.length);
  assert.ok(Math.max(...Array.from(swigluForward(x, up), (v, i) => Math.abs(v - silu(x[i]!) * up[i]!))) < 1e-15);
  const labels = [2, IGNORE_LABEL, 6];
  const loss = crossEntropyForward(x, labels, M, K);
  assert.ok(Math.abs(loss[0]! + logSoftmax(x.subarray(0, K))[2]!) < 1e-14);
  assert.is(loss[1], 0);
  assert.ok(Math.abs(loss[2]! + logSoftmax(x.subarray(2 * K))[6]!) < 1e-14);
});

test("linear input gradient", () => {
  const [M, N, K] = [4, 6, 5];
  const x = uniform(M * K);
  const w = uniform(N * K);
  const dy = uniform(M * N);
  checkGradient("dX", x, linearInputGrad(dy, w, M, N, K), () => dot(dy, linearForward(x, w, M, N, K)));
});

test("LoRA gradients w.r.t. x, A, B and the gate, a gated-off row included", () => {
  const s = { rows: 5, inFeatures: 7, outFeatures: 6, rank: 3 };
  const scaling = 1.5;
  const x = uniform(s.rows * s.inFeatures);
  const a = uniform(s.rank * s.inFeatures);
  const b = uniform(s.outFeatures * s.rank);
  const gate = Float64Array.from([0.7, 0.2, 0, 1, 0.45]);
  const dy = uniform(s.rows * s.outFeatures);
  const g = loraBackward(s, x, a, b, gate, scaling, dy);
  const loss = () => dot(dy, loraForward(s, x, a, b, gate.map((v) => v * scaling)).y);
  checkGradient("dX", x, g.dX, loss);
  checkGradient("dA", a, g.dA, loss);
  checkGradient("dB", b, g.dB, loss);
  checkGradient("dGate", gate, g.dGate, loss, 5);
  // dt is the gradient w.r.t. the saved t: perturb t through y = coef * t B^T directly.
  const t = loraForward(s, x, a, b, gate).t;
  const fromT = () => dot(dy, linearForward(t, b, s.rows, s.outFeatures, s.rank).map((v, i) => v * gate[Math.floor(i / s.outFeatures)]! * scaling));
  checkGradient("dt", t, g.dt, fromT);
  // A gated-off row contributes nothing to dA, dB and dX.
  for (let k = 0; k < s.inFeatures; k++) assert.is(g.dX[2 * s.inFeatures + k], 0);
});

test("RMSNorm input gradient", () => {
  const [rows, hidden, eps] = [3, 9, 1e-5];
  const x = uniform(rows * hidden, 2);
  const w = uniform(hidden);
  const dy = uniform(rows * hidden);
  checkGradient("dx", x, rmsNormInputGrad(x, w, dy, rows, hidden, eps), () => dot(dy, rmsNormForward(x, w, rows, hidden, eps)), 10);
});

test("SwiGLU gradients, large |gate| included", () => {
  const gate = Float64Array.from([...uniform(20, 4), 30, -30]);
  const up = uniform(gate.length);
  const dAct = uniform(gate.length);
  const g = swigluBackward(gate, up, dAct);
  const loss = () => dot(dAct, swigluForward(gate, up));
  checkGradient("dGate", gate, g.dGate, loss, 10);
  checkGradient("dUp", up, g.dUp, loss, 10);
});

test("cross-entropy gradient of lossScale * the sum of the supervised rows' losses", () => {
  const [rows, vocab, lossScale] = [4, 11, 1 / 3];
  const logits = uniform(rows * vocab, 5);
  const labels = [3, IGNORE_LABEL, 0, 10];
  const { loss, dLogits } = crossEntropyBackward(logits, labels, rows, vocab, lossScale);
  assert.equal(Array.from(loss), Array.from(crossEntropyForward(logits, labels, rows, vocab)));
  const total = () => lossScale * crossEntropyForward(logits, labels, rows, vocab).reduce((s, v) => s + v, 0);
  checkGradient("dLogits", logits, dLogits, total, 12);
  for (let v = 0; v < vocab; v++) assert.is(dLogits[vocab + v], 0);
});

test.run();
