// The matvec's LoRA epilogue alone, on the shapes decode runs: weights wide enough that 2, 4 and 8
// lanes share a column group (each lane adding its share of the rank loop before they meet), one row
// and batches over two row groups, ranks up to 32. t and its row info are written here as the shrink
// would (lora.ts rowInfo), NaN past each row's rank, so the check is of the epilogue's formula only:
// float64 W x + residual + g (d - 1) W x + g d s B t on an active row, the plain matvec's bits on the others.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { NO_ADAPTER } from "../../../compiler/kernels/lora.ts";
import { matvecKernel } from "../../../compiler/kernels/matvec.ts";
import { loraRowColumns } from "../../../runtime/gpu/layouts.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { openGpu, randomFloats, relativeError, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(29);

interface Slot {
  readonly rank: number;
  readonly scaling: number;
  /** DoRA: a factor per output row (else 1). */
  readonly dora?: boolean;
}

/** A decode batch's rows: a slot (or NO_ADAPTER) and a gate each. */
interface EpilogueCase {
  readonly K: number;
  readonly N: number;
  readonly maxRank: number;
  readonly residual: boolean;
  readonly slots: readonly Slot[];
  readonly rows: readonly { readonly slot: number; readonly gate: number }[];
}

async function check(name: string, c: EpilogueCase) {
  const { K, N, maxRank: R, residual } = c;
  const M = c.rows.length;
  const T = loraRowColumns(R, true);
  const infoAt = 4 * Math.ceil(R / 4);
  const x = randomFloats(random, M * K);
  const w = randomFloats(random, N * K);
  const res = randomFloats(random, M * N, 4);
  const b = randomFloats(random, c.slots.length * N * R);
  c.slots.forEach((s, slot) => {
    for (let o = 0; o < N; o++) b.fill(0, (slot * N + o) * R + s.rank, (slot * N + o + 1) * R);
  });
  const dora = Float32Array.from({ length: c.slots.length * N }, (_, i) => (c.slots[Math.floor(i / N)]!.dora ? 0.5 + random() : 1));
  // t: each row's values (NaN past its rank, which the epilogue must not read), then slot, gate, scaling, rank.
  const tWords = new Uint32Array(M * T);
  const tFloats = new Float32Array(tWords.buffer);
  tFloats.fill(NaN);
  const t = new Float32Array(M * R);
  c.rows.forEach(({ slot, gate }, r) => {
    const s = c.slots[slot];
    for (let j = 0; j < (s?.rank ?? 0); j++) tFloats[r * T + j] = t[r * R + j] = random() * 2 - 1;
    tWords[r * T + infoAt] = s && gate !== 0 ? slot : NO_ADAPTER;
    tFloats[r * T + infoAt + 1] = gate;
    tFloats[r * T + infoAt + 2] = s?.scaling ?? 0;
    tWords[r * T + infoAt + 3] = s?.rank ?? 0;
  });

  const device = gpu.device;
  device.pushErrorScope("validation");
  const buffers = {
    x: createStorage(device, x, "x"),
    w: createStorage(device, w, "w"),
    residual: createStorage(device, res, "residual"),
    t: createStorage(device, tWords, "t"),
    b: createStorage(device, b, "b"),
    dora: createStorage(device, dora, "dora"),
    fused: createStorage(device, M * N * 4, "fused y"),
    plain: createStorage(device, M * N * 4, "plain y"),
  };
  const withResidual = residual ? { residual: buffers.residual } : {};
  const { x: xb, w: wb, t: tb, b: bb, dora: db } = buffers;
  gpu.step.dispatch(matvecKernel({ K, N, residual, loraRank: R }), { x: xb, w: wb, ...withResidual, t: tb, b: bb, dora: db, y: buffers.fused }, { rows: M });
  gpu.step.dispatch(matvecKernel({ K, N, residual }), { x: xb, w: wb, ...withResidual, y: buffers.plain }, { rows: M });
  gpu.step.submit();
  const got = await readBuffer(device, buffers.fused);
  const plain = await readBuffer(device, buffers.plain);
  const error = await device.popErrorScope();
  for (const buffer of Object.values(buffers)) buffer.destroy();
  if (error) throw new Error(error.message);

  c.rows.forEach(({ slot, gate }, r) => {
    const rowGot = got.subarray(r * N, (r + 1) * N);
    const s = c.slots[slot];
    if (!s || gate === 0) {
      assert.equal(Array.from(rowGot), Array.from(plain.subarray(r * N, (r + 1) * N)), `${name}: row ${r} is off: the plain matvec's bits`);
      return;
    }
    const want = Array.from({ length: N }, (_, o) => {
      let wx = 0;
      for (let k = 0; k < K; k++) wx += x[r * K + k]! * w[o * K + k]!;
      let bt = 0;
      for (let j = 0; j < s.rank; j++) bt += t[r * R + j]! * b[(slot * N + o) * R + j]!;
      const d = dora[slot * N + o]!;
      return wx + gate * (d - 1) * wx + gate * d * s.scaling * bt + (residual ? res[r * N + o]! : 0);
    });
    const err = relativeError(rowGot, want);
    assert.ok(err < 1e-5, `${name}: row ${r} (slot ${slot}, rank ${s.rank}) error ${err}`);
  });
}

const SLOTS: Slot[] = [{ rank: 32, scaling: 0.5 }, { rank: 7, scaling: 2 }, { rank: 30, scaling: 1.25, dora: true }, { rank: 0, scaling: 1 }];

// K 40: one lane; 1100: 4 lanes; 2100: 8 lanes (MIN_UNITS_PER_LANE 64 quads of 4 f32 each).
for (const K of [40, 1100, 2100]) {
  test(`epilogue with K ${K}: one decode row per slot kind, within 1e-5 relative of float64`, async () => {
    for (let slot = 0; slot < SLOTS.length; slot++) {
      await check(`K ${K}, slot ${slot}`, { K, N: 45, maxRank: 32, residual: slot % 2 === 1, slots: SLOTS, rows: [{ slot, gate: slot === 2 ? 0.3 : 1 }] });
    }
  });
}

test("epilogue over two row groups (11 rows): every slot, gates below 1, a zero gate, adapter-less rows; rank bound 30", async () => {
  const slots = SLOTS.map((s) => ({ ...s, rank: Math.min(s.rank, 30) }));
  const rows = [0, 1, 2, NO_ADAPTER, 3, 0, 2, 1, 0, NO_ADAPTER, 2].map((slot, r) => ({ slot, gate: r === 5 ? 0 : r % 3 === 0 ? 1 : 0.25 + r / 20 }));
  for (const K of [40, 2100]) for (const residual of [false, true]) await check(`11 rows, K ${K}${residual ? ", residual" : ""}`, { K, N: 45, maxRank: 30, residual, slots, rows });
});

test.run();
