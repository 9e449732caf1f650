// Float64 reference of one routed layer's training router (milora.md eq. 2-5, 8), on the scalar tape of
// autodiff.ts, with the same semantics as train.ts's Model.pool / activate / route and its balance
// loss: the rows are packed sequences, the router of a sequence reads its prompt rows (prompt routing)
// or each row routes on itself (token routing). The loss whose gradients are read off is
//   sum over decisions d, rows r of d, chosen experts e of dGates[r, e] * G_{d,e}  +  coef * L_balance,
// so its gradients are what the training kernels must produce from a given upstream dGates.
import { Tape, type Node } from "./autodiff.ts";
import { erf } from "./milora.ts";

export interface RouterReferenceCase {
  readonly hidden: number;
  readonly experts: number;
  readonly when: "prompt" | "token";
  readonly pooling: "last" | "mean" | "max" | "attention";
  readonly activation: "none" | "relu" | "gelu" | "rational";
  readonly selection: { readonly rule: "top_k"; readonly k: number } | { readonly rule: "threshold"; readonly threshold: number } | { readonly rule: "dense" };
  readonly renormalize: boolean;
  /** [rows, hidden]. */
  readonly x: ArrayLike<number>;
  /** Per sequence: first row, prompt end, end (prompt routing). */
  readonly spans: readonly (readonly [number, number, number])[];
  /** [experts, hidden]. */
  readonly weight: ArrayLike<number>;
  readonly pooler?: ArrayLike<number>;
  /** a_0..a_m. */
  readonly numerator?: ArrayLike<number>;
  /** b_1..b_n. */
  readonly denominator?: ArrayLike<number>;
  /** Upstream gate gradient of row r, expert e. */
  readonly dGate: (row: number, expert: number) => number;
  /** balance / routed layers. */
  readonly balanceCoef: number;
}

export interface RouterReferenceResult {
  /** Per decision: the pooled vector before the activation (prompt routing). */
  readonly pooled: number[][];
  readonly probs: number[][];
  readonly gates: number[][];
  /** The pooler's softmax weights per prompt row (attention), by row. */
  readonly attention: Map<number, number>;
  readonly balanceLoss: number;
  readonly dx: Float64Array;
  readonly dWeight: Float64Array;
  readonly dPooler?: Float64Array;
  readonly dNumerator?: Float64Array;
  readonly dDenominator?: Float64Array;
}

const SQRT_2PI = Math.sqrt(2 * Math.PI);
export const geluValue = (x: number) => 0.5 * x * (1 + erf(x / Math.SQRT2));
export const geluDerivative = (x: number) => 0.5 * (1 + erf(x / Math.SQRT2)) + (x * Math.exp(-0.5 * x * x)) / SQRT_2PI;

