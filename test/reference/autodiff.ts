// Reverse-mode automatic differentiation over float64 scalars, for the training reference: every value
// is a node on a tape, made by an elementary operation whose local derivatives are written beside it;
// backward() applies the chain rule in reverse creation order. Nothing here knows about models or
// kernels, so gradients of the reference loss come from the loss's own math, not from derived formulas.
// Small models only: one node per scalar (a 2-layer model of width 16 is about 10^5 nodes).

/** A node of the tape. */
export type Node = number;

export class Tape {
  readonly #values: number[] = [];
  /** Where each node's parents and local derivatives start in #parents / #locals; n-ary nodes allowed. */
  readonly #starts: number[] = [0];
  readonly #parents: number[] = [];
  readonly #locals: number[] = [];

  get size(): number {
    return this.#values.length;
  }

  value(n: Node): number {
    return this.#values[n]!;
  }

  values(ns: readonly Node[]): number[] {
    return ns.map((n) => this.#values[n]!);
  }

  /** An input: a parameter or a constant (its gradient is computed but may be ignored). */
  leaf(v: number): Node {
    return this.#push(v, [], []);
  }

  leaves(vs: ArrayLike<number>): Node[] {
    return Array.from({ length: vs.length }, (_, i) => this.leaf(vs[i]!));
  }

  /** A node of value `v` with d(v)/d(parents[i]) = locals[i]. */
  #push(v: number, parents: readonly Node[], locals: readonly number[]): Node {
    if (!Number.isFinite(v)) throw new Error(`autodiff: non-finite value ${v}`);
    this.#values.push(v);
    for (let i = 0; i < parents.length; i++) {
      this.#parents.push(parents[i]!);
      this.#locals.push(locals[i]!);
    }
    this.#starts.push(this.#parents.length);
    return this.#values.length - 1;
  }

  add(a: Node, b: Node): Node {
    return this.#push(this.value(a) + this.value(b), [a, b], [1, 1]);
  }

  sub(a: Node, b: Node): Node {
    return this.#push(this.value(a) - this.value(b), [a, b], [1, -1]);
  }

  mul(a: Node, b: Node): Node {
    return this.#push(this.value(a) * this.value(b), [a, b], [this.value(b), this.value(a)]);
  }

  div(a: Node, b: Node): Node {
    const [x, y] = [this.value(a), this.value(b)];
    return this.#push(x / y, [a, b], [1 / y, -x / (y * y)]);
  }

  /** c * a for a constant c. */
  scale(a: Node, c: number): Node {
    return this.#push(c * this.value(a), [a], [c]);
  }

  /** a + c for a constant c. */
  shift(a: Node, c: number): Node {
    return this.#push(this.value(a) + c, [a], [1]);
  }

  exp(a: Node): Node {
    const e = Math.exp(this.value(a));
    return this.#push(e, [a], [e]);
  }

  log(a: Node): Node {
    return this.#push(Math.log(this.value(a)), [a], [1 / this.value(a)]);
  }

  sqrt(a: Node): Node {
    const s = Math.sqrt(this.value(a));
    return this.#push(s, [a], [0.5 / s]);
  }

  /** |a|, with derivative sign(a) (0 at 0). */
  abs(a: Node): Node {
    const x = this.value(a);
    return this.#push(Math.abs(x), [a], [Math.sign(x)]);
  }

  /** max(a, 0), derivative 1 above 0 and 0 at or below (torch's convention at 0). */
  relu(a: Node): Node {
    const x = this.value(a);
    return this.#push(Math.max(x, 0), [a], [x > 0 ? 1 : 0]);
  }

  sigmoid(a: Node): Node {
    const s = 1 / (1 + Math.exp(-this.value(a)));
    return this.#push(s, [a], [s * (1 - s)]);
  }

  /** f(a) for a scalar function with its derivative given: GELU and the like. */
  apply(a: Node, f: (x: number) => number, df: (x: number) => number): Node {
    const x = this.value(a);
    return this.#push(f(x), [a], [df(x)]);
  }

  sum(ns: readonly Node[]): Node {
    return this.#push(
      ns.reduce((s, n) => s + this.value(n), 0),
      ns,
      ns.map(() => 1),
    );
  }

  /** sum_i a_i b_i of two node vectors. */
  dot(a: readonly Node[], b: readonly Node[]): Node {
    if (a.length !== b.length) throw new Error(`autodiff: dot of ${a.length} and ${b.length}`);
    let s = 0;
    for (let i = 0; i < a.length; i++) s += this.value(a[i]!) * this.value(b[i]!);
    return this.#push(s, [...a, ...b], [...this.values(b), ...this.values(a)]);
  }

  /** sum_i a_i c_i with constants c (a frozen weight row). */
  dotConst(a: readonly Node[], c: ArrayLike<number>, offset = 0): Node {
    let s = 0;
    const locals = new Array<number>(a.length);
    for (let i = 0; i < a.length; i++) {
      locals[i] = c[offset + i]!;
      s += this.value(a[i]!) * locals[i]!;
    }
    return this.#push(s, a, locals);
  }

  /** sum_i c_i a_i with constant coefficients: a fixed linear combination (rotations, weighted sums). */
  combine(a: readonly Node[], c: readonly number[]): Node {
    return this.dotConst(a, c);
  }

  /** log(sum_i exp(a_i)), shifted by the largest a_i for stability; d/da_i = softmax(a)_i. */
  logSumExp(ns: readonly Node[]): Node {
    const vs = this.values(ns);
    const m = Math.max(...vs);
    const total = vs.reduce((s, v) => s + Math.exp(v - m), 0);
    return this.#push(m + Math.log(total), ns, vs.map((v) => Math.exp(v - m) / total));
  }

  /** Gradients of `root` with respect to every node (d root / d node), by the chain rule in reverse. */
  backward(root: Node): Float64Array {
    const grad = new Float64Array(this.#values.length);
    grad[root] = 1;
    for (let n = root; n >= 0; n--) {
      const g = grad[n]!;
      if (g === 0) continue;
      for (let i = this.#starts[n]!; i < this.#starts[n + 1]!; i++) {
        const parent = this.#parents[i]!;
        grad[parent] = grad[parent]! + g * this.#locals[i]!;
      }
    }
    return grad;
  }
}
