// Batched, gated multi-adapter LoRA (shrink then expand) against a float64 reference, the DoRA
// expand variant (per slot and output row factors d, with and without a fused residual), and decode's
// fused path (the shrink's row info read by the matvec's LoRA epilogue).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { NO_ADAPTER, loraExpandKernel, loraShrinkKernel, packLoraSlots, type LoraExpandConstants, type LoraSlotInfo } from "../../../compiler/kernels/lora.ts";
import { matvecKernel } from "../../../compiler/kernels/matvec.ts";
import { loraRowColumns } from "../../../runtime/gpu/layouts.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { nanFilled, openGpu, randomFloats, relativeError, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(11);

/** One module's LoRA batch: weights of every slot, and per row a slot (or none) and gates. */
interface LoraCase {
  readonly dims: LoraExpandConstants;
  readonly slots: readonly LoraSlotInfo[];
  readonly rowAdapter: readonly number[];
  /** [rows, gateStride]; the module reads column gateIndex. */
  readonly gates: Float32Array;
  readonly gateStride: number;
  readonly gateIndex: number;
  /** DoRA factors d [slots, out] (the `dora` variant only). */
  readonly dora?: Float32Array;
}

function inputs(c: LoraCase) {
  const { inFeatures, outFeatures, maxRank } = c.dims;
  const rows = c.rowAdapter.length;
  const a = randomFloats(random, c.slots.length * maxRank * inFeatures);
  const b = randomFloats(random, c.slots.length * outFeatures * maxRank);
  // Padding past each slot's rank: A is never read there, B holds zeros as the layout requires.
  c.slots.forEach((s, slot) => {
    for (let j = s.rank; j < maxRank; j++) {
      a.fill(NaN, (slot * maxRank + j) * inFeatures, (slot * maxRank + j + 1) * inFeatures);
      for (let o = 0; o < outFeatures; o++) b[(slot * outFeatures + o) * maxRank + j] = 0;
    }
  });
  // With a fused residual y holds residual + W x: the residual is drawn larger than W x, as in a model.
  const residual = randomFloats(random, rows * outFeatures, 4);
  const base = randomFloats(random, rows * outFeatures);
  const y = c.dims.residual ? Float32Array.from(base, (v, i) => v + residual[i]!) : base;
  return { x: randomFloats(random, rows * inFeatures), a, b, y, residual };
}

/**
 * float64 t (NaN where not defined: inactive rows, indices past the rank) and y after expand: for DoRA
 * y + g (d - 1) (W x) + g d scaling B t, W x being y less the residual when y holds it.
 */
function reference(c: LoraCase, { x, a, b, y, residual }: ReturnType<typeof inputs>) {
  const { inFeatures, outFeatures, maxRank } = c.dims;
  const t = new Float64Array(c.rowAdapter.length * maxRank).fill(NaN);
  const out = Float64Array.from(y);
  c.rowAdapter.forEach((slot, r) => {
    const gate = c.gates[r * c.gateStride + c.gateIndex]!;
    const info = c.slots[slot];
    if (!info || gate === 0) return;
    for (let j = 0; j < info.rank; j++) {
      let sum = 0;
      for (let k = 0; k < inFeatures; k++) sum += x[r * inFeatures + k]! * a[(slot * maxRank + j) * inFeatures + k]!;
      t[r * maxRank + j] = sum;
    }
    for (let o = 0; o < outFeatures; o++) {
      let sum = 0;
      for (let j = 0; j < info.rank; j++) sum += t[r * maxRank + j]! * b[(slot * outFeatures + o) * maxRank + j]!;
      const at = r * outFeatures + o;
      const d = c.dora ? c.dora[slot * outFeatures + o]! : 1;
      const product = c.dims.residual ? y[at]! - residual[at]! : y[at]!;
      out[at] = y[at]! + gate * (d - 1) * product + gate * d * info.scaling * sum;
    }
  });
  return { t, y: out };
}

