// Float64 reference of causal grouped-query self-attention over packed training sequences and of its
// gradients, written from the definitions: S = Q K^T / sqrt(d) masked to j <= i within a sequence,
// P = softmax(S) row-wise, O = P V; for a loss with dL/dO = G:
//   dV = P^T G,  dP = G V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = dS K / sqrt(d),  dK = dS^T Q / sqrt(d),
// with dK and dV of a KV head summed over the query heads that share it. Explicit [T, T] matrices:
// this is the oracle, not a fast path. Checked by finite differences in attention-gradients.test.ts.

export interface AttentionShape {
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  /** Lengths of the packed sequences, in row order. */
  readonly lengths: readonly number[];
}

export interface AttentionForward {
  /** [rows, heads*headDim] */
  readonly out: Float64Array;
  /** [rows, heads]: log sum_j exp(S_ij), natural log */
  readonly lse: Float64Array;
}

export interface AttentionGradients {
  readonly dQ: Float64Array;
  readonly dK: Float64Array;
  readonly dV: Float64Array;
}

type Values = ArrayLike<number>;

/** Calls `f(first, length)` for each packed sequence. */
function eachSequence(lengths: readonly number[], f: (first: number, length: number) => void): void {
  let first = 0;
  for (const n of lengths) {
    f(first, n);
    first += n;
  }
}

/** Probabilities P[i][j] (j <= i, zero above) of one sequence and query head, and the row log-sum-exps. */
function probabilities(shape: AttentionShape, q: Values, k: Values, first: number, n: number, head: number) {
  const { heads, kvHeads, headDim } = shape;
  const kvHead = Math.floor(head / (heads / kvHeads));
  const p: Float64Array[] = [];
  const lse = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const scores = new Float64Array(i + 1);
    for (let j = 0; j <= i; j++) {
      let s = 0;
      for (let d = 0; d < headDim; d++)
        s += q[((first + i) * heads + head) * headDim + d]! * k[((first + j) * kvHeads + kvHead) * headDim + d]!;
      scores[j] = s / Math.sqrt(headDim);
    }
    const top = Math.max(...scores);
    let total = 0;
    for (const s of scores) total += Math.exp(s - top);
    lse[i] = top + Math.log(total);
    const row = new Float64Array(n);
    for (let j = 0; j <= i; j++) row[j] = Math.exp(scores[j]! - lse[i]!);
    p.push(row);
  }
  return { p, lse, kvHead };
}

export function attentionForward(shape: AttentionShape, q: Values, k: Values, v: Values): AttentionForward {
  const { heads, kvHeads, headDim, lengths } = shape;
  const rows = lengths.reduce((a, b) => a + b, 0);
  const out = new Float64Array(rows * heads * headDim);
  const lse = new Float64Array(rows * heads);
  eachSequence(lengths, (first, n) => {
    for (let h = 0; h < heads; h++) {
      const { p, lse: rowLse, kvHead } = probabilities(shape, q, k, first, n, h);
      for (let i = 0; i < n; i++) {
        lse[(first + i) * heads + h] = rowLse[i]!;
        for (let d = 0; d < headDim; d++) {
          let sum = 0;
          for (let j = 0; j <= i; j++) sum += p[i]![j]! * v[((first + j) * kvHeads + kvHead) * headDim + d]!;
          out[((first + i) * heads + h) * headDim + d] = sum;
        }
      }
    }
  });
  return { out, lse };
}

export function attentionBackward(shape: AttentionShape, q: Values, k: Values, v: Values, dOut: Values): AttentionGradients {
  const { heads, kvHeads, headDim, lengths } = shape;
  const rows = lengths.reduce((a, b) => a + b, 0);
  const dQ = new Float64Array(rows * heads * headDim);
  const dK = new Float64Array(rows * kvHeads * headDim);
  const dV = new Float64Array(rows * kvHeads * headDim);
  const scale = 1 / Math.sqrt(headDim);
  eachSequence(lengths, (first, n) => {
    for (let h = 0; h < heads; h++) {
      const { p, kvHead } = probabilities(shape, q, k, first, n, h);
      const qAt = (i: number) => ((first + i) * heads + h) * headDim;
      const kvAt = (j: number) => ((first + j) * kvHeads + kvHead) * headDim;
      for (let i = 0; i < n; i++) {
        const dp = new Float64Array(i + 1);
        let rowDot = 0;
        for (let j = 0; j <= i; j++) {
          let dot = 0;
          for (let d = 0; d < headDim; d++) dot += dOut[qAt(i) + d]! * v[kvAt(j) + d]!;
          dp[j] = dot;
          rowDot += p[i]![j]! * dot;
        }
        for (let j = 0; j <= i; j++) {
          const pij = p[i]![j]!;
          const ds = pij * (dp[j]! - rowDot);
          for (let d = 0; d < headDim; d++) {
            dQ[qAt(i) + d] = dQ[qAt(i) + d]! + ds * k[kvAt(j) + d]! * scale;
            dK[kvAt(j) + d] = dK[kvAt(j) + d]! + ds * q[qAt(i) + d]! * scale;
            dV[kvAt(j) + d] = dV[kvAt(j) + d]! + pij * dOut[qAt(i) + d]!;
          }
        }
      }
    }
  });
  return { dQ, dK, dV };
}
