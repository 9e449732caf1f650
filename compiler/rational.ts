// MiLoRA's learned rational activation (paper section 3.4, eq. 6), applied elementwise to a router's
// pooled input:
//   Ra(x) = (a_0 + a_1 x + ... + a_m x^m) / (1 + |b_1 x + ... + b_n x^n|)
// with one coefficient set per router (per routed layer). The coefficients are adapter tensors; an
// adapter without them gets the initialisation below, a least-squares fit of GELU (exact erf form).
//
// The fit, as in Pade Activation Units (Molina et al. 2020), in float64:
//   1. sample GELU at RATIONAL_FIT.points evenly spaced points of RATIONAL_FIT.interval;
//   2. linearised least squares: minimise sum_k (P(x_k) - f(x_k) Q(x_k) - f(x_k))^2, linear in (a, b)
//      (the denominator taken as 1 + Q, without the absolute value), solved by Householder QR;
//   3. refine on the true objective sum_k (Ra(x_k) - f(x_k))^2 (with |Q|) by Levenberg-Marquardt,
//      starting from step 2, for at most RATIONAL_FIT.iterations steps or until the cost stops falling.
// GELU_RATIONAL holds the result for the default orders (m = 6, n = 5), committed so that loading an
// adapter does not fit; test/compiler/rational.test.ts re-runs the fit and checks it still gives them.
// Other orders are fitted when first asked for (a few milliseconds).

/** Polynomial orders: `numerator` m (coefficients a_0..a_m), `denominator` n (b_1..b_n). */
export interface RationalOrders {
  readonly numerator: number;
  readonly denominator: number;
}

export interface RationalCoefficients {
  /** a_0 .. a_m. */
  readonly numerator: readonly number[];
  /** b_1 .. b_n. */
  readonly denominator: readonly number[];
}

/** The paper's orders (section 3.4): m = 6, n = 5. */
export const RATIONAL_DEFAULT_ORDERS: RationalOrders = { numerator: 6, denominator: 5 };

/** Orders a spec may ask for (both inclusive). */
export const RATIONAL_ORDER_LIMITS = { numerator: [1, 10], denominator: [0, 10] } as const;

/** What the GELU fit samples and how long it refines. */
export const RATIONAL_FIT = { interval: [-3, 3], points: 601, iterations: 500 } as const;

/**
 * The fit for the default orders (RATIONAL_DEFAULT_ORDERS), as fitRationalGelu computes it. Its largest
 * error on [-3, 3] is 1.12e-4 (the test bounds it by 2e-4); outside the interval it drifts away from
 * GELU (about 0.9 at |x| = 8), as any fixed-order fit does. The odd denominator terms come out
 * near 0: GELU(x) - x/2 is even, and the fit finds an almost even denominator.
 */
export const GELU_RATIONAL: RationalCoefficients = {
  numerator: [0.000028315619369966084, 0.49999999996141625, 0.3984980545952331, 0.16253446661154117, 0.06424667491965669, 0.018369186695872453, 0.0021048973879412127],
  denominator: [2.5647126091338506e-8, 0.32506891245308484, 4.027101147066141e-9, 0.036738373923523575, -1.710920991531394e-10],
};

/** erf to double precision: 2/sqrt(pi) e^(-x^2) sum_n (2x^2)^n x / (2n+1)!! (all terms positive). */
function erf(x: number): number {
  if (Math.abs(x) > 6) return Math.sign(x);
  let term = x;
  let sum = x;
  for (let n = 1; Math.abs(term) > 1e-17 * Math.abs(sum); n++) {
    term *= (2 * x * x) / (2 * n + 1);
    sum += term;
  }
  return (2 / Math.sqrt(Math.PI)) * Math.exp(-x * x) * sum;
}

/** GELU, exact form x Phi(x). */
export function geluExact(x: number): number {
  return 0.5 * x * (1 + erf(x / Math.SQRT2));
}

/** Ra(x) in float64. */
export function rationalValue(x: number, c: RationalCoefficients): number {
  let p = 0;
  for (let j = c.numerator.length - 1; j >= 0; j--) p = p * x + c.numerator[j]!;
  let q = 0;
  for (let i = c.denominator.length - 1; i >= 0; i--) q = q * x + c.denominator[i]!;
  return p / (1 + Math.abs(q * x));
}

/**
 * Least-squares solution of A x = y (A: rows x cols, row-major, rows >= cols, full column rank) by
 * Householder QR. Returns undefined when A is rank-deficient to working precision.
 */
