// The per_ffn (MixLoRA) training kernels (compiler/kernels/moe-train.ts: moe_ffn_pass, moe_ffn_mix,
// moe_ffn_scale, moe_ffn_gate_grad; elementwise-backward.ts: swiglu_backward_sum) against float64
// references written from the math (docs/training.md, per_ffn), on fresh seeded random data, each kernel
// alone and then in the order runtime/training/graph.ts runs them for one routed layer:
//   per_ffn: a row keeps the experts whose gate h_e in the route record [rows, 3E] (second part) is not
//     0; each kept expert e runs its own feed-forward pass, G_e, U_e, H_e = silu(G_e) U_e, D_e = Wd H_e
//     + s Bd_e Ad_e H_e (expert e owning ranks e r .. (e+1) r - 1 of the stacked LoRA), and the MLP's
//     output is h + sum_e h_e D_e. The graph runs pass p on each row's p-th kept expert in index order;
//   moe_ffn_pass: mask[r] one-hot at that expert (all 0 when the row keeps at most p experts), gate[r]
//     its h (0 then); over the passes 0..k-1 every kept expert comes exactly once, with its gate;
//   moe_ffn_mix: y = (first pass ? residual : y) + g_p D_p, rows of g_p = 0 unchanged (their D_p unread);
//   moe_ffn_scale: d(H_p) = g_p v, v = dy Wd;
//   moe_ffn_gate_grad: dg_e = dy . D_e = v . H_e + s (dy Bd) . t_gated (t_gated = mask * Ad H_e), at the
//     pass expert's column of dGates [rows, E], nothing written for rows with an all-0 mask;
//   swiglu_backward_sum: dG_p = d(H_p) U_p silu'(G_p), dU_p = d(H_p) silu(G_p) (silu'(g) = s (1 + g (1 -
//     s)), s = sigmoid(g); the reference's is checked by central differences), and the sums over the
//     passes, sum_p dG_p and sum_p dU_p, stored on the first pass and added on the others.
// Bounds: moe_ffn_pass copies (mask 0/1, gate the record's bits) and moe_ffn_scale is one f32 product,
// correctly rounded in WGSL, so both must be exact (bit for bit Math.fround(g * v)); the others within
// 1e-5 relative (L2) of float64 on the f32 inputs, the project's f32 bound: the gate gradient is an f32
// dot product over at most 1000 terms (~sqrt(n) 2^-24), the mix a sum of at most 8 products per element,
// the SwiGLU backward a few operations on one exp per element (each element also within 1e-5 of its
// terms' size, as test/compiler/kernels/elementwise-backward.test.ts checks swiglu_backward), its sums
// over at most 8 passes. Every buffer has elements (rows) past what the dispatch covers, and the outputs
// start as NaN: what a kernel must not write (rows past `rows` or `n`, dGates columns of experts not in
// the pass, rows without a pass expert) must keep the sentinel's bits; inputs past the range are finite
// (1000, or a record's gates 1), so a write there computed from them shows; inputs a kernel must not
// read (the record's P and gradient parts, D_p on rows whose pass is not taken) are NaN.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { swigluBackwardSumKernel } from "../../../compiler/kernels/elementwise-backward.ts";
import { loraBackwardInputKernel } from "../../../compiler/kernels/lora-backward.ts";
import { packLoraSlots } from "../../../compiler/kernels/lora.ts";
import { moeFfnGateGradKernel, moeFfnMixKernel, moeFfnPassKernel, moeFfnScaleKernel } from "../../../compiler/kernels/moe-train.ts";
import { softmax } from "../../reference/llama.ts";
import { nanFilled, openGpu, randomFloats, relativeError, seeded } from "./gpu-check.ts";
import { bitsOf, runSteps } from "./step-chain.ts";

const gpu = await openGpu();
const random = seeded(97);
const BOUND = 1e-5;
/** Rows (or elements) past what each dispatch covers, in every buffer. */
const EXTRA = 3;
/** What inputs hold past the range a dispatch covers. */
const PAST = 1000;
const past = (n: number) => new Float32Array(n).fill(PAST);

const NAN_BITS = bitsOf(NaN);

/** The first index where the f32 bits differ, or -1. */
function bitDiff(got: ArrayLike<number>, want: ArrayLike<number>): number {
  const x = new Uint32Array(Float32Array.from(got).buffer);
  const y = new Uint32Array(Float32Array.from(want).buffer);
  if (x.length !== y.length) return Math.min(x.length, y.length);
  return x.findIndex((v, i) => v !== y[i]);
}

// ---------------------------------------------------------------------------------------------------
// Route records

interface Routing {
  readonly E: number;
  /** Experts kept per row (top K of P; K = E is dense). */
  readonly K: number;
  readonly renormalize: boolean;
  readonly rows: number;
}