/** Runs shrink then expand as one step, t poisoned with NaN beforehand. */
async function runLora(c: LoraCase, data: ReturnType<typeof inputs>) {
  const device = gpu.device;
  device.pushErrorScope("validation");
  const rows = c.rowAdapter.length;
  const buffers = {
    x: createStorage(device, data.x, "x"),
    a: createStorage(device, data.a, "a"),
    b: createStorage(device, data.b, "b"),
    slots: createStorage(device, packLoraSlots(c.slots), "slots"),
    rowAdapter: createStorage(device, Uint32Array.from(c.rowAdapter), "rowAdapter"),
    gates: createStorage(device, c.gates, "gates"),
    t: createStorage(device, nanFilled(rows * c.dims.maxRank), "t"),
    y: createStorage(device, data.y, "y"),
    ...(c.dims.dora ? { dora: createStorage(device, c.dora!, "dora") } : {}),
    ...(c.dims.residual ? { residual: createStorage(device, data.residual, "residual") } : {}),
  };
  const params = { rows, gateStride: c.gateStride, gateIndex: c.gateIndex };
  const { x, a, b, slots, rowAdapter, gates, t, y, ...dora } = buffers;
  gpu.step.dispatch(loraShrinkKernel(c.dims), { x, a, slots, rowAdapter, gates, t }, params);
  gpu.step.dispatch(loraExpandKernel(c.dims), { t, b, slots, rowAdapter, gates, ...dora, y }, params);
  gpu.step.submit();
  const result = { t: await readBuffer(device, t), y: await readBuffer(device, y) };
  const error = await device.popErrorScope();
  if (error) throw new Error(error.message);
  for (const buffer of Object.values(buffers)) buffer.destroy();
  return result;
}

/** Rows' gates for `experts` modules, with the listed rows' gate for `gateIndex` set to exactly 0. */
function gatesFor(rows: number, experts: number, gateIndex: number, offRows: readonly number[]): Float32Array {
  const gates = Float32Array.from({ length: rows * experts }, () => 0.25 + random());
  for (const r of offRows) gates[r * experts + gateIndex] = 0;
  return gates;
}

/** Checks a case: active rows within `bound` of float64, every other row of y bit-identical to its input. */
async function check(name: string, c: LoraCase, bound: number) {
  const data = inputs(c);
  const want = reference(c, data);
  const got = await runLora(c, data);
  const defined = [...want.t.keys()].filter((i) => !Number.isNaN(want.t[i]));
  if (defined.length > 0) {
    const tError = relativeError(defined.map((i) => got.t[i]!), defined.map((i) => want.t[i]!));
    assert.ok(tError < bound, `${name}: shrink error ${tError}`);
  }
  const { outFeatures } = c.dims;
  c.rowAdapter.forEach((slot, r) => {
    const gate = c.gates[r * c.gateStride + c.gateIndex]!;
    const rowGot = got.y.subarray(r * outFeatures, (r + 1) * outFeatures);
    const rowWant = want.y.subarray(r * outFeatures, (r + 1) * outFeatures);
    if (slot === NO_ADAPTER || gate === 0) {
      assert.equal(Array.from(rowGot), Array.from(data.y.subarray(r * outFeatures, (r + 1) * outFeatures)), `${name}: row ${r} is off and must be untouched`);
    } else {
      const error = relativeError(rowGot, rowWant);
      assert.ok(error < bound, `${name}: row ${r} (slot ${slot}) error ${error}`);
    }
  });
}

test("a prefill batch mixing three adapters of different ranks, a row without adapter and gated-off rows, odd sizes: within 1e-5 relative", async () => {
  // 21 rows: runs of one slot, slots interleaved, rows without adapter or with gate 0 among them.
  const rowAdapter = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 1, NO_ADAPTER, 2, 2, 0, 1, 1, 2, 2];
  const gateIndex = 2;
  const c: LoraCase = {
    dims: { inFeatures: 37, outFeatures: 45, maxRank: 6 },
    slots: [{ rank: 6, scaling: 2 }, { rank: 2, scaling: 0.5 }, { rank: 5, scaling: 1.25 }],
    rowAdapter,
    gates: gatesFor(rowAdapter.length, 3, gateIndex, [3, 12, 15, 16]),
    gateStride: 3,
    gateIndex,
  };
  await check("odd sizes", c, 1e-5);
});

test("a decode batch, one row per tenant, a rank above eight, outputs over two column blocks: within 1e-5 relative", async () => {
  const rowAdapter = [2, 0, NO_ADAPTER, 1, 3];
  const c: LoraCase = {
    dims: { inFeatures: 96, outFeatures: 300, maxRank: 12 },
    slots: [{ rank: 12, scaling: 1 }, { rank: 8, scaling: 4 }, { rank: 9, scaling: 0.75 }, { rank: 4, scaling: 2 }],
    rowAdapter,
    gates: gatesFor(rowAdapter.length, 7, 6, [4]),
    gateStride: 7,
    gateIndex: 6,
  };
  await check("decode", c, 1e-5);
});

