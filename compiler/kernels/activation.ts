// The router's activation g (paper eq. 3) as WGSL: `fn activate(v: vec4<f32>) -> vec4<f32>`,
// componentwise, applied to the pooled router input (or to a token's state for per-token routing).
// gelu is the exact (erf) form HF calls "gelu"; erf uses Abramowitz & Stegun 7.1.26, whose absolute
// error is at most 1.5e-7 for every x, so gelu's absolute error stays below 1e-7 * (|x| + 1) in f32.
// rational is the learned rational unit (eq. 6), Ra(x) = P(x) / (1 + |Q(x)|), reading its
// coefficients a_0..a_m, b_1..b_n (in that order) from the storage buffer `rational`.
import type { Activation } from "../model.ts";
import type { RationalOrders } from "../rational.ts";
import type { StorageDecl } from "./wgsl.ts";

const FIXED: Record<Exclude<Activation, "rational">, string> = {
  none: "return v;",
  relu: "return max(v, vec4<f32>(0.0));",
  gelu: "return 0.5 * v * (1.0 + erf4(v * 0.70710678118654752));",
};

// erf(x) = 1 - t (a1 + a2 t + ... + a5 t^4) exp(-x^2), t = 1 / (1 + p |x|), odd in x.
const ERF = /* wgsl */ `
fn erf4(x: vec4<f32>) -> vec4<f32> {
  let z = abs(x);
  let t = 1.0 / (1.0 + 0.3275911 * z);
  let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
  return sign(x) * (1.0 - poly * exp(-z * z));
}`;

/** The orders a kernel is specialised for, checked: integers, numerator >= 1, denominator >= 0. */
function checkedOrders(rational: RationalOrders | undefined): RationalOrders {
  if (!rational || !Number.isInteger(rational.numerator) || !Number.isInteger(rational.denominator) || rational.numerator < 1 || rational.denominator < 0)
    throw new Error(`rational activation: orders ${JSON.stringify(rational)} must be integers, numerator >= 1, denominator >= 0`);
  return rational;
}

/** The `rational` coefficient binding the activation reads (none for the fixed activations). */
export function activationStorage(activation: Activation): StorageDecl[] {
  return activation === "rational" ? [{ name: "rational", access: "read", type: "array<f32>" }] : [];
}

/**
 * WGSL defining `activate` (and its helpers) for one activation. Every activate(0) is finite (rational
 * gives a_0), which is all the kernels need of the zero lanes past an unaligned row's end: they meet
 * zero weights.
 */
export function activationWgsl(activation: Activation, rational?: RationalOrders): string {
  if (activation !== "rational") {
    return `${activation === "gelu" ? ERF : ""}
fn activate(v: vec4<f32>) -> vec4<f32> {
  ${FIXED[activation]}
}`;
  }
  const { numerator: m, denominator: n } = checkedOrders(rational);
  // Horner from the highest power: P = (..(a_m x + a_{m-1}) x ..) + a_0, Q = (..(b_n x + b_{n-1}) ..  + b_1) x.
  const p = [`var p = vec4<f32>(rational[${m}]);`, ...Array.from({ length: m }, (_, i) => `p = p * v + rational[${m - 1 - i}];`)];
  const q =
    n === 0
      ? ["return p;"]
      : [
          `var q = vec4<f32>(rational[${m + n}]);`,
          ...Array.from({ length: n - 1 }, (_, i) => `q = q * v + rational[${m + n - 1 - i}];`),
          "return p / (1.0 + abs(q * v));",
        ];
  return `
// Ra(x) = (a_0 + ... + a_${m} x^${m}) / (1 + |b_1 x + ... + b_${n} x^${n}|); rational = [a_0..a_${m}, b_1..b_${n}].
fn activate(v: vec4<f32>) -> vec4<f32> {
  ${[...p, ...q].join("\n  ")}
}`;
}