/** Rows of a record that keep no expert (no routed slot at all). */
const keepsNone = (r: number) => r % 11 === 4;
/** Rows of a record where one kept gate is 0 (a kept probability that underflowed): they keep K - 1. */
const keepsFewer = (r: number) => r % 9 === 2;

/**
 * A route record [rows + EXTRA, 3E] as router_train_forward leaves it, but with only the gates real:
 * per row the top K of a softmax of random logits at p (or p over the kept sum), 0 elsewhere, f32; the
 * P and gradient parts NaN (moe_ffn_pass reads the gates only); rows past `rows` with every gate 1 (a
 * kernel reading them would write a mask there). Returns it and each row's E gates.
 */
function routeRecord(c: Routing): { record: Float32Array; gates: Float32Array[] } {
  const { E, K, rows } = c;
  const RW = 3 * E;
  const record = nanFilled((rows + EXTRA) * RW);
  const gates = Array.from({ length: rows }, (_, r) => {
    const p = softmax(Array.from({ length: E }, () => 6 * random() - 3));
    const kept = [...p.keys()].sort((a, b) => p[b]! - p[a]! || a - b).slice(0, K);
    const sum = kept.reduce((s, e) => s + p[e]!, 0);
    const h = Float32Array.from(p, (v, e) => (kept.includes(e) ? (c.renormalize ? v / sum : v) : 0));
    if (keepsNone(r)) h.fill(0);
    else if (keepsFewer(r)) h[kept[Math.floor(random() * K)]!] = 0;
    record.set(h, r * RW + E);
    return h;
  });
  for (let r = rows; r < rows + EXTRA; r++) record.fill(1, r * RW + E, r * RW + 2 * E);
  return { record, gates };
}

/** The experts a row keeps (gate not 0), in index order: pass p runs the p-th. */
const keptOf = (h: ArrayLike<number>) => [...Array.from(h).keys()].filter((e) => h[e] !== 0);

/** Per row, pass p's expert (undefined when the row keeps at most p experts) and its gate (0 then). */
function passOf(gates: readonly Float32Array[], p: number): { expert: (number | undefined)[]; gate: Float32Array } {
  const expert = gates.map((h) => keptOf(h)[p]);
  return { expert, gate: Float32Array.from(expert, (e, r) => (e === undefined ? 0 : gates[r]![e]!)) };
}

/** The one-hot masks [rows + EXTRA, E] of a pass; rows past `rows` one-hot at expert 0 (a kernel must not read them). */
function maskOf(expert: readonly (number | undefined)[], E: number): Float32Array {
  const mask = new Float32Array((expert.length + EXTRA) * E);
  expert.forEach((e, r) => {
    if (e !== undefined) mask[r * E + e] = 1;
  });
  for (let r = expert.length; r < expert.length + EXTRA; r++) mask[r * E] = 1;
  return mask;
}

/**
 * An input: `rows` rows of `width` random values, then EXTRA rows of PAST, finite so that a kernel
 * writing past its range from them leaves something other than the outputs' NaN sentinel.
 */
function rowsOf(rows: number, width: number, scale = 1, past = PAST): Float32Array {
  const v = randomFloats(random, (rows + EXTRA) * width, scale);
  v.fill(past, rows * width);
  return v;
}

/** Asserts that elements from..to of `got` kept the NaN sentinel's bits. */
function assertSentinel(got: Float32Array, from: number, to: number, what: string) {
  for (let i = from; i < to; i++) if (bitsOf(got[i]!) !== NAN_BITS) assert.unreachable(`${what}: element ${i} was written (${got[i]}), must keep the NaN sentinel`);
}

const label = (c: Routing) => `${c.E} experts, ${c.K === c.E ? "dense" : `top ${c.K}${c.renormalize ? " renormalised" : ""}`}, ${c.rows} rows`;

// ---------------------------------------------------------------------------------------------------
// moe_ffn_pass