test("a batch whose rows are all switched off leaves y exactly as it was", async () => {
  const rowAdapter = [0, 0, 1, NO_ADAPTER, 1];
  const c: LoraCase = {
    dims: { inFeatures: 16, outFeatures: 20, maxRank: 4 },
    slots: [{ rank: 4, scaling: 1 }, { rank: 3, scaling: 1 }],
    rowAdapter,
    gates: gatesFor(rowAdapter.length, 1, 0, [0, 1, 2, 4]),
    gateStride: 1,
    gateIndex: 0,
  };
  await check("all off", c, 1e-5);
});

/** DoRA factors of every slot: near 1 like a trained adapter's (m starts as the row norm), exactly 1 for the plain LoRA slots listed. */
function doraFactors(slots: number, outFeatures: number, plain: readonly number[]): Float32Array {
  const d = Float32Array.from({ length: slots * outFeatures }, () => 1 + 0.2 * (random() * 2 - 1));
  for (const s of plain) d.fill(1, s * outFeatures, (s + 1) * outFeatures);
  return d;
}

for (const residual of [false, true]) {
  test(`DoRA expand${residual ? " over a fused residual (o_proj, down_proj)" : ""}: DoRA and plain LoRA slots, gates below 1, gated-off and adapter-less rows, odd sizes: within 1e-5 relative`, async () => {
    const rowAdapter = [0, 0, 0, 1, 1, NO_ADAPTER, 2, 0, 2, 1, 1, 0, 2];
    const dims: LoraExpandConstants = { inFeatures: 37, outFeatures: 301, maxRank: 6, dora: true, ...(residual ? { residual } : {}) };
    const c: LoraCase = {
      dims,
      slots: [{ rank: 6, scaling: 2 }, { rank: 3, scaling: 0.5 }, { rank: 5, scaling: 1.25 }],
      rowAdapter,
      gates: gatesFor(rowAdapter.length, 3, 1, [2, 9]),
      gateStride: 3,
      gateIndex: 1,
      dora: doraFactors(3, 301, [1]),
    };
    await check(residual ? "DoRA, residual" : "DoRA", c, 1e-5);
  });
}

test("the DoRA variant adds exactly what the plain kernel adds on a plain LoRA slot (factors 1), fused residual or not", async () => {
  const rowAdapter = [0, 1, 0, NO_ADAPTER, 1];
  const slots = [{ rank: 4, scaling: 2 }, { rank: 3, scaling: 0.75 }];
  for (const residual of [false, true]) {
    const plainCase: LoraCase = { dims: { inFeatures: 24, outFeatures: 40, maxRank: 4 }, slots, rowAdapter, gates: gatesFor(5, 2, 0, []), gateStride: 2, gateIndex: 0 };
    const doraCase: LoraCase = { ...plainCase, dims: { ...plainCase.dims, dora: true, ...(residual ? { residual } : {}) }, dora: new Float32Array(2 * 40).fill(1) };
    const data = inputs(doraCase);
    const plain = await runLora(plainCase, data);
    const dora = await runLora(doraCase, data);
    assert.equal(Array.from(dora.y), Array.from(plain.y), `residual ${residual}`);
  }
});

/**
 * Decode's fused path: the shrink writing t with each row's LoRA info (rowInfo), then the matvec with
 * the LoRA epilogue computing W x (+ residual) and the update in one kernel. y must be float64's
 * W x + residual + the expand's formula on active rows, and bit for bit the plain matvec on the others.
 */
