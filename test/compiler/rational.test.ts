// The rational activation's initialisation (compiler/rational.ts): the committed GELU fit for the
// paper's orders is what the fit computes, and it is close to GELU on the fitted interval.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { GELU_RATIONAL, RATIONAL_DEFAULT_ORDERS, RATIONAL_FIT, fitRationalGelu, geluExact, rationalInit, rationalValue } from "../../compiler/rational.ts";
import { gelu, rational } from "../reference/milora.ts";

test("re-fitting GELU in float64 gives the committed 6 / 5 coefficients", () => {
  const fit = fitRationalGelu(RATIONAL_DEFAULT_ORDERS);
  assert.is(fit.numerator.length, 7);
  assert.is(fit.denominator.length, 5);
  // The fit is deterministic float64 arithmetic; 1e-9 relative to the largest coefficient leaves room
  // for another libm's last bits in Math.exp / Math.pow, not for a different fit.
  const scale = Math.max(...GELU_RATIONAL.numerator.map(Math.abs), ...GELU_RATIONAL.denominator.map(Math.abs));
  [...fit.numerator, ...fit.denominator].forEach((c, i) => {
    const committed = [...GELU_RATIONAL.numerator, ...GELU_RATIONAL.denominator][i]!;
    assert.ok(Math.abs(c - committed) <= 1e-9 * scale, `coefficient ${i}: fit ${c}, committed ${committed}`);
  });
  assert.is(rationalInit(RATIONAL_DEFAULT_ORDERS), GELU_RATIONAL);
});

test("the committed fit is within 2e-4 of GELU on [-3, 3] (measured 1.12e-4), and Ra(0) is near 0", () => {
  const [lo, hi] = RATIONAL_FIT.interval;
  let worst = 0;
  for (let k = 0; k <= 60_000; k++) {
    const x = lo + ((hi - lo) * k) / 60_000;
    // The reference's own erf-based gelu and its own Ra, independent of compiler/rational.ts.
    worst = Math.max(worst, Math.abs(rational(x, GELU_RATIONAL.numerator, GELU_RATIONAL.denominator) - gelu(x)));
  }
  assert.ok(worst < 2e-4, `max |Ra - GELU| = ${worst}`);
  assert.ok(worst > 1e-4, `the bound is stated tight: ${worst}`);
  assert.ok(Math.abs(rationalValue(0, GELU_RATIONAL)) < 1e-4);
  assert.ok(Math.abs(geluExact(1.5) - gelu(1.5)) < 1e-15);
});

test("other orders get their own fit: more coefficients fit better, and the result is cached", () => {
  const errorOf = (numerator: number, denominator: number) => {
    const c = rationalInit({ numerator, denominator });
    assert.is(c.numerator.length, numerator + 1);
    assert.is(c.denominator.length, denominator);
    let worst = 0;
    for (let x = -3; x <= 3; x += 0.001) worst = Math.max(worst, Math.abs(rationalValue(x, c) - geluExact(x)));
    return worst;
  };
  // Measured: 3 / 2 about 2.0e-2, 5 / 4 about 8.9e-4; a polynomial (denominator 0) of degree 4 is worse.
  const e32 = errorOf(3, 2);
  const e54 = errorOf(5, 4);
  assert.ok(e32 < 3e-2 && e54 < 1.5e-3 && e54 < e32, `${e32} ${e54}`);
  assert.ok(errorOf(4, 0) > e54);
  assert.is(rationalInit({ numerator: 5, denominator: 4 }), rationalInit({ numerator: 5, denominator: 4 }));
});

test.run();