for (const c of [
  { E: 2, K: 1, renormalize: true, rows: 70 }, // top 1 renormalised: every kept gate 1
  { E: 4, K: 2, renormalize: true, rows: 130 }, // three workgroups, the last partial
  { E: 5, K: 3, renormalize: false, rows: 65 },
  { E: 8, K: 8, renormalize: false, rows: 9 }, // dense: E passes
  { E: 13, K: 4, renormalize: true, rows: 129 },
  { E: 64, K: 8, renormalize: false, rows: 33 }, // MOE_TRAIN_MAX_EXPERTS
] satisfies Routing[]) {
  test(`moe_ffn_pass, ${label(c)}, rows keeping none and one fewer: pass p's mask one-hot at the p-th kept expert in index order, gate its bits; passes 0..K-1 cover every kept expert once; pass K none; rows past \`rows\` unwritten`, async () => {
    const { E, K, rows } = c;
    const { record, gates } = routeRecord(c);
    const passes = Array.from({ length: K + 1 }, (_, p) => p);
    const data: Record<string, Float32Array> = { route: record };
    for (const p of passes) Object.assign(data, { [`mask${p}`]: nanFilled((rows + EXTRA) * E), [`gate${p}`]: nanFilled(rows + EXTRA) });
    const got = await runSteps(
      gpu,
      data,
      passes.map((p) => [moeFfnPassKernel({ experts: E }), { mask: `mask${p}`, gate: `gate${p}` }, { rows, ffnPass: p }] as const),
      passes.flatMap((p) => [`mask${p}`, `gate${p}`]),
    );
    const covered = gates.map(() => new Float64Array(E));
    for (const p of passes) {
      const { expert, gate } = passOf(gates, p);
      const mask = got[`mask${p}`]!;
      const wantMask = maskOf(expert, E).subarray(0, rows * E);
      const at = bitDiff(mask.subarray(0, rows * E), wantMask);
      assert.ok(at < 0, `pass ${p}: mask row ${Math.floor(at / E)} expert ${at % E}: ${mask[at]}, want ${wantMask[at]}`);
      const gi = bitDiff(got[`gate${p}`]!.subarray(0, rows), gate);
      assert.ok(gi < 0, `pass ${p}: gate of row ${gi}: ${got[`gate${p}`]![gi]}, want the record's ${gate[gi]}`);
      assertSentinel(mask, rows * E, (rows + EXTRA) * E, `pass ${p}: mask past rows`);
      assertSentinel(got[`gate${p}`]!, rows, rows + EXTRA, `pass ${p}: gate past rows`);
      for (let r = 0; r < rows; r++) for (let e = 0; e < E; e++) covered[r]![e]! += got[`gate${p}`]![r]! * mask[r * E + e]!;
    }
    // The per_ffn sum over kept experts is the sum over the passes: sum_p g_p mask_p = h, exactly.
    gates.forEach((h, r) => assert.equal(Array.from(covered[r]!), Array.from(h), `row ${r}: the passes' gates are the row's`));
    assert.equal(Array.from(got[`mask${K}`]!.subarray(0, rows * E)), new Array(rows * E).fill(0), `pass ${K}: no row keeps ${K + 1} experts`);
    const counts = gates.map((h) => keptOf(h).length);
    assert.ok(counts.includes(0) && (K === 1 || counts.includes(K - 1)) && counts.includes(K), "rows keeping none, fewer and K");
  });
}

test("moe_ffn_pass refuses expert counts out of range", () => {
  assert.throws(() => moeFfnPassKernel({ experts: 0 }), /experts must be an integer from 1 to 64/);
  assert.throws(() => moeFfnPassKernel({ experts: 65 }), /experts must be an integer from 1 to 64/);
});

// ---------------------------------------------------------------------------------------------------
// moe_ffn_mix

for (const { c, width } of [
  { c: { E: 4, K: 2, renormalize: true, rows: 70 }, width: 45 }, // 3150 values: 13 workgroups, the last partial
  { c: { E: 5, K: 3, renormalize: false, rows: 29 }, width: 301 },
  { c: { E: 8, K: 8, renormalize: false, rows: 9 }, width: 37 }, // dense: 8 passes
  { c: { E: 3, K: 1, renormalize: false, rows: 40 }, width: 1 },
] satisfies { c: Routing; width: number }[]) {
  test(`moe_ffn_mix over every pass (first stores, the others add), ${label(c)}, width ${width}: y = residual + sum_e h_e D_e within ${BOUND}; rows keeping none are the residual's bits; D_p NaN where the pass is not taken; elements past n unwritten`, async () => {
    const { K, rows } = c;
    const n = rows * width;
    const { gates } = routeRecord(c);
    const passes = Array.from({ length: K }, (_, p) => passOf(gates, p));
    const residual = rowsOf(rows, width, 2);
    const data: Record<string, Float32Array> = { residual, y: nanFilled(n + EXTRA) };
    passes.forEach(({ expert, gate }, p) => {
      const x = rowsOf(rows, width, 3);
      expert.forEach((e, r) => {
        if (e === undefined) x.fill(NaN, r * width, (r + 1) * width);
      });
      Object.assign(data, { [`x${p}`]: x, [`g${p}`]: Float32Array.from([...gate, ...past(EXTRA)]) });
    });
    const mix = moeFfnMixKernel({ width });
    const got = (await runSteps(gpu, data, passes.map((_, p) => [mix, { x: `x${p}`, gate: `g${p}` }, { n, first: p === 0 ? 1 : 0 }] as const), ["y"])).y!;
    const want = Array.from({ length: n }, (_, i) => {
      const r = Math.floor(i / width);
      let y = residual[i]!;
      passes.forEach(({ gate }, p) => {
        if (gate[r] !== 0) y += gate[r]! * data[`x${p}`]![i]!;
      });
      return y;
    });
    const error = relativeError(got.subarray(0, n), want);
    for (let r = 0; r < rows; r++)
      if (keptOf(gates[r]!).length === 0) assert.ok(bitDiff(got.subarray(r * width, (r + 1) * width), residual.subarray(r * width, (r + 1) * width)) < 0, `row ${r} keeps no expert: y is the residual`);
    assertSentinel(got, n, n + EXTRA, "y past n");
    console.log(`moe_ffn_mix ${label(c)}, width ${width}: ${error.toExponential(1)}`);
    assert.ok(error < BOUND, `relative error ${error} >= ${BOUND}`);
  });
}

