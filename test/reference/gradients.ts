// float64 forward and backward of the operations `milora train` differentiates, over flat row-major
// arrays, written from the math (gradients.test.ts checks every backward against central finite
// differences of its forward). Shapes follow the kernels: linear weights [out, in] as in Hugging Face,
// activations [rows, width].

/** y [M, N] = x [M, K] W^T for W [N, K]. */
export function linearForward(x: ArrayLike<number>, w: ArrayLike<number>, M: number, N: number, K: number): Float64Array {
  const y = new Float64Array(M * N);
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let sum = 0;
      for (let k = 0; k < K; k++) sum += x[m * K + k]! * w[n * K + k]!;
      y[m * N + n] = sum;
    }
  return y;
}

/** dX [M, K] = dY [M, N] W [N, K] (the weight is frozen: no dW). */
export function linearInputGrad(dy: ArrayLike<number>, w: ArrayLike<number>, M: number, N: number, K: number): Float64Array {
  const dx = new Float64Array(M * K);
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      const g = dy[m * N + n]!;
      for (let k = 0; k < K; k++) dx[m * K + k] = dx[m * K + k]! + g * w[n * K + k]!;
    }
  return dx;
}

/** One adapter's LoRA on `rows` rows: t = x A^T [rows, rank], y = coef[r] * t B^T [rows, out]. */
export interface LoraShapes {
  readonly rows: number;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly rank: number;
}

/** The LoRA delta (what expand adds) and the saved shrink output; coef[r] = gate[r] * scaling. */
export function loraForward(
  s: LoraShapes,
  x: ArrayLike<number>,
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  coef: ArrayLike<number>,
): { t: Float64Array; y: Float64Array } {
  const t = linearForward(x, a, s.rows, s.rank, s.inFeatures);
  const bt = linearForward(t, b, s.rows, s.outFeatures, s.rank);
  return { t, y: bt.map((v, i) => v * coef[Math.floor(i / s.outFeatures)]!) };
}

export interface LoraGrads {
  /** [rows, rank]: coef[r] * dY[r] B. */
  readonly dt: Float64Array;
  /** [rank, in]: sum over rows of dt[r]^T x[r]. */
  readonly dA: Float64Array;
  /** [out, rank]: sum over rows of coef[r] dY[r]^T t[r]. */
  readonly dB: Float64Array;
  /** [rows, in]: dt[r] A, the LoRA's part of the input gradient. */
  readonly dX: Float64Array;
  /** [rows]: d loss / d gate[r] = scaling * <dY[r], (B t[r])> (rows with coef 0 included). */
  readonly dGate: Float64Array;
}

/**
 * Gradients of loraForward for upstream dY, with coef = gate * scaling per row (scaling given so that
 * dGate, the gradient w.r.t. the gate rather than coef, can be formed).
 */
export function loraBackward(
  s: LoraShapes,
  x: ArrayLike<number>,
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  gate: ArrayLike<number>,
  scaling: number,
  dy: ArrayLike<number>,
): LoraGrads {
  const { rows, inFeatures, outFeatures, rank } = s;
  const t = linearForward(x, a, rows, rank, inFeatures);
  const u = linearInputGrad(dy, b, rows, outFeatures, rank); // dY B, [rows, rank]
  const dt = u.map((v, i) => v * gate[Math.floor(i / rank)]! * scaling);
  const dA = new Float64Array(rank * inFeatures);
  const dB = new Float64Array(outFeatures * rank);
  const dGate = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    const coef = gate[r]! * scaling;
    for (let j = 0; j < rank; j++) {
      for (let k = 0; k < inFeatures; k++) dA[j * inFeatures + k] = dA[j * inFeatures + k]! + dt[r * rank + j]! * x[r * inFeatures + k]!;
      for (let o = 0; o < outFeatures; o++) dB[o * rank + j] = dB[o * rank + j]! + coef * dy[r * outFeatures + o]! * t[r * rank + j]!;
      // <dY, B t> = <dY B, t>
      dGate[r] = dGate[r]! + scaling * u[r * rank + j]! * t[r * rank + j]!;
    }
  }
  return { dt, dA, dB, dX: linearInputGrad(dt, a, rows, rank, inFeatures), dGate };
}

