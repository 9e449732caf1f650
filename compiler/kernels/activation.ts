// The router's input activations as WGSL: `fn activate(v: vec4<f32>) -> vec4<f32>`, componentwise.
// gelu is the exact (erf) form HF calls "gelu"; erf uses Abramowitz & Stegun 7.1.26, whose absolute
// error is at most 1.5e-7 for every x, so gelu's absolute error stays below 1e-7 * (|x| + 1) in f32.
import type { Activation } from "../model.ts";

const ACTIVATIONS: Record<Activation, string> = {
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

/** WGSL defining `activate` (and its helpers) for one activation; activate(0) = 0 for each. */
export function activationWgsl(activation: Activation): string {
  const helpers = activation === "gelu" ? ERF : "";
  return `${helpers}
fn activate(v: vec4<f32>) -> vec4<f32> {
  ${ACTIVATIONS[activation]}
}`;
}