test("moe_ffn_mix of one pass: first = 1 ignores what y held, first = 0 adds to it; gate 0 keeps y's bits", async () => {
  const width = 19;
  const rows = 13;
  const n = rows * width;
  const gate = Float32Array.from({ length: rows + EXTRA }, (_, r) => (r % 4 === 1 ? 0 : 0.1 + random()));
  const x = rowsOf(rows, width, 3);
  for (let r = 0; r < rows; r++) if (gate[r] === 0) x.fill(NaN, r * width, (r + 1) * width);
  const residual = rowsOf(rows, width);
  const prior = Float32Array.from([...randomFloats(random, n, 5), ...nanFilled(EXTRA)]);
  const mix = moeFfnMixKernel({ width });
  for (const first of [1, 0]) {
    const got = (await runSteps(gpu, { x, residual, gate, y: prior.slice() }, [[mix, {}, { n, first }]], ["y"])).y!;
    const before = first ? residual : prior;
    const want = Array.from({ length: n }, (_, i) => (gate[Math.floor(i / width)] === 0 ? before[i]! : before[i]! + gate[Math.floor(i / width)]! * x[i]!));
    const error = relativeError(got.subarray(0, n), want);
    for (let r = 0; r < rows; r++)
      if (gate[r] === 0) assert.ok(bitDiff(got.subarray(r * width, (r + 1) * width), before.subarray(r * width, (r + 1) * width)) < 0, `first ${first}, row ${r}: gate 0 keeps ${first ? "the residual" : "y"}`);
    assertSentinel(got, n, n + EXTRA, `first ${first}: y past n`);
    assert.ok(error < BOUND, `first ${first}: relative error ${error}`);
  }
});

// ---------------------------------------------------------------------------------------------------
// moe_ffn_scale

test("moe_ffn_scale: out = g_p v bit for bit (one correctly rounded f32 product), 0 where the pass is not taken; widths 1, 37, 301 and odd row counts; elements past n unwritten", async () => {
  for (const { c, width } of [
    { c: { E: 4, K: 2, renormalize: true, rows: 70 }, width: 37 },
    { c: { E: 8, K: 3, renormalize: false, rows: 9 }, width: 301 },
    { c: { E: 2, K: 1, renormalize: false, rows: 300 }, width: 1 },
  ] satisfies { c: Routing; width: number }[]) {
    const { rows } = c;
    const n = rows * width;
    const { gates } = routeRecord(c);
    for (const p of [0, c.K - 1]) {
      const { gate } = passOf(gates, p);
      const v = rowsOf(rows, width, 4);
      const got = (await runSteps(gpu, { v, gate: Float32Array.from([...gate, ...past(EXTRA)]), out: nanFilled(n + EXTRA) }, [[moeFfnScaleKernel({ width }), {}, { n }]], ["out"])).out!;
      const want = Array.from({ length: n }, (_, i) => Math.fround(gate[Math.floor(i / width)]! * v[i]!));
      const at = bitDiff(got.subarray(0, n), want);
      assert.ok(at < 0, `${label(c)}, width ${width}, pass ${p}: element ${at}: ${got[at]}, want ${want[at]}`);
      for (let r = 0; r < rows; r++) if (gate[r] === 0) assert.ok(got.subarray(r * width, (r + 1) * width).every((x) => x === 0), `row ${r} not in pass ${p}: 0`);
      assertSentinel(got, n, n + EXTRA, "out past n");
    }
  }
  assert.throws(() => moeFfnScaleKernel({ width: 0 }), /width 0/);
  assert.throws(() => moeFfnMixKernel({ width: 2.5 }), /width 2.5/);
});

// ---------------------------------------------------------------------------------------------------
// moe_ffn_gate_grad

interface GateGradCase {
  readonly c: Routing;
  readonly width: number;
  readonly lora: boolean;
}

