// The group LoRA shrink (lora.ts `modules` M > 1: one dispatch for the modules reading the same input,
// q/k/v or gate/up) against a float64 reference written from the math, on fresh random data:
//   t_m[r, j] = sum_k x[r, k] a_m[slot(r), j, k]   for j < rank_m(slot(r)), when slot(r) is a slot and
//   module m's gate of row r is non-zero,
// with the engine's layout (runtime/gpu/layouts.ts LORA_REGION_BYTES): A [M][aRows, in], slots [M][slotStride],
// t [M][tWords], each module's region a multiple of 256 bytes, and each row's info after its values.
// Error bound: 1e-5 relative per (row, module) over its rank's values (an f32 dot product of at most
// 96 terms, summed in two levels, measured ~1e-7). Exact: every info word (slot, gate bits, scaling
// bits, rank); t past a row's rank, an inactive (row, module) pair's values and the padding between
// regions left bit for bit as they were (a NaN poison), an inactive pair's slot word NO_ADAPTER (the
// epilogue matvec reads it in place of rowAdapter and gates). Each module's region is also checked bit
// for bit against the group-of-one kernel run on that module's regions bound as buffer ranges, as the
// engine's per-module kernels bind them. Two mutated kernels (the gate column or the A region not
// offset by the module) must fail the check.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { NO_ADAPTER, loraShrinkKernel, packLoraSlots, type LoraShrinkConstants, type LoraSlotInfo } from "../../../compiler/kernels/lora.ts";
import type { KernelSource } from "../../../compiler/kernels/kernel.ts";
import { ROW_INFO_WORDS, loraARows, loraRowColumns, loraSlotStride, loraTWords } from "../../../runtime/gpu/layouts.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { openGpu, randomFloats, relativeError, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(29);
const BOUND = 1e-5;

interface GroupCase {
  readonly name: string;
  readonly inFeatures: number;
  readonly maxRank: number;
  /** Per module, per slot: rank 0 is the module absent from that slot's adapter. */
  readonly slots: readonly (readonly LoraSlotInfo[])[];
  readonly rowAdapter: readonly number[];
  /** Gate columns per row; the group's modules read columns gateIndex + m. */
  readonly gateStride: number;
  readonly gateIndex: number;
  /** (row, module) pairs whose gate is exactly 0. */
  readonly off: readonly (readonly [number, number])[];
}

/** Fresh inputs in the group's layout: A's rows past each slot's rank and the padding rows hold NaN (never read). */
function inputs(c: GroupCase) {
  const M = c.slots.length;
  const S = c.slots[0]!.length;
  const rows = c.rowAdapter.length;
  const { inFeatures: K, maxRank: R } = c;
  const layout = { aRows: loraARows(S, R, K), slotStride: loraSlotStride(S), tWords: loraTWords(rows, R) };
  const a = new Float32Array(M * layout.aRows * K).fill(NaN);
  const slotBytes = new Uint8Array(M * layout.slotStride * 8);
  c.slots.forEach((slots, m) => {
    slots.forEach((s, slot) => {
      for (let j = 0; j < s.rank; j++) a.set(randomFloats(random, K), (m * layout.aRows + slot * R + j) * K);
    });
    slotBytes.set(packLoraSlots(slots), m * layout.slotStride * 8);
  });
  const gates = Float32Array.from({ length: rows * c.gateStride }, () => 0.25 + random());
  for (const [r, m] of c.off) gates[r * c.gateStride + c.gateIndex + m] = 0;
  // t poisoned with a NaN bit pattern that no kernel write produces, so "left alone" is exact.
  const t = new Uint32Array(M * layout.tWords).fill(0x7fc0dead);
  return { layout, x: randomFloats(random, rows * K), a, slotBytes, gates, t };
}

type Inputs = ReturnType<typeof inputs>;

/** float64 t of (row, module), or undefined for an inactive pair. */
function reference(c: GroupCase, d: Inputs, r: number, m: number): Float64Array | undefined {
  const slot = c.rowAdapter[r]!;
  if (slot === NO_ADAPTER || d.gates[r * c.gateStride + c.gateIndex + m] === 0) return undefined;
  const { inFeatures: K, maxRank: R } = c;
  const rank = c.slots[m]![slot]!.rank;
  return Float64Array.from({ length: rank }, (_, j) => {
    let sum = 0;
    for (let k = 0; k < K; k++) sum += d.x[r * K + k]! * d.a[(m * d.layout.aRows + slot * R + j) * K + k]!;
    return sum;
  });
}