/** y = x * rsqrt(mean(x^2) + eps) * w per row of `hidden` values. */
export function rmsNormForward(x: ArrayLike<number>, w: ArrayLike<number>, rows: number, hidden: number, eps: number): Float64Array {
  const y = new Float64Array(rows * hidden);
  for (let r = 0; r < rows; r++) {
    let sq = 0;
    for (let i = 0; i < hidden; i++) sq += x[r * hidden + i]! ** 2;
    const rs = 1 / Math.sqrt(sq / hidden + eps);
    for (let i = 0; i < hidden; i++) y[r * hidden + i] = x[r * hidden + i]! * rs * w[i]!;
  }
  return y;
}

/** dx = w dy r - x r^3 mean(x w dy), r = rsqrt(mean(x^2) + eps) (weight frozen). */
export function rmsNormInputGrad(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  dy: ArrayLike<number>,
  rows: number,
  hidden: number,
  eps: number,
): Float64Array {
  const dx = new Float64Array(rows * hidden);
  for (let r = 0; r < rows; r++) {
    let sq = 0;
    let dot = 0;
    for (let i = 0; i < hidden; i++) {
      const v = x[r * hidden + i]!;
      sq += v * v;
      dot += v * w[i]! * dy[r * hidden + i]!;
    }
    const rs = 1 / Math.sqrt(sq / hidden + eps);
    for (let i = 0; i < hidden; i++)
      dx[r * hidden + i] = w[i]! * dy[r * hidden + i]! * rs - x[r * hidden + i]! * rs ** 3 * (dot / hidden);
  }
  return dx;
}

function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

/** act = silu(gate) * up, elementwise. */
export function swigluForward(gate: ArrayLike<number>, up: ArrayLike<number>): Float64Array {
  return Float64Array.from(gate, (g, i) => g * sigmoid(g) * up[i]!);
}

/** dGate = dAct * up * silu'(gate), silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g); dUp = dAct * silu(gate). */
export function swigluBackward(gate: ArrayLike<number>, up: ArrayLike<number>, dAct: ArrayLike<number>): { dGate: Float64Array; dUp: Float64Array } {
  const dGate = new Float64Array(gate.length);
  const dUp = new Float64Array(gate.length);
  for (let i = 0; i < gate.length; i++) {
    const g = gate[i]!;
    const s = sigmoid(g);
    dGate[i] = dAct[i]! * up[i]! * s * (1 + g * (1 - s));
    dUp[i] = dAct[i]! * g * s;
  }
  return { dGate, dUp };
}

/** The "not supervised" label (Hugging Face's -100). */
export const IGNORE_LABEL = 0xffffffff;

/** Per-row -log softmax(logits[r])[label[r]], 0 for unsupervised rows. */
export function crossEntropyForward(logits: ArrayLike<number>, labels: ArrayLike<number>, rows: number, vocab: number): Float64Array {
  const loss = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    const label = labels[r]!;
    if (label === IGNORE_LABEL) continue;
    let max = -Infinity;
    for (let v = 0; v < vocab; v++) max = Math.max(max, logits[r * vocab + v]!);
    let sum = 0;
    for (let v = 0; v < vocab; v++) sum += Math.exp(logits[r * vocab + v]! - max);
    loss[r] = Math.log(sum) + max - logits[r * vocab + label]!;
  }
  return loss;
}

/**
 * The loss per row and d(lossScale * sum of losses)/d logits = (softmax - onehot(label)) * lossScale,
 * zero on unsupervised rows.
 */
export function crossEntropyBackward(
  logits: ArrayLike<number>,
  labels: ArrayLike<number>,
  rows: number,
  vocab: number,
  lossScale: number,
): { loss: Float64Array; dLogits: Float64Array } {
  const dLogits = new Float64Array(rows * vocab);
  for (let r = 0; r < rows; r++) {
    const label = labels[r]!;
    if (label === IGNORE_LABEL) continue;
    let max = -Infinity;
    for (let v = 0; v < vocab; v++) max = Math.max(max, logits[r * vocab + v]!);
    let sum = 0;
    for (let v = 0; v < vocab; v++) sum += Math.exp(logits[r * vocab + v]! - max);
    for (let v = 0; v < vocab; v++)
      dLogits[r * vocab + v] = (Math.exp(logits[r * vocab + v]! - max) / sum - (v === label ? 1 : 0)) * lossScale;
  }
  return { loss: crossEntropyForward(logits, labels, rows, vocab), dLogits };
}