for (const { c, width, lora } of [
  { c: { E: 3, K: 2, renormalize: true, rows: 70 }, width: 37, lora: true }, // fewer columns than lanes
  { c: { E: 8, K: 3, renormalize: false, rows: 33 }, width: 301, lora: false }, // five strides, the last partial
  { c: { E: 13, K: 4, renormalize: true, rows: 20 }, width: 64, lora: true },
  { c: { E: 2, K: 2, renormalize: false, rows: 7 }, width: 1000, lora: true }, // dense
  { c: { E: 1, K: 1, renormalize: true, rows: 12 }, width: 1, lora: false },
] satisfies GateGradCase[]) {
  test(`moe_ffn_gate_grad, ${label(c)}, width ${width}${lora ? ", with the down LoRA's part" : ", no down LoRA"}: dGates[r, e_p] = v . H_p${lora ? " + lora" : ""} within ${BOUND} for every pass; other columns, rows without a pass expert and rows past \`rows\` unwritten`, async () => {
    const { E, K, rows } = c;
    const { gates } = routeRecord(c);
    const k = moeFfnGateGradKernel({ width, experts: E, lora });
    assert.equal(k.bindings.map((b) => b.name), ["v", "h", "mask", ...(lora ? ["lora"] : []), "dGates", "params"]);
    const got: number[] = [];
    const want: number[] = [];
    for (let p = 0; p < K; p++) {
      const { expert } = passOf(gates, p);
      const v = rowsOf(rows, width, 2);
      const h = rowsOf(rows, width, 2);
      const loraPart = rowsOf(rows, 1, 3);
      // Rows without a pass expert: their v, H_p and lora part never reach dGates.
      expert.forEach((e, r) => {
        if (e === undefined) for (const [x, w] of [[v, width], [h, width], [loraPart, 1]] as const) x.fill(NaN, r * w, (r + 1) * w);
      });
      const data = { v, h, mask: maskOf(expert, E), ...(lora ? { lora: loraPart } : {}), dGates: nanFilled((rows + EXTRA) * E) };
      const dGates = (await runSteps(gpu, data, [[k, {}, { rows }]], ["dGates"])).dGates!;
      for (let r = 0; r < rows + EXTRA; r++)
        for (let e = 0; e < E; e++) {
          const at = r * E + e;
          if (r < rows && e === expert[r]) {
            let dot = 0;
            for (let i = 0; i < width; i++) dot += v[r * width + i]! * h[r * width + i]!;
            got.push(dGates[at]!);
            want.push(dot + (lora ? loraPart[r]! : 0));
          } else if (bitsOf(dGates[at]!) !== NAN_BITS) assert.unreachable(`pass ${p}: dGates[${r}, ${e}] written (${dGates[at]}): ${r >= rows ? "past rows" : expert[r] === undefined ? "no pass expert" : "not the pass expert"}`);
        }
    }
    const error = relativeError(got, want);
    console.log(`moe_ffn_gate_grad ${label(c)}, width ${width}: ${error.toExponential(1)} over ${got.length} gate gradients`);
    assert.ok(got.length > 0 && error < BOUND, `relative error ${error} >= ${BOUND}`);
  });
}

test("moe_ffn_gate_grad refuses a width or expert count out of range", () => {
  assert.throws(() => moeFfnGateGradKernel({ width: 0, experts: 4, lora: false }), /width 0/);
  assert.throws(() => moeFfnGateGradKernel({ width: 8, experts: 65, lora: true }), /experts must be an integer from 1 to 64/);
});

// ---------------------------------------------------------------------------------------------------
// swiglu_backward_sum

const sigmoid = (g: number) => 1 / (1 + Math.exp(-g));
const silu = (g: number) => g * sigmoid(g);
/** silu'(g) = s (1 + g (1 - s)). */
const siluGrad = (g: number) => sigmoid(g) * (1 + g * (1 - sigmoid(g)));

/** float64 SwiGLU backward of one element: act = silu(g) u. */
const swigluGrads = (g: number, u: number, d: number) => ({ dG: d * u * siluGrad(g), dU: d * silu(g) });

test("the float64 silu' is the central difference of silu (g in [-30, 30], the root near -1.278 included)", () => {
  for (const g of [-30, -12.5, -4, -1.2785, -1, -1e-4, 0, 1e-4, 0.5, 3, 12.5, 30]) {
    const eps = 1e-5;
    const fd = (silu(g + eps) - silu(g - eps)) / (2 * eps);
    assert.ok(Math.abs(fd - siluGrad(g)) < 1e-8, `silu'(${g}): ${siluGrad(g)} vs ${fd}`);
  }
});