/** Runs the group kernel (or `kernel`, a mutation of it) once; returns t as words. */
async function runGroup(c: GroupCase, d: Inputs, kernel?: KernelSource): Promise<Uint32Array> {
  const device = gpu.device;
  device.pushErrorScope("validation");
  const rows = c.rowAdapter.length;
  const buffers = {
    x: createStorage(device, d.x, "x"),
    a: createStorage(device, d.a, "a"),
    slots: createStorage(device, d.slotBytes, "slots"),
    rowAdapter: createStorage(device, Uint32Array.from(c.rowAdapter), "rowAdapter"),
    gates: createStorage(device, d.gates, "gates"),
    t: createStorage(device, d.t, "t"),
  };
  const k = kernel ?? loraShrinkKernel(constants(c));
  const { aRows, slotStride, tWords } = d.layout;
  gpu.step.dispatch(k, buffers, { rows, gateStride: c.gateStride, gateIndex: c.gateIndex, aRows, slotStride, tStride: tWords });
  gpu.step.submit();
  const t = new Uint32Array((await readBuffer(device, buffers.t)).buffer);
  const error = await device.popErrorScope();
  if (error) throw new Error(error.message);
  for (const b of Object.values(buffers)) b.destroy();
  return t;
}

/** Module by module, the group-of-one kernel on that module's regions bound as ranges (how the engine binds them). */
async function runEachAlone(c: GroupCase, d: Inputs): Promise<Uint32Array> {
  const device = gpu.device;
  device.pushErrorScope("validation");
  const rows = c.rowAdapter.length;
  const { aRows, slotStride, tWords } = d.layout;
  const a = createStorage(device, d.a, "a");
  const slots = createStorage(device, d.slotBytes, "slots");
  const t = createStorage(device, d.t, "t");
  const shared = { x: createStorage(device, d.x, "x"), rowAdapter: createStorage(device, Uint32Array.from(c.rowAdapter), "rowAdapter"), gates: createStorage(device, d.gates, "gates") };
  const single = loraShrinkKernel({ ...constants(c), modules: 1 });
  c.slots.forEach((_, m) => {
    const range = (buffer: GPUBuffer, bytes: number) => ({ buffer, offset: m * bytes, size: bytes });
    gpu.step.dispatch(single, { ...shared, a: range(a, aRows * c.inFeatures * 4), slots: range(slots, slotStride * 8), t: range(t, tWords * 4) }, { rows, gateStride: c.gateStride, gateIndex: c.gateIndex + m });
  });
  gpu.step.submit();
  const out = new Uint32Array((await readBuffer(device, t)).buffer);
  const error = await device.popErrorScope();
  if (error) throw new Error(error.message);
  for (const b of [a, slots, t, ...Object.values(shared)]) b.destroy();
  return out;
}

function constants(c: GroupCase): LoraShrinkConstants {
  return { inFeatures: c.inFeatures, outFeatures: 1, maxRank: c.maxRank, rowInfo: true, modules: c.slots.length };
}

/** Checks the group's t against the reference; returns the largest relative error of an active pair. */
function check(c: GroupCase, d: Inputs, got: Uint32Array): number {
  const T = loraRowColumns(c.maxRank, true);
  const infoAt = T - ROW_INFO_WORDS;
  const values = new Float32Array(got.buffer, got.byteOffset, got.length);
  const written = new Set<number>();
  let worst = 0;
  c.slots.forEach((slots, m) => {
    const region = m * d.layout.tWords;
    c.rowAdapter.forEach((slot, r) => {
      const at = region + r * T;
      const want = reference(c, d, r, m);
      const where = `${c.name}: row ${r} module ${m}`;
      written.add(at + infoAt);
      if (want === undefined) {
        assert.is(got[at + infoAt], NO_ADAPTER, `${where} is off: its slot word says NO_ADAPTER`);
        return;
      }
      const rank = slots[slot]!.rank;
      const gate = d.gates[r * c.gateStride + c.gateIndex + m]!;
      const info = [slot, new Uint32Array(Float32Array.of(gate).buffer)[0]!, new Uint32Array(Float32Array.of(slots[slot]!.scaling).buffer)[0]!, rank];
      assert.equal(Array.from(got.subarray(at + infoAt, at + infoAt + ROW_INFO_WORDS)), info, `${where}: row info`);
      for (let j = 1; j < ROW_INFO_WORDS; j++) written.add(at + infoAt + j);
      if (rank === 0) return;
      for (let j = 0; j < rank; j++) written.add(at + j);
      const error = relativeError(values.subarray(at, at + rank), want);
      assert.ok(error < BOUND, `${where} (slot ${slot}, rank ${rank}): error ${error}`);
      worst = Math.max(worst, error);
    });
  });
  // Everything else (inactive pairs' values and info, t past each rank, padding) is the poison, bit for bit.
  const changed = [...got.keys()].filter((i) => !written.has(i) && got[i] !== d.t[i]);
  assert.equal(changed, [], `${c.name}: words written outside the active pairs' values and info`);
  return worst;
}