function leastSquares(a: readonly number[][], y: readonly number[]): number[] | undefined {
  const rows = a.length;
  const cols = a[0]!.length;
  const m = a.map((r) => [...r]);
  const b = [...y];
  for (let k = 0; k < cols; k++) {
    let norm = 0;
    for (let i = k; i < rows; i++) norm += m[i]![k]! ** 2;
    norm = Math.sqrt(norm);
    if (norm === 0) return undefined;
    const alpha = m[k]![k]! > 0 ? -norm : norm;
    const v = Array.from({ length: rows - k }, (_, i) => m[k + i]![k]!);
    v[0] = v[0]! - alpha;
    const vv = v.reduce((s, x) => s + x * x, 0);
    if (vv === 0) continue;
    for (let j = k; j < cols; j++) {
      let dot = 0;
      for (let i = k; i < rows; i++) dot += v[i - k]! * m[i]![j]!;
      const f = (2 * dot) / vv;
      for (let i = k; i < rows; i++) m[i]![j] = m[i]![j]! - f * v[i - k]!;
    }
    let dot = 0;
    for (let i = k; i < rows; i++) dot += v[i - k]! * b[i]!;
    const f = (2 * dot) / vv;
    for (let i = k; i < rows; i++) b[i] = b[i]! - f * v[i - k]!;
  }
  const x = new Array<number>(cols).fill(0);
  const scale = Math.max(...Array.from({ length: cols }, (_, k) => Math.abs(m[k]![k]!)));
  for (let k = cols - 1; k >= 0; k--) {
    if (Math.abs(m[k]![k]!) <= 1e-14 * scale) return undefined;
    let s = b[k]!;
    for (let j = k + 1; j < cols; j++) s -= m[k]![j]! * x[j]!;
    x[k] = s / m[k]![k]!;
  }
  return x;
}

/** The fit described at the top of this file, for any orders within RATIONAL_ORDER_LIMITS. */
export function fitRationalGelu(orders: RationalOrders): RationalCoefficients {
  const { numerator: m, denominator: n } = orders;
  const [lo, hi] = RATIONAL_FIT.interval;
  const xs = Array.from({ length: RATIONAL_FIT.points }, (_, k) => lo + ((hi - lo) * k) / (RATIONAL_FIT.points - 1));
  const fs = xs.map(geluExact);
  const split = (theta: readonly number[]): RationalCoefficients => ({ numerator: theta.slice(0, m + 1), denominator: theta.slice(m + 1) });
  // 2. Linearised: P(x) - f(x) (b_1 x + ... + b_n x^n) = f(x).
  const linear = xs.map((x, k) => [...Array.from({ length: m + 1 }, (_, j) => x ** j), ...Array.from({ length: n }, (_, i) => -fs[k]! * x ** (i + 1))]);
  const start = leastSquares(linear, fs);
  if (!start) throw new Error(`rational fit: orders ${m}/${n} are degenerate on the interval`);
  let theta: number[] = start;
  // 3. Levenberg-Marquardt on the residuals Ra(x_k) - f(x_k).
  const cost = (t: readonly number[]) => xs.reduce((s, x, k) => s + (rationalValue(x, split(t)) - fs[k]!) ** 2, 0);
  let current = cost(theta);
  let mu = 1e-3;
  for (let it = 0; it < RATIONAL_FIT.iterations; it++) {
    const { numerator: a, denominator: b } = split(theta);
    const jac: number[][] = [];
    const residual: number[] = [];
    xs.forEach((x, k) => {
      let p = 0;
      for (let j = m; j >= 0; j--) p = p * x + a[j]!;
      let q = 0;
      for (let i = n - 1; i >= 0; i--) q = q * x + b[i]!;
      q *= x;
      const d = 1 + Math.abs(q);
      const s = q >= 0 ? 1 : -1;
      jac.push([...Array.from({ length: m + 1 }, (_, j) => x ** j / d), ...Array.from({ length: n }, (_, i) => (-p * s * x ** (i + 1)) / (d * d))]);
      residual.push(p / d - fs[k]!);
    });
    // Damped step: least squares of [J; sqrt(mu) diag(|J_col|)] delta = [-r; 0].
    const colNorm = jac[0]!.map((_, c) => Math.sqrt(jac.reduce((s, row) => s + row[c]! ** 2, 0)));
    let improved = false;
    for (let tries = 0; tries < 30 && !improved; tries++) {
      const damp = colNorm.map((norm, c) => colNorm.map((_, j) => (j === c ? Math.sqrt(mu) * norm : 0)));
      const delta = leastSquares([...jac, ...damp], [...residual.map((r) => -r), ...colNorm.map(() => 0)]);
      const next: number[] | undefined = delta && theta.map((t, i) => t + delta[i]!);
      const nextCost = next ? cost(next) : Infinity;
      if (next && nextCost < current) {
        improved = true;
        const gain = (current - nextCost) / current;
        theta = next;
        current = nextCost;
        mu = Math.max(mu / 3, 1e-12);
        if (gain < 1e-13) it = RATIONAL_FIT.iterations;
      } else mu *= 4;
    }
    if (!improved) break;
  }
  return split(theta);
}

const fitted = new Map<string, RationalCoefficients>();

/** The initial coefficients for `orders`: the committed fit for the default orders, else a fresh fit. */
export function rationalInit(orders: RationalOrders): RationalCoefficients {
  if (orders.numerator === RATIONAL_DEFAULT_ORDERS.numerator && orders.denominator === RATIONAL_DEFAULT_ORDERS.denominator) return GELU_RATIONAL;
  const key = `${orders.numerator}/${orders.denominator}`;
  let c = fitted.get(key);
  if (!c) fitted.set(key, (c = fitRationalGelu(orders)));
  return c;
}
