// The training router kernels (router-train.ts, router-train-backward.ts) against the float64 tape
// reference (test/reference/router-train.ts): forward (pooled, attention weights, probabilities, gates,
// the gate table), the balance loss and its gradient, and the backward (dx added into the residual
// gradient, dW_r, d w_sa, the rational coefficients). Packed batches of 5 sequences (rows 5, 1, 70, 12,
// 8; prompts 1, 1, 66, 12, 3: a one-row prompt, a one-row sequence, a prompt longer than the 64 lanes, a
// prompt without completion), H = 300, or every one of the 96 rows for token routing.
// Bound: relative L2 error < 1e-5 per output against float64 on the f32 inputs. Every quantity is a
// handful of f32 sums (over H = 300 columns, at most 70 prompt rows, 96 decisions) and exp/log, each
// ~sqrt(n) * 2^-24 relative; gelu's erf is good to 2e-7 absolute (checked below on its own).
// Outputs start as NaN; gate-table columns of other layers, dx outside the router's rows and dGates of
// unchosen experts (NaN) must not change or leak. A second run must be bit-identical (no atomics), and
// gelu's f32 erf is measured on its own over [-12, 12] (bounds in that test).
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { KernelSource } from "../../../compiler/kernels/kernel.ts";
import { routerScratchLength, routerTrainBackwardKernel, routerTrainGradKernel } from "../../../compiler/kernels/router-train-backward.ts";
import {
  routerActivationWgsl,
  routerBalanceKernel,
  routerSpans,
  routerTrainForwardKernel,
  routerTrainShape,
  type RouterTrainConstants,
} from "../../../compiler/kernels/router-train.ts";
import { kernelSource } from "../../../compiler/kernels/wgsl.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { geluDerivative, routerTrainReference } from "../../reference/router-train.ts";
import { openGpu, randomFloats, relativeError, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const BOUND = 1e-5;
const H = 300;
const LENGTHS = [5, 1, 70, 12, 8];
const PROMPTS = [1, 1, 66, 12, 3];
const ROWS = LENGTHS.reduce((a, b) => a + b, 0);
// The gate table of a 3-layer step: this layer's experts from column 9 on, other columns other layers'.
const GATE_STRIDE = 21;
const GATE_INDEX0 = 9;
const LOSS_INDEX = 2;
// An approximate GELU fit, perturbed so that Q changes sign on the inputs' range.
const NUMERATOR = [0.00003, 0.5, 0.3985, 0.1625, 0.0642, 0.0184, 0.0021];
const DENOMINATOR = [0.3, 0.325, -0.05, 0.0367, 0.01];

interface Case extends RouterTrainConstants {
  readonly seed: number;
  /** balance / routed layers; 0 runs no balance kernel. */
  readonly balanceCoef?: number;
  readonly accumulate?: boolean;
}

function bind(k: KernelSource, all: Record<string, GPUBuffer>): Record<string, GPUBuffer> {
  return Object.fromEntries(k.bindings.filter((b) => b.access !== "uniform").map((b) => [b.name, all[b.name]!]));
}

function inputs(c: Case) {
  const random = seeded(c.seed);
  const N = c.experts;
  const spans = routerSpans(LENGTHS, PROMPTS);
  // Rows of a sequence share a base vector, so pooled vectors differ between sequences.
  const x = new Float32Array(ROWS * H);
  LENGTHS.forEach((_, s) => {
    const base = randomFloats(random, H);
    for (let r = spans[3 * s]!; r < spans[3 * s + 2]!; r++)
      for (let h = 0; h < H; h++) {
        const v = 0.8 * base[h]! + 0.6 * (random() * 2 - 1);
        // Max pooling: values on a grid of 1/4, so columns hold ties (the first row must win).
        x[r * H + h] = c.pooling === "max" && c.when === "prompt" ? Math.round(v * 4) / 4 : v;
      }
  });
  const orders = c.rational ?? { numerator: 6, denominator: 5 };
  return {
    spans,
    x,
    weight: randomFloats(random, N * H, 5 / Math.sqrt(H)),
    pooler: randomFloats(random, H, 0.2),
    rational: Float32Array.from([...NUMERATOR.slice(0, orders.numerator + 1), ...DENOMINATOR.slice(0, orders.denominator)]),
    table: randomFloats(random, ROWS * GATE_STRIDE),
    dGates: randomFloats(random, ROWS * GATE_STRIDE),
    random,
  };
}

async function read(buffers: Record<string, GPUBuffer>, names: readonly string[]): Promise<Record<string, Float32Array>> {
  const out: Record<string, Float32Array> = {};
  for (const name of names) out[name] = await readBuffer(gpu.device, buffers[name]!);
  return out;
}

async function check(name: string, c: Case) {
  const N = c.experts;
  const { coefficients } = routerTrainShape(c);
  const data = inputs(c);
  const D = c.when === "prompt" ? LENGTHS.length : ROWS;
  const coef = c.balanceCoef ?? 0.3;
  const tableBefore = data.table.slice();
  for (let r = 0; r < ROWS; r++) for (let e = 0; e < N; e++) data.table[r * GATE_STRIDE + GATE_INDEX0 + e] = NaN;
  const device = gpu.device;
  device.pushErrorScope("validation");
  const make = (values: Float32Array | Uint32Array | number, label: string) => createStorage(device, values, label);
  const nan = (n: number) => new Float32Array(Math.max(n, 1)).fill(NaN);
  const b: Record<string, GPUBuffer> = {
    x: make(data.x, "x"),
    spans: make(data.spans, "spans"),
    weight: make(data.weight, "weight"),
    pooler: make(data.pooler, "pooler"),
    rational: make(data.rational, "rational"),
    pooled: make(nan(D * H), "pooled"),
    attn: make(nan(ROWS), "attn"),
    route: make(nan(3 * D * N), "route"),
    table: make(data.table, "table"),
    loss: make(nan(4), "loss"),
  };
  const forward = routerTrainForwardKernel(c);
  const gateParams = { decisions: D, gateStride: GATE_STRIDE, gateIndex0: GATE_INDEX0 };
  gpu.step.dispatch(forward, bind(forward, b), gateParams);
  if (coef !== 0) {
    const balance = routerBalanceKernel(c);
    gpu.step.dispatch(balance, bind(balance, b), { decisions: D, lossIndex: LOSS_INDEX, coef });
  }
  gpu.step.submit();
  const fwd = await read(b, ["pooled", "attn", "route", "table", "loss"]);

  // Upstream gate gradients: random where the expert was chosen, NaN where not (never to be read).
  const dGates = data.dGates;
  for (let r = 0; r < ROWS; r++)
    for (let e = 0; e < N; e++) if (fwd.table![r * GATE_STRIDE + GATE_INDEX0 + e] === 0) dGates[r * GATE_STRIDE + GATE_INDEX0 + e] = NaN;

  const want = routerTrainReference({
    ...c,
    x: data.x,
    spans: LENGTHS.map((_, s) => [data.spans[3 * s]!, data.spans[3 * s + 1]!, data.spans[3 * s + 2]!] as const),
    weight: data.weight,
    ...(c.when === "prompt" && c.pooling === "attention" ? { pooler: data.pooler } : {}),
    ...(c.activation === "rational"
      ? { numerator: data.rational.slice(0, (c.rational?.numerator ?? 6) + 1), denominator: data.rational.slice((c.rational?.numerator ?? 6) + 1) }
      : {}),
    dGate: (row, e) => dGates[row * GATE_STRIDE + GATE_INDEX0 + e]!,
    balanceCoef: coef,
  });

  // dx holds other gradients already, at the scale of the router's.
  const rms = Math.sqrt(want.dx.reduce((s, v) => s + v * v, 0) / want.dx.length) || 1;
  const dx0 = randomFloats(data.random, ROWS * H, rms);
  const accumulate = c.accumulate ?? false;
  const prior = (n: number) => (accumulate ? randomFloats(data.random, n) : nan(n));
  const dWeight0 = prior(N * H);
  const dPooler0 = prior(H);
  const dRational0 = prior(coefficients);
  Object.assign(b, {
    dGates: make(dGates, "dGates"),
    scratch: make(nan(routerScratchLength(c, D, ROWS)), "scratch"),
    dx: make(dx0, "dx"),
    dWeight: make(dWeight0, "dWeight"),
    dPooler: make(dPooler0, "dPooler"),
    dRational: make(dRational0, "dRational"),
  });
  const backward = routerTrainBackwardKernel(c);
  const grad = routerTrainGradKernel({ ...c, accumulate });
  gpu.step.dispatch(backward, bind(backward, b), gateParams);
  gpu.step.dispatch(grad, bind(grad, b), { decisions: D });
  gpu.step.submit();
  const bwd = await read(b, ["dx", "dWeight", "dPooler", "dRational"]);
  const error = await device.popErrorScope();
  if (error) throw new Error(`${name}: ${error.message}`);
  for (const buffer of Object.values(b)) buffer.destroy();

  const errors: Record<string, number> = {};
  // Forward: the saved record and the gate table.
  const decisionOf = (r: number) => (c.when === "token" ? r : LENGTHS.findIndex((_, s) => r >= data.spans[3 * s]! && r < data.spans[3 * s + 2]!));
  const probs = Array.from({ length: D * N }, (_, i) => fwd.route![Math.floor(i / N) * 3 * N + (i % N)]!);
  const gates = Array.from({ length: D * N }, (_, i) => fwd.route![Math.floor(i / N) * 3 * N + N + (i % N)]!);
  errors.probs = relativeError(probs, want.probs.flat());
  errors.gates = relativeError(gates, want.gates.flat());
  for (let i = 0; i < D * N; i++) assert.is(gates[i] === 0, want.gates.flat()[i] === 0, `${name}: the chosen experts of decision ${Math.floor(i / N)}`);
  const tableGot: number[] = [];
  const tableWant: number[] = [];
  for (let r = 0; r < ROWS; r++)
    for (let col = 0; col < GATE_STRIDE; col++) {
      const got = fwd.table![r * GATE_STRIDE + col]!;
      const e = col - GATE_INDEX0;
      if (e >= 0 && e < N) {
        tableGot.push(got);
        tableWant.push(want.gates[decisionOf(r)]![e]!);
      } else assert.ok(Object.is(got, tableBefore[r * GATE_STRIDE + col]), `${name}: table column ${col} of row ${r} is another layer's`);
    }
  errors.table = relativeError(tableGot, tableWant);
  if (c.when === "prompt") errors.pooled = relativeError(fwd.pooled!, want.pooled.flat());
  if (c.when === "prompt" && c.pooling === "attention") {
    const rowsIn = [...want.attention.keys()];
    errors.attn = relativeError(rowsIn.map((r) => fwd.attn![r]!), rowsIn.map((r) => want.attention.get(r)!));
  }
  if (coef !== 0) {
    errors.balanceLoss = relativeError([fwd.loss![LOSS_INDEX]!], [want.balanceLoss]);
    // The balance gradient on P: coef * N * f_i / D for every decision.
    const tops = want.probs.map((p) => p.indexOf(Math.max(...p)));
    const dP = Array.from({ length: D * N }, (_, i) => (coef * N * tops.filter((t) => t === i % N).length) / D / D);
    errors.balanceGrad = relativeError(
      Array.from({ length: D * N }, (_, i) => fwd.route![Math.floor(i / N) * 3 * N + 2 * N + (i % N)]!),
      dP,
    );
  }
  // Backward.
  errors.dx = relativeError(Array.from(bwd.dx!, (v, i) => v - dx0[i]!), want.dx);
  want.dx.forEach((g, i) => {
    if (g === 0) assert.ok(Object.is(bwd.dx![i], dx0[i]), `${name}: dx[${Math.floor(i / H)}, ${i % H}] has no router gradient but changed`);
  });
  const added = (got: Float32Array, before: Float32Array) => (accumulate ? Array.from(got, (v, i) => v - before[i]!) : got);
  errors.dWeight = relativeError(added(bwd.dWeight!, dWeight0), want.dWeight);
  if (want.dPooler) errors.dPooler = relativeError(added(bwd.dPooler!.subarray(0, H), dPooler0), want.dPooler);
  if (want.dNumerator)
    errors.dRational = relativeError(added(bwd.dRational!.subarray(0, coefficients), dRational0), [...want.dNumerator, ...want.dDenominator!]);
  const chosenCounts = want.gates.map((g) => g.filter((v) => v !== 0).length);
  console.log(`${name}: ${Object.entries(errors).map(([k, v]) => `${k} ${v.toExponential(1)}`).join(", ")}`);
  for (const [k, v] of Object.entries(errors)) assert.ok(v < BOUND, `${name}: ${k} relative error ${v} >= ${BOUND}`);
  return { chosenCounts, probs: want.probs, outputs: { ...fwd, ...bwd } };
}

const topK = (k: number) => ({ rule: "top_k", k }) as const;
const base = { hidden: H, experts: 5, when: "prompt", pooling: "mean", activation: "gelu", selection: topK(2), renormalize: false } as const;

for (const pooling of ["last", "mean", "max", "attention"] as const)
  test(`prompt routing, ${pooling} pooling, gelu, top-2`, async () => {
    await check(`${pooling}`, { ...base, pooling, seed: 11 });
  });

for (const activation of ["none", "relu", "rational"] as const)
  test(`prompt routing, attention pooling, ${activation}, top-2 of 7`, async () => {
    await check(`${activation}`, { ...base, experts: 7, pooling: "attention", activation, seed: 12 });
  });

test("rational of other orders (3, 2), mean pooling", async () => {
  await check("rational 3-2", { ...base, activation: "rational", rational: { numerator: 3, denominator: 2 }, seed: 13 });
});

test("top-2 renormalised, top-1 (paper), dense", async () => {
  await check("top-2 renormalize", { ...base, experts: 7, pooling: "attention", activation: "rational", renormalize: true, seed: 14 });
  await check("top-1", { ...base, selection: topK(1), seed: 15 });
  await check("dense", { ...base, pooling: "max", activation: "relu", selection: { rule: "dense" }, seed: 16 });
});

test("threshold, paper and renormalised (token routing: 96 decisions, some below the threshold)", async () => {
  for (const renormalize of [false, true]) {
    const { chosenCounts, probs } = await check(`threshold 0.3${renormalize ? " renormalize" : ""}`, {
      ...base,
      when: "token",
      selection: { rule: "threshold", threshold: 0.3 },
      renormalize,
      seed: 17,
    });
    // Both branches occur: a fallback to the top-1 (no P reaches 0.3) and several kept experts.
    assert.ok(probs.some((p) => Math.max(...p) < 0.3), "some decision falls back to its top-1");
    assert.ok(chosenCounts.some((n) => n >= 2), "some decision keeps several experts");
  }
});

test("token routing: gelu top-2, rational top-3 renormalised", async () => {
  await check("token gelu", { ...base, when: "token", seed: 18 });
  await check("token rational", { ...base, experts: 7, when: "token", activation: "rational", selection: topK(3), renormalize: true, seed: 19 });
});

test("without the balance loss; accumulating parameter gradients", async () => {
  await check("no balance", { ...base, pooling: "attention", balanceCoef: 0, seed: 20 });
  await check("accumulate", { ...base, pooling: "attention", activation: "rational", accumulate: true, seed: 21 });
});

test("deterministic: a second run is bit-identical", async () => {
  const c = { ...base, experts: 7, pooling: "attention", activation: "rational", seed: 22 } as const;
  const first = (await check("run 1", c)).outputs;
  const second = (await check("run 2", c)).outputs;
  for (const [name, values] of Object.entries(first)) {
    const a = new Uint32Array(values.buffer);
    const b = new Uint32Array(second[name]!.buffer);
    assert.ok(a.length === b.length && a.every((v, i) => v === b[i]), `${name} differs between runs`);
  }
});

test("gelu in f32: the erf/erfc evaluation against float64 on [-12, 12]", async () => {
  const xs = Float32Array.from({ length: 24001 }, (_, i) => -12 + i * 0.001);
  const k = kernelSource({
    name: "gelu_probe",
    constants: {},
    storage: [
      { name: "xs", access: "read", type: "array<f32>" },
      { name: "value", access: "read_write", type: "array<f32>" },
      { name: "slope", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "count", type: "u32" }],
    body: `${routerActivationWgsl("gelu")}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  if (id.x >= params.count) { return; }
  value[id.x] = act(xs[id.x]);
  slope[id.x] = act_grad(xs[id.x]);
}`,
    dispatch: { groups: [{ param: "count", per: 64 }, 1, 1] },
  });
  const device = gpu.device;
  const b = { xs: createStorage(device, xs, "xs"), value: createStorage(device, xs.byteLength, "value"), slope: createStorage(device, xs.byteLength, "slope") };
  gpu.step.dispatch(k, b, { count: xs.length });
  gpu.step.submit();
  const value = await readBuffer(device, b.value);
  const slope = await readBuffer(device, b.slope);
  // float64 Phi: the series of milora.ts's erf near 0, Laplace's continued fraction (200 levels) beyond.
  const phi = (x: number) => {
    const z = Math.abs(x) / Math.SQRT2;
    let erfc: number;
    if (z < 2) {
      let term = z;
      let sum = z;
      for (let n = 1; Math.abs(term) > 1e-17 * sum; n++) sum += term *= (2 * z * z) / (2 * n + 1);
      erfc = 1 - (2 / Math.sqrt(Math.PI)) * Math.exp(-z * z) * sum;
    } else {
      let f = z;
      for (let k = 200; k >= 1; k--) f = z + k / 2 / f;
      erfc = Math.exp(-z * z) / (Math.sqrt(Math.PI) * f);
    }
    return x > 0 ? 1 - erfc / 2 : erfc / 2;
  };
  let absolute = 0; // |g - gelu| / (1 + |x|)
  let tail = 0; // relative, x in [-8, -1]
  let derivative = 0;
  xs.forEach((x, i) => {
    const g = x * phi(x);
    absolute = Math.max(absolute, Math.abs(value[i]! - g) / (1 + Math.abs(x)));
    if (x >= -8 && x <= -1) tail = Math.max(tail, Math.abs(value[i]! - g) / Math.abs(g));
    derivative = Math.max(derivative, Math.abs(slope[i]! - (Math.abs(x) < 8 ? geluDerivative(x) : phi(x) + (x * Math.exp(-x * x / 2)) / Math.sqrt(2 * Math.PI))));
  });
  console.log(`gelu f32: |error| / (1 + |x|) ${absolute.toExponential(2)}, relative on [-8, -1] ${tail.toExponential(2)}, derivative |error| ${derivative.toExponential(2)}`);
  assert.ok(absolute < 2e-7, `gelu absolute error ${absolute}`);
  assert.ok(tail < 5e-6, `gelu relative error in the negative tail ${tail}`);
  assert.ok(derivative < 5e-7, `gelu derivative error ${derivative}`);
  for (const buffer of Object.values(b)) buffer.destroy();
});

test.run();