const qkv: GroupCase = {
  name: "q/k/v",
  inFeatures: 37, // unaligned: A and x read as scalars with bounds checks
  maxRank: 6,
  // slot 0 has all three modules at different ranks; slot 1 lacks k (rank 0); slot 2 only v
  slots: [
    [{ rank: 6, scaling: 2 }, { rank: 2, scaling: 0.5 }, { rank: 0, scaling: 0 }],
    [{ rank: 3, scaling: 1.5 }, { rank: 0, scaling: 0 }, { rank: 0, scaling: 0 }],
    [{ rank: 5, scaling: 0.25 }, { rank: 4, scaling: 4 }, { rank: 1, scaling: 3 }],
  ],
  rowAdapter: [0, 1, NO_ADAPTER, 2, 0, 1, 2, 0, NO_ADAPTER],
  gateStride: 7,
  gateIndex: 0,
  // row 0: k off while q and v run; row 3: q off; row 6: q and v off, k runs; row 7: every module off
  off: [[0, 1], [3, 0], [6, 0], [6, 2], [7, 0], [7, 1], [7, 2]],
};

const gateUp: GroupCase = {
  name: "gate/up",
  inFeatures: 96,
  maxRank: 12, // above eight: two rank steps of the workgroup
  slots: [
    [{ rank: 12, scaling: 1 }, { rank: 9, scaling: 2 }, { rank: 0, scaling: 0 }, { rank: 4, scaling: 0.5 }],
    [{ rank: 7, scaling: 1 }, { rank: 12, scaling: 2 }, { rank: 8, scaling: 1.25 }, { rank: 0, scaling: 0 }],
  ],
  rowAdapter: [3, 0, 2, NO_ADAPTER, 1, 1],
  gateStride: 14, // layer 1 of a 7-module table: gate_proj, up_proj are columns 11, 12
  gateIndex: 11,
  off: [[1, 0], [4, 1]],
};

for (const c of [qkv, gateUp]) {
  test(`group shrink, ${c.slots.length} modules (${c.name}), ${c.slots[0]!.length} slots, in ${c.inFeatures}, ranks per module ${c.slots.map((s) => s.map((x) => x.rank).join("/")).join(", ")}: within ${BOUND} of float64, inactive pairs and padding untouched, each region the group-of-one kernel's bits`, async () => {
    const d = inputs(c);
    const got = await runGroup(c, d);
    const worst = check(c, d, got);
    console.log(`lora_shrink modules=${c.slots.length} (${c.name}): largest relative error ${worst.toExponential(1)}`);
    const alone = await runEachAlone(c, d);
    assert.ok(got.every((w, i) => w === alone[i]), `${c.name}: the group's t equals the group-of-one kernel's, region by region, bit for bit`);
  });
}

test("the check fails for a group kernel that ignores the module in the gate column or in A", async () => {
  const good = loraShrinkKernel(constants(qkv));
  const mutations: [string, string, string][] = [
    ["gate column not offset by the module", "params.gateIndex + m]", "params.gateIndex]"],
    ["A rows not offset by the module", "load_a(m * params.aRows + ", "load_a("],
  ];
  for (const [what, from, to] of mutations) {
    assert.ok(good.wgsl.includes(from), what);
    const mutated: KernelSource = { ...good, key: `${good.key}#mutated ${what}`, wgsl: good.wgsl.split(from).join(to) };
    const d = inputs(qkv);
    const got = await runGroup(qkv, d, mutated);
    let failed = false;
    try {
      check(qkv, d, got);
    } catch {
      failed = true;
    }
    assert.ok(failed, `${what}: the check must fail`);
  }
});

test("the group kernel is one pipeline per (input width, rank, module count); the MoE variants stay groups of one", () => {
  const k = loraShrinkKernel({ inFeatures: 64, outFeatures: 1, maxRank: 8, rowInfo: true, modules: 3 });
  assert.is(k.key, "lora_shrink(inFeatures=64,maxRank=8,rowInfo=true,modules=3)");
  assert.equal(k.params.map((p) => p.name), ["rows", "gateStride", "gateIndex", "aRows", "slotStride", "tStride"]);
  assert.equal(k.dispatch, { grid: { param: "rows", times: 3 } });
  // modules 1 is the group-of-one kernel itself
  assert.is(loraShrinkKernel({ inFeatures: 64, outFeatures: 1, maxRank: 8, rowInfo: true, modules: 1 }).wgsl, loraShrinkKernel({ inFeatures: 64, outFeatures: 1, maxRank: 8, rowInfo: true }).wgsl);
  assert.throws(() => loraShrinkKernel({ inFeatures: 64, outFeatures: 1, maxRank: 8, moe: "route", experts: 4, topK: 2, modules: 2 }), /groups of one/);
  assert.throws(() => loraShrinkKernel({ inFeatures: 64, outFeatures: 1, maxRank: 8, moe: "pass", experts: 4, topK: 2, modules: 2 }), /groups of one/);
  assert.throws(() => loraShrinkKernel({ inFeatures: 64, outFeatures: 1, maxRank: 8, modules: 0 }), /modules must be a positive integer/);
});

test.after(() => gpu.context.destroy());
test.run();