for (const { passes, rows, width } of [
  { passes: 3, rows: 37, width: 45 }, // 1665 values: 7 workgroups, the last partial
  { passes: 1, rows: 1, width: 7 },
  { passes: 8, rows: 5, width: 301 },
]) {
  test(`swiglu_backward_sum over ${passes} pass${passes > 1 ? "es" : ""} (${rows} rows x ${width}): each pass's dG, dU and the passes' sums against float64 within ${BOUND} (each pass's elements too, |g| up to 30); a pass not taken adds exactly 0; elements past n unwritten`, async () => {
    const n = rows * width;
    // Rows of each pass not taken (gate 0): their d(H_p) is g_p v = 0.
    const taken = Array.from({ length: passes }, (_, p) => Array.from({ length: rows }, (_, r) => (rows === 1 ? true : (r + p) % 3 !== 0)));
    const inputs = taken.map((t) => {
      const gate = Float32Array.from([...randomFloats(random, n, 6), ...past(EXTRA)]);
      gate.set([30, -30, 12.5, -12.5, 0, 1e-4, -1e-4].slice(0, n), 0);
      const up = rowsOf(n, 1, 2);
      const dAct = rowsOf(n, 1, 2);
      for (let r = 0; r < rows; r++) if (!t[r]) dAct.fill(0, r * width, (r + 1) * width);
      return { gate, up, dAct };
    });
    const data: Record<string, Float32Array> = { sumGate: nanFilled(n + EXTRA), sumUp: nanFilled(n + EXTRA) };
    inputs.forEach((x, p) => Object.assign(data, { [`gate${p}`]: x.gate, [`up${p}`]: x.up, [`dAct${p}`]: x.dAct, [`dGate${p}`]: nanFilled(n + EXTRA), [`dUp${p}`]: nanFilled(n + EXTRA) }));
    const k = swigluBackwardSumKernel();
    const names = (p: number) => ({ gate: `gate${p}`, up: `up${p}`, dAct: `dAct${p}`, dGate: `dGate${p}`, dUp: `dUp${p}` });
    const got = await runSteps(
      gpu,
      data,
      inputs.map((_, p) => [k, names(p), { n, first: p === 0 ? 1 : 0 }] as const),
      ["sumGate", "sumUp", ...inputs.flatMap((_, p) => [`dGate${p}`, `dUp${p}`])],
    );
    const sumG = new Float64Array(n);
    const sumU = new Float64Array(n);
    const errors: Record<string, number> = { dG: 0, dU: 0, dGElement: 0, dUElement: 0 };
    inputs.forEach(({ gate, up, dAct }, p) => {
      const dG = new Float64Array(n);
      const dU = new Float64Array(n);
      for (let i = 0; i < n; i++) {
        const w = swigluGrads(gate[i]!, up[i]!, dAct[i]!);
        dG[i] = w.dG;
        dU[i] = w.dU;
        sumG[i]! += w.dG;
        sumU[i]! += w.dU;
        // Each element against the size of its terms (dG's cancel at silu's root).
        const s = sigmoid(gate[i]!);
        const gSize = Math.abs(dAct[i]! * up[i]!) * s * (1 + Math.abs(gate[i]!) * (1 - s));
        if (dAct[i] !== 0) {
          errors.dGElement = Math.max(errors.dGElement!, Math.abs(got[`dGate${p}`]![i]! - w.dG) / gSize);
          errors.dUElement = Math.max(errors.dUElement!, Math.abs(got[`dUp${p}`]![i]! - w.dU) / Math.max(Math.abs(w.dU), 1e-30));
        } else if (got[`dGate${p}`]![i] !== 0 || got[`dUp${p}`]![i] !== 0) assert.unreachable(`pass ${p}, element ${i} not taken: dG ${got[`dGate${p}`]![i]}, dU ${got[`dUp${p}`]![i]}, want 0`);
      }
      errors.dG = Math.max(errors.dG!, relativeError(got[`dGate${p}`]!.subarray(0, n), dG));
      errors.dU = Math.max(errors.dU!, relativeError(got[`dUp${p}`]!.subarray(0, n), dU));
      assertSentinel(got[`dGate${p}`]!, n, n + EXTRA, `pass ${p}: dGate past n`);
      assertSentinel(got[`dUp${p}`]!, n, n + EXTRA, `pass ${p}: dUp past n`);
    });
    errors.sumGate = relativeError(got.sumGate!.subarray(0, n), sumG);
    errors.sumUp = relativeError(got.sumUp!.subarray(0, n), sumU);
    for (const s of ["sumGate", "sumUp"]) assertSentinel(got[s]!, n, n + EXTRA, `${s} past n`);
    // Elements no pass takes: the sums are exactly 0.
    for (let r = 0; r < rows; r++)
      if (taken.every((t) => !t[r])) for (const s of ["sumGate", "sumUp"]) assert.ok(got[s]!.subarray(r * width, (r + 1) * width).every((x) => x === 0), `row ${r}: no pass, ${s} 0`);
    console.log(`swiglu_backward_sum ${passes} passes, ${n} values: ${Object.entries(errors).map(([key, v]) => `${key} ${v.toExponential(1)}`).join(", ")}`);
    for (const [key, v] of Object.entries(errors)) assert.ok(v < BOUND, `${key}: relative error ${v} >= ${BOUND}`);
  });
}

test("swiglu_backward_sum's bindings and params are the graph's", () => {
  const k = swigluBackwardSumKernel();
  assert.equal(k.bindings.map((b) => `${b.name}:${b.access}`), ["gate:read", "up:read", "dAct:read", "dGate:read_write", "dUp:read_write", "sumGate:read_write", "sumUp:read_write", "params:uniform"]);
  assert.equal(k.params.map((p) => p.name), ["n", "first"]);
});

