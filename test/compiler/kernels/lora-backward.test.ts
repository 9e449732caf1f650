// LoRA backward for one trained slot (lora_backward_input, then lora_grad_b and lora_grad_a) against
// float64 (test/reference/gradients.ts) on batches that mix slots, rows without adapter and gated-off
// rows, with ranks below the layout's maximum (A past the rank is NaN, B zero, t never written there).
// Bound: 1e-5 relative (L2) per gradient: dt and dGate are f32 dot products over `out` and the rank,
// dx over the rank, dA and dB sums over at most a few hundred rows, all ~sqrt(n) * 2^-24.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { loraBackwardInputKernel, loraGradAKernel, loraGradBKernel } from "../../../compiler/kernels/lora-backward.ts";
import { NO_ADAPTER, packLoraSlots, type LoraConstants, type LoraSlotInfo } from "../../../compiler/kernels/lora.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { loraBackward, linearForward } from "../../reference/gradients.ts";
import { openGpu, randomFloats, relativeError, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(31);
const BOUND = 1e-5;

interface Case {
  readonly dims: LoraConstants;
  readonly slots: readonly LoraSlotInfo[];
  readonly slot: number;
  readonly rowAdapter: readonly number[];
  readonly gateStride: number;
  readonly gateIndex: number;
  /** Rows whose gate for this module is exactly 0. */
  readonly offRows: readonly number[];
}

function inputs(c: Case) {
  const { inFeatures, outFeatures, maxRank } = c.dims;
  const rows = c.rowAdapter.length;
  const a = randomFloats(random, c.slots.length * maxRank * inFeatures);
  const b = randomFloats(random, c.slots.length * outFeatures * maxRank);
  c.slots.forEach((s, slot) => {
    for (let j = s.rank; j < maxRank; j++) {
      a.fill(NaN, (slot * maxRank + j) * inFeatures, (slot * maxRank + j + 1) * inFeatures);
      for (let o = 0; o < outFeatures; o++) b[(slot * outFeatures + o) * maxRank + j] = 0;
    }
  });
  const gates = Float32Array.from({ length: rows * c.gateStride }, () => 0.25 + random());
  for (const r of c.offRows) gates[r * c.gateStride + c.gateIndex] = 0;
  const x = randomFloats(random, rows * inFeatures);
  // t as the forward left it: the shrink output on active rows of any slot, NaN elsewhere.
  const t = new Float32Array(rows * maxRank).fill(NaN);
  c.rowAdapter.forEach((slot, r) => {
    const info = c.slots[slot];
    if (!info || gates[r * c.gateStride + c.gateIndex] === 0) return;
    const aSlot = a.subarray(slot * maxRank * inFeatures, (slot * maxRank + info.rank) * inFeatures);
    t.set(linearForward(x.subarray(r * inFeatures, (r + 1) * inFeatures), aSlot, 1, info.rank, inFeatures), r * maxRank);
  });
  return {
    x,
    a,
    b,
    gates,
    t,
    dy: randomFloats(random, rows * outFeatures),
    // Prior contents: dx holds the base's input gradient; dt and dGates hold other modules' values.
    dx: randomFloats(random, rows * inFeatures),
    dt: randomFloats(random, rows * maxRank),
    dGates: randomFloats(random, rows * c.gateStride),
    dA: randomFloats(random, maxRank * inFeatures),
    dB: randomFloats(random, outFeatures * maxRank),
  };
}

async function run(c: Case, data: ReturnType<typeof inputs>, accumulate: boolean) {
  const device = gpu.device;
  device.pushErrorScope("validation");
  const rows = c.rowAdapter.length;
  const b = Object.fromEntries(
    Object.entries({ ...data, slots: packLoraSlots(c.slots), rowAdapter: Uint32Array.from(c.rowAdapter) }).map(([name, v]) => [name, createStorage(device, v, name)]),
  );
  const params = { rows, gateStride: c.gateStride, gateIndex: c.gateIndex, slot: c.slot };
  const sel = { slots: b.slots!, rowAdapter: b.rowAdapter!, gates: b.gates! };
  gpu.step.dispatch(loraBackwardInputKernel(c.dims), { dy: b.dy!, t: b.t!, a: b.a!, b: b.b!, ...sel, dt: b.dt!, dGates: b.dGates!, dx: b.dx! }, params);
  gpu.step.dispatch(loraGradBKernel({ ...c.dims, accumulate }), { dy: b.dy!, t: b.t!, ...sel, dB: b.dB! }, params);
  gpu.step.dispatch(loraGradAKernel({ ...c.dims, accumulate }), { x: b.x!, dt: b.dt!, ...sel, dA: b.dA! }, params);
  gpu.step.submit();
  const out: Record<string, Float32Array> = {};
  for (const name of ["dt", "dGates", "dx", "dA", "dB"]) out[name] = await readBuffer(device, b[name]!);
  const error = await device.popErrorScope();
  if (error) throw new Error(error.message);
  for (const buffer of Object.values(b)) buffer.destroy();
  return out;
}

/** Rows `of` a [rows, width] array. */
function pick(data: Float32Array, width: number, of: readonly number[]): Float32Array {
  const out = new Float32Array(of.length * width);
  of.forEach((r, i) => out.set(data.subarray(r * width, (r + 1) * width), i * width));
  return out;
}

async function check(name: string, c: Case, accumulate = false) {
  const { inFeatures, outFeatures, maxRank } = c.dims;
  const { rank, scaling } = c.slots[c.slot]!;
  const data = inputs(c);
  const got = await run(c, data, accumulate);
  // float64 over the slot's rows (gated-off ones included: they must contribute nothing).
  const mine = [...c.rowAdapter.keys()].filter((r) => c.rowAdapter[r] === c.slot);
  const live = mine.filter((r) => !c.offRows.includes(r));
  const aSlot = data.a.subarray(c.slot * maxRank * inFeatures, (c.slot * maxRank + rank) * inFeatures);
  const bSlot = new Float32Array(outFeatures * rank);
  for (let o = 0; o < outFeatures; o++) for (let j = 0; j < rank; j++) bSlot[o * rank + j] = data.b[(c.slot * outFeatures + o) * maxRank + j]!;
  const gate = mine.map((r) => data.gates[r * c.gateStride + c.gateIndex]!);
  const shapes = { rows: mine.length, inFeatures, outFeatures, rank };
  const want = loraBackward(shapes, pick(data.x, inFeatures, mine), aSlot, bSlot, gate, scaling, pick(data.dy, outFeatures, mine));
  const errors: Record<string, number> = {};

  // dt, dGate and dx row by row: live rows against float64, gated-off rows of the slot zero (dx untouched), others untouched.
  const wantDt: number[] = [];
  const gotDt: number[] = [];
  const wantGate: number[] = [];
  const gotGate: number[] = [];
  const wantDx: number[] = [];
  const gotDx: number[] = [];
  c.rowAdapter.forEach((slot, r) => {
    const i = mine.indexOf(r);
    const dtRow = Array.from(got.dt!.subarray(r * maxRank, (r + 1) * maxRank));
    const dxRow = got.dx!.subarray(r * inFeatures, (r + 1) * inFeatures);
    const gateAt = r * c.gateStride + c.gateIndex;
    if (slot !== c.slot) {
      assert.equal(dtRow, Array.from(data.dt.subarray(r * maxRank, (r + 1) * maxRank)), `${name}: row ${r} of another slot: dt untouched`);
      assert.is(got.dGates![gateAt], data.dGates[gateAt], `${name}: row ${r} of another slot: dGate untouched`);
    } else if (c.offRows.includes(r)) {
      assert.equal(dtRow, new Array(maxRank).fill(0), `${name}: gated-off row ${r}: dt = 0`);
      assert.is(got.dGates![gateAt], 0, `${name}: gated-off row ${r}: dGate = 0`);
    } else {
      for (let j = 0; j < maxRank; j++) {
        gotDt.push(dtRow[j]!);
        wantDt.push(j < rank ? want.dt[i * rank + j]! : 0);
      }
      for (let j = rank; j < maxRank; j++) assert.is(dtRow[j], 0, `${name}: dt past the rank is 0`);
      gotGate.push(got.dGates![gateAt]!);
      wantGate.push(want.dGate[i]!);
      for (let k = 0; k < inFeatures; k++) {
        gotDx.push(dxRow[k]!);
        wantDx.push(data.dx[r * inFeatures + k]! + want.dX[i * inFeatures + k]!);
      }
      return;
    }
    assert.equal(Array.from(dxRow), Array.from(data.dx.subarray(r * inFeatures, (r + 1) * inFeatures)), `${name}: row ${r}: dx untouched`);
  });
  // Every other gate column is untouched.
  for (let r = 0; r < c.rowAdapter.length; r++)
    for (let g = 0; g < c.gateStride; g++) if (g !== c.gateIndex) assert.is(got.dGates![r * c.gateStride + g], data.dGates[r * c.gateStride + g]);
  if (live.length > 0) {
    errors.dt = relativeError(gotDt, wantDt);
    errors.dGate = relativeError(gotGate, wantGate);
    errors.dx = relativeError(gotDx, wantDx);
  }

  // dA [R, in] and dB [out, R]: zero past the rank, plus the prior contents with `accumulate`.
  const wantA = new Float64Array(maxRank * inFeatures);
  const wantB = new Float64Array(outFeatures * maxRank);
  wantA.set(want.dA);
  for (let o = 0; o < outFeatures; o++) for (let j = 0; j < rank; j++) wantB[o * maxRank + j] = want.dB[o * rank + j]!;
  if (accumulate) {
    wantA.forEach((v, i) => (wantA[i] = v + data.dA[i]!));
    wantB.forEach((v, i) => (wantB[i] = v + data.dB[i]!));
  } else {
    for (let i = rank * inFeatures; i < wantA.length; i++) assert.is(got.dA![i], 0, `${name}: dA past the rank is 0`);
    for (let o = 0; o < outFeatures; o++) for (let j = rank; j < maxRank; j++) assert.is(got.dB![o * maxRank + j], 0, `${name}: dB past the rank is 0`);
  }
  if (live.length > 0) {
    errors.dA = relativeError(got.dA!, wantA);
    errors.dB = relativeError(got.dB!, wantB);
  } else {
    assert.equal(Array.from(got.dA!), Array.from(wantA), `${name}: dA without a live row`);
    assert.equal(Array.from(got.dB!), Array.from(wantB), `${name}: dB without a live row`);
  }
  for (const [k, e] of Object.entries(errors)) assert.ok(e < BOUND, `${name}: ${k} relative error ${e}`);
  console.log(`  ${name}: ${Object.entries(errors).map(([k, e]) => `${k} ${e.toExponential(2)}`).join(", ")}`);
  return got;
}

test("odd sizes, three slots interleaved, a row without adapter, gated-off rows of the trained slot and of others", async () => {
  await check("odd sizes", {
    dims: { inFeatures: 37, outFeatures: 45, maxRank: 6 },
    slots: [{ rank: 6, scaling: 2 }, { rank: 2, scaling: 0.5 }, { rank: 5, scaling: 1.25 }],
    slot: 2,
    rowAdapter: [0, 2, 2, 1, 2, NO_ADAPTER, 2, 0, 2, 2, 1, 2, 2, 2, 0, 2, 2, 2, 1, 2, 2],
    gateStride: 3,
    gateIndex: 2,
    offRows: [2, 7, 12, 19],
  });
});

test("a rank above 16 (two reduction chunks), outputs and inputs over several tiles, 200 rows, accumulating dA and dB", async () => {
  const rows = 200;
  const rowAdapter = Array.from({ length: rows }, (_, r) => (r % 7 === 3 ? 1 : r % 11 === 5 ? NO_ADAPTER : 0));
  await check(
    "rank 24 of 28",
    {
      dims: { inFeatures: 130, outFeatures: 261, maxRank: 28 },
      slots: [{ rank: 24, scaling: 0.5 }, { rank: 28, scaling: 1 }],
      slot: 0,
      rowAdapter,
      gateStride: 4,
      gateIndex: 1,
      offRows: [0, 17, 18, 99, 199],
    },
    true,
  );
});

test("rank 8 of 8 (the 16-wide tile) and rank 66 of 70 (two column tiles of dB and row tiles of dA)", async () => {
  const rowAdapter = Array.from({ length: 40 }, (_, r) => (r % 5 === 0 ? 1 : 0));
  await check("rank 8", {
    dims: { inFeatures: 64, outFeatures: 96, maxRank: 8 },
    slots: [{ rank: 8, scaling: 2 }, { rank: 4, scaling: 1 }],
    slot: 0,
    rowAdapter,
    gateStride: 1,
    gateIndex: 0,
    offRows: [3],
  });
  await check("rank 66", {
    dims: { inFeatures: 50, outFeatures: 70, maxRank: 70 },
    slots: [{ rank: 4, scaling: 1 }, { rank: 66, scaling: 0.25 }],
    slot: 1,
    rowAdapter,
    gateStride: 2,
    gateIndex: 1,
    offRows: [10],
  });
});

test("a slot with no live row: dA and dB are zero, dx untouched; two runs give bit-identical gradients", async () => {
  const c: Case = {
    dims: { inFeatures: 33, outFeatures: 20, maxRank: 4 },
    slots: [{ rank: 4, scaling: 1 }, { rank: 3, scaling: 1 }],
    slot: 1,
    rowAdapter: [0, 1, 0, 1, NO_ADAPTER],
    gateStride: 1,
    gateIndex: 0,
    offRows: [1, 3],
  };
  const got = await check("no live row", c);
  assert.ok(got.dA!.every((v) => v === 0) && got.dB!.every((v) => v === 0));
  const c2: Case = { ...c, rowAdapter: Array.from({ length: 150 }, () => 1), offRows: [] };
  const data = inputs(c2);
  const first = await run(c2, data, false);
  const second = await run(c2, data, false);
  assert.equal(Array.from(first.dA!), Array.from(second.dA!));
  assert.equal(Array.from(first.dB!), Array.from(second.dB!));
});

test("keys name the variant", () => {
  const dims = { inFeatures: 8, outFeatures: 12, maxRank: 4 };
  assert.is(loraBackwardInputKernel(dims).key, "lora_backward_input(inFeatures=8,outFeatures=12,maxRank=4)");
  assert.is(loraGradAKernel({ ...dims, accumulate: true }).key, "lora_grad_a(inFeatures=8,maxRank=4,accumulate=true)");
  assert.is(loraGradBKernel({ ...dims, accumulate: false }).key, "lora_grad_b(outFeatures=12,maxRank=4,accumulate=false)");
  assert.throws(() => loraBackwardInputKernel({ ...dims, maxRank: 0 }), /positive integer/);
});

test.after(() => gpu.context.destroy());
test.run();