export function routerTrainReference(c: RouterReferenceCase): RouterReferenceResult {
  const t = new Tape();
  const H = c.hidden;
  const rows = c.x.length / H;
  const x: Node[][] = Array.from({ length: rows }, (_, r) => t.leaves(Array.from({ length: H }, (_, h) => c.x[r * H + h]!)));
  const w = t.leaves(c.weight);
  const pooler = c.pooler && t.leaves(c.pooler);
  const a = c.numerator && t.leaves(c.numerator);
  const b = c.denominator && t.leaves(c.denominator);
  const attention = new Map<number, number>();

  const pool = (span: readonly [number, number, number]): Node[] => {
    const prompt = x.slice(span[0], span[1]);
    switch (c.pooling) {
      case "last":
        return prompt.at(-1)!;
      case "mean":
        return Array.from({ length: H }, (_, i) => t.scale(t.sum(prompt.map((r) => r[i]!)), 1 / prompt.length));
      case "max":
        // The first row holding the maximum takes the gradient (torch.max).
        return Array.from({ length: H }, (_, i) => prompt.reduce((best, r) => (t.value(r[i]!) > t.value(best[i]!) ? r : best))[i]!);
      case "attention": {
        const scores = prompt.map((r) => t.dot(r, pooler!));
        const lse = t.logSumExp(scores);
        const weights = scores.map((s) => t.exp(t.sub(s, lse)));
        weights.forEach((wt, j) => attention.set(span[0] + j, t.value(wt)));
        return Array.from({ length: H }, (_, i) => t.dot(weights, prompt.map((r) => r[i]!)));
      }
    }
  };

  const activate = (v: Node[]): Node[] => {
    switch (c.activation) {
      case "none":
        return v;
      case "relu":
        return v.map((xi) => t.relu(xi));
      case "gelu":
        return v.map((xi) => t.apply(xi, geluValue, geluDerivative));
      case "rational":
        return v.map((xi) => {
          const powers: Node[] = [t.leaf(1), xi];
          while (powers.length < Math.max(a!.length, b!.length + 1)) powers.push(t.mul(powers.at(-1)!, xi));
          const numerator = t.dot(a!, powers.slice(0, a!.length));
          const denominator = b!.length === 0 ? t.leaf(1) : t.shift(t.abs(t.dot(b!, powers.slice(1, b!.length + 1))), 1);
          return t.div(numerator, denominator);
        });
    }
  };

  const decide = (p: Node[]) => {
    const v = activate(p);
    const logits = Array.from({ length: c.experts }, (_, e) => t.dot(v, w.slice(e * H, (e + 1) * H)));
    const lse = t.logSumExp(logits);
    const probs = logits.map((z) => t.exp(t.sub(z, lse)));
    const pv = t.values(probs);
    const order = pv.map((_, e) => e).sort((i, j) => pv[j]! - pv[i]! || i - j);
    const rule = c.selection;
    let chosen = rule.rule === "top_k" ? order.slice(0, rule.k) : rule.rule === "dense" ? order : order.filter((e) => pv[e]! >= rule.threshold);
    if (chosen.length === 0) chosen = [order[0]!];
    const gates = new Map<number, Node>();
    if (c.renormalize) {
      const picked = chosen.map((e) => logits[e]!);
      const pickedLse = t.logSumExp(picked);
      chosen.forEach((e, i) => gates.set(e, t.exp(t.sub(picked[i]!, pickedLse))));
    } else for (const e of chosen) gates.set(e, probs[e]!);
    return { probs, gates };
  };

  const decisions: { pooled?: Node[]; probs: Node[]; gates: Map<number, Node>; rows: number[] }[] = [];
  if (c.when === "prompt") {
    for (const span of c.spans) {
      const pooled = pool(span);
      decisions.push({ pooled, ...decide(pooled), rows: Array.from({ length: span[2] - span[0] }, (_, i) => span[0] + i) });
    }
  } else {
    for (let r = 0; r < rows; r++) decisions.push({ ...decide(x[r]!), rows: [r] });
  }

  const terms: Node[] = [];
  for (const d of decisions)
    for (const [e, g] of d.gates) {
      const upstream = d.rows.reduce((s, r) => s + c.dGate(r, e), 0);
      terms.push(t.scale(g, upstream));
    }
  // Eq. 4-5: N * sum_i f_i * mean_d P_{d,i}, f the argmax shares (no gradient).
  const D = decisions.length;
  const balanceTerms: Node[] = [];
  const tops = decisions.map((d) => {
    const p = t.values(d.probs);
    return p.indexOf(Math.max(...p));
  });
  for (let i = 0; i < c.experts; i++) {
    const f = tops.filter((top) => top === i).length / D;
    if (f === 0) continue;
    balanceTerms.push(t.scale(t.sum(decisions.map((d) => d.probs[i]!)), (c.experts * f) / D));
  }
  const balance = balanceTerms.length > 0 ? t.sum(balanceTerms) : t.leaf(0);
  const loss = t.add(t.sum(terms.length > 0 ? terms : [t.leaf(0)]), t.scale(balance, c.balanceCoef));
  const grads = t.backward(loss);
  const read = (ns: readonly Node[]) => Float64Array.from(ns, (n) => grads[n]!);
  return {
    pooled: decisions.map((d) => (d.pooled ? t.values(d.pooled) : [])),
    probs: decisions.map((d) => t.values(d.probs)),
    gates: decisions.map((d) => Array.from({ length: c.experts }, (_, e) => (d.gates.has(e) ? t.value(d.gates.get(e)!) : 0))),
    attention,
    balanceLoss: t.value(balance),
    dx: read(x.flat()),
    dWeight: read(w),
    ...(pooler ? { dPooler: read(pooler) } : {}),
    ...(a ? { dNumerator: read(a) } : {}),
    ...(b ? { dDenominator: read(b) } : {}),
  };
}