async function checkEpilogue(name: string, c: LoraCase, residual: boolean) {
  const { inFeatures: K, outFeatures: N, maxRank } = c.dims;
  const rows = c.rowAdapter.length;
  const data = inputs({ ...c, dims: { ...c.dims, residual: false } });
  const w = randomFloats(random, N * K);
  const res = residual ? data.residual : new Float32Array(rows * N);
  const device = gpu.device;
  device.pushErrorScope("validation");
  const buffers = {
    x: createStorage(device, data.x, "x"),
    w: createStorage(device, w, "w"),
    a: createStorage(device, data.a, "a"),
    b: createStorage(device, data.b, "b"),
    slots: createStorage(device, packLoraSlots(c.slots), "slots"),
    rowAdapter: createStorage(device, Uint32Array.from(c.rowAdapter), "rowAdapter"),
    gates: createStorage(device, c.gates, "gates"),
    t: createStorage(device, nanFilled(rows * loraRowColumns(maxRank, true)), "t"),
    dora: createStorage(device, c.dora ?? new Float32Array(c.slots.length * N).fill(1), "dora"),
    residual: createStorage(device, res, "residual"),
    fused: createStorage(device, rows * N * 4, "fused y"),
    plain: createStorage(device, rows * N * 4, "plain y"),
  };
  const { x, a, b, slots, rowAdapter, gates, t, dora, fused, plain } = buffers;
  const withResidual = residual ? { residual: buffers.residual } : {};
  gpu.step.dispatch(loraShrinkKernel({ ...c.dims, rowInfo: true }), { x, a, slots, rowAdapter, gates, t }, { rows, gateStride: c.gateStride, gateIndex: c.gateIndex });
  gpu.step.dispatch(matvecKernel({ K, N, residual, loraRank: maxRank }), { x, w: buffers.w, ...withResidual, t, b, dora, y: fused }, { rows });
  gpu.step.dispatch(matvecKernel({ K, N, residual }), { x, w: buffers.w, ...withResidual, y: plain }, { rows });
  gpu.step.submit();
  const got = await readBuffer(device, fused);
  const base = await readBuffer(device, plain);
  const error = await device.popErrorScope();
  if (error) throw new Error(error.message);
  for (const buffer of Object.values(buffers)) buffer.destroy();
  // float64 W x, then the expand's reference on y = W x (no residual: it is added after)
  const wx = new Float32Array(rows * N);
  const wx64 = new Float64Array(rows * N);
  for (let r = 0; r < rows; r++) for (let o = 0; o < N; o++) {
    let sum = 0;
    for (let k = 0; k < K; k++) sum += data.x[r * K + k]! * w[o * K + k]!;
    wx64[r * N + o] = sum;
    wx[r * N + o] = sum;
  }
  const want = reference({ ...c, dims: { ...c.dims, residual: false } }, { ...data, y: wx });
  c.rowAdapter.forEach((slot, r) => {
    const rowGot = got.subarray(r * N, (r + 1) * N);
    const gate = c.gates[r * c.gateStride + c.gateIndex]!;
    if (slot === NO_ADAPTER || gate === 0) {
      assert.equal(Array.from(rowGot), Array.from(base.subarray(r * N, (r + 1) * N)), `${name}: row ${r} is off: the plain matvec's bits`);
      return;
    }
    // the reference added the update to f32 W x; put float64 W x back under it
    const rowWant = Array.from({ length: N }, (_, o) => want.y[r * N + o]! - wx[r * N + o]! + wx64[r * N + o]! + res[r * N + o]!);
    const err = relativeError(rowGot, rowWant);
    assert.ok(err < 1e-5, `${name}: row ${r} (slot ${slot}) error ${err}`);
  });
}

for (const residual of [false, true]) {
  test(`the matvec's LoRA epilogue (decode)${residual ? " over a fused residual" : ""}: LoRA and DoRA slots, gated-off and adapter-less rows, odd sizes: within 1e-5 relative, off rows the plain matvec's bits`, async () => {
    const rowAdapter = [1, 0, NO_ADAPTER, 2, 1, 0, 2];
    await checkEpilogue(
      residual ? "epilogue, residual" : "epilogue",
      {
        dims: { inFeatures: 37, outFeatures: 45, maxRank: 6 },
        slots: [{ rank: 6, scaling: 2 }, { rank: 3, scaling: 0.5 }, { rank: 5, scaling: 1.25 }],
        rowAdapter,
        gates: gatesFor(rowAdapter.length, 3, 1, [5]),
        gateStride: 3,
        gateIndex: 1,
        dora: doraFactors(3, 45, [1]),
      },
      residual,
    );
  });
}

test("kernels refuse a zero rank bound and share a pipeline across modules of one shape", () => {
  assert.throws(() => loraShrinkKernel({ inFeatures: 8, outFeatures: 8, maxRank: 0 }), /maxRank must be a positive integer/);
  const q = loraExpandKernel({ inFeatures: 64, outFeatures: 64, maxRank: 8 });
  const o = loraExpandKernel({ inFeatures: 32, outFeatures: 64, maxRank: 8 });
  assert.is(q.key, o.key); // expand does not depend on the input width
  assert.is.not(loraShrinkKernel({ inFeatures: 64, outFeatures: 64, maxRank: 8 }).key, loraShrinkKernel({ inFeatures: 32, outFeatures: 64, maxRank: 8 }).key);
  const names = (k: { bindings: readonly { name: string }[] }) => k.bindings.map((b) => b.name);
  assert.equal(names(loraExpandKernel({ inFeatures: 8, outFeatures: 8, maxRank: 4, dora: true, residual: true })), ["t", "b", "slots", "rowAdapter", "gates", "dora", "residual", "y", "params"]);
  assert.throws(() => loraExpandKernel({ inFeatures: 8, outFeatures: 8, maxRank: 4, residual: true }), /only read by the DoRA variant/);
});

test.after(() => gpu.context.destroy());
test.run();