// ---------------------------------------------------------------------------------------------------
// One routed layer's passes, in the graph's order

test("one per_ffn layer's passes as runtime/training/graph.ts runs them (moe_ffn_pass, moe_ffn_mix; moe_ffn_pass, moe_ffn_scale, the rank-gated down lora_backward_input, moe_ffn_gate_grad, swiglu_backward_sum), 5 experts of rank 2, top 3 renormalised, odd sizes: y = h + sum_e h_e D_e, dg_e = dy . D_e, sum_e dG_e and dU_e from the per-expert math within 1e-5", async () => {
  const E = 5;
  const r = 2;
  const R = E * r;
  const c: Routing = { E, K: 3, renormalize: true, rows: 29 };
  const { rows, K } = c;
  const HID = 21;
  const I = 45;
  const s = 1.5;
  const { record, gates } = routeRecord(c);
  // Each row's per-expert G_e, U_e (what Wg u + s Bg_e Ag_e u and Wu u + ... give), and the base
  // products' rows (G_p, U_p of a pass with no expert).
  const G = Array.from({ length: rows }, () => Array.from({ length: E + 1 }, () => randomFloats(random, I, 3)));
  const U = Array.from({ length: rows }, () => Array.from({ length: E + 1 }, () => randomFloats(random, I, 2)));
  const wd = randomFloats(random, HID * I, 1 / Math.sqrt(I));
  const ad = randomFloats(random, R * I, 1 / Math.sqrt(I));
  const bd = randomFloats(random, HID * R, 0.5);
  const dy = rowsOf(rows, HID);
  const residual = rowsOf(rows, HID);
  const h64 = (row: number, e: number) => Array.from(G[row]![e]!, (g, i) => silu(g) * U[row]![e]![i]!);
  const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => Array.from(a).reduce((sum, v, i) => sum + v * b[i]!, 0);
  const ranksOf = (e: number) => Array.from({ length: r }, (_, j) => e * r + j);
  // The f32 inputs the pass's other kernels leave: v = dy Wd (once per layer); per pass G_p, U_p, H_p,
  // t = Ad H_p (all E r ranks, the down shrink), D_p = Wd H_p + s Bd (mask * t).
  const v = rowsOf(rows, I);
  for (let row = 0; row < rows; row++) for (let i = 0; i < I; i++) v[row * I + i] = Array.from({ length: HID }, (_, o) => dy[row * HID + o]! * wd[o * I + i]!).reduce((a, b) => a + b, 0);
  const data: Record<string, Float32Array | Uint32Array> = {
    route: record, residual, dy, v, a: ad, b: bd,
    slots: new Uint32Array(packLoraSlots([{ rank: R, scaling: s }]).buffer),
    rowAdapter: new Uint32Array(rows + EXTRA), // every row uses slot 0, as the graph's
    y: nanFilled((rows + EXTRA) * HID), mask: nanFilled((rows + EXTRA) * E), passGate: nanFilled(rows + EXTRA),
    dAct: nanFilled((rows + EXTRA) * I), dt: nanFilled((rows + EXTRA) * R), loraGate: nanFilled(rows + EXTRA), dExpertGates: nanFilled((rows + EXTRA) * E),
    dGates: nanFilled((rows + EXTRA) * E), dGate: nanFilled((rows + EXTRA) * I), dUp: nanFilled((rows + EXTRA) * I), sumGate: nanFilled((rows + EXTRA) * I), sumUp: nanFilled((rows + EXTRA) * I),
  };
  for (let p = 0; p < K; p++) {
    const { expert } = passOf(gates, p);
    const [gp, up, hp, t, d] = [rowsOf(rows, I), rowsOf(rows, I), rowsOf(rows, I), rowsOf(rows, R), rowsOf(rows, HID)];
    expert.forEach((e, row) => {
      const at = e ?? E;
      gp.set(G[row]![at]!, row * I);
      up.set(U[row]![at]!, row * I);
      hp.set(h64(row, at), row * I);
      const hRow = hp.subarray(row * I, (row + 1) * I);
      for (let j = 0; j < R; j++) t[row * R + j] = dot(ad.subarray(j * I, (j + 1) * I), hRow);
      for (let o = 0; o < HID; o++) {
        let lora = 0;
        if (e !== undefined) for (const j of ranksOf(e)) lora += bd[o * R + j]! * t[row * R + j]!;
        d[row * HID + o] = e === undefined ? NaN : dot(wd.subarray(o * I, (o + 1) * I), hRow) + s * lora;
      }
    });
    Object.assign(data, { [`G${p}`]: gp, [`U${p}`]: up, [`H${p}`]: hp, [`t${p}`]: t, [`D${p}`]: d });
  }
  const pass = moeFfnPassKernel({ experts: E });
  const steps = [
    ...Array.from({ length: K }, (_, p) => [
      [pass, { gate: "passGate" }, { rows, ffnPass: p }] as const,
      [moeFfnMixKernel({ width: HID }), { x: `D${p}`, gate: "passGate" }, { n: rows * HID, first: p === 0 ? 1 : 0 }] as const,
    ]).flat(),
    ...Array.from({ length: K }, (_, p) => [
      [pass, { gate: "passGate" }, { rows, ffnPass: p }] as const,
      [moeFfnScaleKernel({ width: I }), { gate: "passGate", out: "dAct" }, { n: rows * I }] as const,
      [
        loraBackwardInputKernel({ inFeatures: I, outFeatures: HID, maxRank: R, experts: E }),
        { t: `t${p}`, gates: "passGate", expertGates: "mask", dGates: "loraGate", dx: "dAct" },
        { rows, gateStride: 1, gateIndex: 0, slot: 0, expertStride: E, expertOffset: 0 },
      ] as const,
      [moeFfnGateGradKernel({ width: I, experts: E, lora: true }), { h: `H${p}`, lora: "loraGate" }, { rows }] as const,
      [swigluBackwardSumKernel(), { gate: `G${p}`, up: `U${p}` }, { n: rows * I, first: p === 0 ? 1 : 0 }] as const,
    ]).flat(),
  ];
  const got = await runSteps(gpu, data, steps, ["y", "dGates", "sumGate", "sumUp"]);

  // float64, per expert, no passes.
  const want = { y: [] as number[], dGates: [] as number[], sumGate: new Float64Array(rows * I), sumUp: new Float64Array(rows * I) };
  const gotGates: number[] = [];
  for (let row = 0; row < rows; row++) {
    const kept = keptOf(gates[row]!);
    const y = Array.from(residual.subarray(row * HID, (row + 1) * HID));
    for (let e = 0; e < E; e++) {
      const at = row * E + e;
      if (!kept.includes(e)) {
        if (bitsOf(got.dGates![at]!) !== NAN_BITS) assert.unreachable(`dGates[${row}, ${e}] written (${got.dGates![at]}) for an expert the row does not keep`);
        continue;
      }
      const g = gates[row]![e]!;
      const H = h64(row, e);
      const t = ranksOf(e).map((j) => dot(ad.subarray(j * I, (j + 1) * I), H));
      const D = Array.from({ length: HID }, (_, o) => dot(wd.subarray(o * I, (o + 1) * I), H) + s * ranksOf(e).reduce((sum, j, q) => sum + bd[o * R + j]! * t[q]!, 0));
      D.forEach((value, o) => (y[o]! += g * value));
      want.dGates.push(dot(dy.subarray(row * HID, (row + 1) * HID), D));
      gotGates.push(got.dGates![at]!);
      // d(H_e) = h_e (Wd^T dy + s Ad_e^T Bd_e^T dy), then the GLU.
      const bTdy = ranksOf(e).map((j) => Array.from({ length: HID }, (_, o) => bd[o * R + j]! * dy[row * HID + o]!).reduce((a, b) => a + b, 0));
      for (let i = 0; i < I; i++) {
        let dH = 0;
        for (let o = 0; o < HID; o++) dH += wd[o * I + i]! * dy[row * HID + o]!;
        ranksOf(e).forEach((j, q) => (dH += s * ad[j * I + i]! * bTdy[q]!));
        const w = swigluGrads(G[row]![e]![i]!, U[row]![e]![i]!, g * dH);
        want.sumGate[row * I + i]! += w.dG;
        want.sumUp[row * I + i]! += w.dU;
      }
    }
    want.y.push(...y);
  }
  const errors = {
    y: relativeError(got.y!.subarray(0, rows * HID), want.y),
    dGates: relativeError(gotGates, want.dGates),
    sumGate: relativeError(got.sumGate!.subarray(0, rows * I), want.sumGate),
    sumUp: relativeError(got.sumUp!.subarray(0, rows * I), want.sumUp),
  };
  assertSentinel(got.y!, rows * HID, (rows + EXTRA) * HID, "y past rows");
  assertSentinel(got.dGates!, rows * E, (rows + EXTRA) * E, "dGates past rows");
  for (const k of ["sumGate", "sumUp"]) assertSentinel(got[k]!, rows * I, (rows + EXTRA) * I, `${k} past rows`);
  for (let row = 0; row < rows; row++)
    if (keepsNone(row)) for (const k of ["sumGate", "sumUp"]) assert.ok(got[k]!.subarray(row * I, (row + 1) * I).every((x) => x === 0), `row ${row} keeps none: ${k} 0`);
  console.log(`graph order, ${label(c)}: ${Object.entries(errors).map(([k, e]) => `${k} ${e.toExponential(1)}`).join(", ")} (${gotGates.length} gate gradients)`);
  for (const [k, e] of Object.entries(errors)) assert.ok(e < BOUND, `${k}: relative error ${e} >= ${BOUND}`);
});

test.after(() => gpu.context.destroy());
test.run();
