// The per-token Mixture-of-LoRA inference kernels against float64 references written from the math
// (docs/language.md, "Per-token baselines"), on fresh seeded random data:
//   moe_route (per_ffn's router): per row, its slot's router W [E, in]: z = W x, p = softmax(z), the top
//     k of p best first (gate p_e, or p_e over the kept sum with renormalize; dense keeps all E); rows of
//     an unrouted slot or of no adapter get { NO_EXPERT, 1 } then { NO_EXPERT, 0 }s.
//   moe_mix: y = (pass 0 ? residual : y) + w * x per pass; a pass of weight 0 leaves y bit for bit.
//   lora_shrink, moe "route" (per_module): t[j] = h_{e(j)} (x . a_j), expert e owning ranks
//     e rank/E .. (e+1) rank/E - 1, h the row's gates from its slot's router (all 1 where the slot's
//     routed flag is 0); moe "pass" (per_ffn): the row's pass-th choice keeps its expert's ranks (the
//     others 0), a choice of weight 0 zeroes t, NO_EXPERT keeps every rank. Both with and without the
//     row info (after the values: slot, gate bits, scaling bits, rank; runtime/gpu/layouts.ts).
// Bounds: choices' experts exact; gates, t and y within 1e-5 relative (L2) of float64 on the f32 inputs:
// each is one f32 dot product over at most 301 terms, an exp and a sum over at most 13 experts (or K f32
// additions for moe_mix), each ~sqrt(n) * 2^-24 relative. Values the math makes exactly 0 (ranks of an
// unkept expert, a weight-0 pass) must be exactly 0, and everything a kernel must not write (inactive
// rows, indices past a slot's rank, the padding before the row info, a row past `rows`) keeps its poison
// bits. Ties: a routed row's logits are redrawn until the gaps between consecutive sorted logits that
// decide the kept set and its order (the first min(K, E - 1) gaps) are at least MARGIN = 1e-3, far
// above the f32 logits' error (~1e-6), so the float64 and f32 choices agree; one test makes exact ties
// instead (experts with identical router rows) and checks that the lower index wins.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { NO_ADAPTER, loraShrinkKernel, packLoraSlots, type LoraSlotInfo } from "../../../compiler/kernels/lora.ts";
import { NO_EXPERT, moeMixKernel, moeRouteKernel, type MoeSelection } from "../../../compiler/kernels/moe.ts";
import { ROW_INFO_WORDS, loraRowColumns } from "../../../runtime/gpu/layouts.ts";
import { openGpu, randomFloats, relativeError, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(47);
const BOUND = 1e-5;
const MARGIN = 1e-3;
/** What every output word holds before a kernel runs: a NaN whose payload no arithmetic produces. */
const POISON = 0x7fc0dead;

const bitsOf = (v: number) => new Uint32Array(Float32Array.of(v).buffer)[0]!;
const poisoned = (n: number) => new Uint32Array(n).fill(POISON);
const slotWords = (slots: readonly LoraSlotInfo[]) => new Uint32Array(packLoraSlots(slots).buffer);

function dot(x: ArrayLike<number>, xAt: number, w: ArrayLike<number>, wAt: number, n: number): number {
  let s = 0;
  for (let k = 0; k < n; k++) s += x[xAt + k]! * w[wAt + k]!;
  return s;
}

/**
 * float64 routing of one row by one router W [E, in] (at `wAt` in `w`): the kept experts best first,
 * every expert's gate (0 when not kept), and the smallest gap between consecutive sorted logits among
 * those that decide the kept set and its order.
 */
function routeRow(x: ArrayLike<number>, xAt: number, w: ArrayLike<number>, wAt: number, inFeatures: number, sel: MoeSelection) {
  const E = sel.experts;
  const z = Array.from({ length: E }, (_, e) => dot(x, xAt, w, wAt + e * inFeatures, inFeatures));
  const top = Math.max(...z);
  const ex = z.map((v) => Math.exp(v - top));
  const total = ex.reduce((a, b) => a + b, 0);
  const p = ex.map((v) => v / total);
  // Most probable first, equal p to the lower index (torch.topk's order; the margin keeps ties out).
  const order = [...p.keys()].sort((a, b) => p[b]! - p[a]! || a - b).slice(0, sel.topK);
  const kept = order.reduce((s, e) => s + p[e]!, 0);
  const gate = new Array<number>(E).fill(0);
  for (const e of order) gate[e] = sel.renormalize ? p[e]! / kept : p[e]!;
  const sorted = [...z].sort((a, b) => b - a);
  let margin = Infinity;
  for (let i = 0; i < Math.min(sel.topK, E - 1); i++) margin = Math.min(margin, sorted[i]! - sorted[i + 1]!);
  return { order, gate, margin };
}

/**
 * x [rows, in] uniform in [-1, 1); a row routed by a router (`routerAt(row)`, its offset in `w`, or
 * undefined) is redrawn until its routing margin is at least MARGIN.
 */
function drawRows(rows: number, inFeatures: number, w: Float32Array, routerAt: (row: number) => number | undefined, sel: MoeSelection): Float32Array {
  const x = new Float32Array(rows * inFeatures);
  for (let r = 0; r < rows; r++) {
    const at = routerAt(r);
    for (let tries = 0; ; tries++) {
      assert.ok(tries < 100, `row ${r}: no draw keeps the routing margin`);
      x.set(randomFloats(random, inFeatures), r * inFeatures);
      if (at === undefined || routeRow(x, r * inFeatures, w, at, inFeatures, sel).margin >= MARGIN) break;
    }
  }
  return x;
}

/** Routers of `slots` slots, W [slots, E, in] with logits of unit spread; slots not routed are NaN (never read). */
function routers(slots: number, E: number, inFeatures: number, routed: readonly number[]): Float32Array {
  const w = randomFloats(random, slots * E * inFeatures, 3 / Math.sqrt(inFeatures));
  routed.forEach((flag, s) => {
    if (!flag) w.fill(NaN, s * E * inFeatures, (s + 1) * E * inFeatures);
  });
  return w;
}

const selections = (E: number, K: number): readonly (MoeSelection & { readonly label: string })[] => [
  { label: `top_${K} renormalize`, experts: E, topK: K, renormalize: true },
  { label: `top_${K}`, experts: E, topK: K, renormalize: false },
  { label: "dense", experts: E, topK: E, renormalize: false },
];

// ---------------------------------------------------------------------------------------------------
// moe_route

for (const [E, inFeatures] of [[2, 37], [5, 301], [8, 37], [13, 301]] as const) {
  const K = Math.ceil(E / 3);
  test(`moe_route, ${E} experts, ${inFeatures} in-features: top_${K} renormalised, top_${K}, dense; unrouted-slot and adapter-less rows get the plain pass`, async () => {
    const routed = [1, 0, 1];
    // Runs of one slot, slots interleaved, the unrouted slot 1 and rows without adapter among them.
    const rowAdapter = [0, 0, 2, 1, 0, NO_ADAPTER, 2, 2, 1, 0, 2, 0, NO_ADAPTER, 0, 2, 1, 0, 0, 2, 2, 0];
    const rows = rowAdapter.length;
    const w = routers(routed.length, E, inFeatures, routed);
    for (const sel of selections(E, K)) {
      const k = sel.topK;
      const isRouted = (r: number) => rowAdapter[r] !== NO_ADAPTER && routed[rowAdapter[r]!] === 1;
      const x = drawRows(rows, inFeatures, w, (r) => (isRouted(r) ? rowAdapter[r]! * E * inFeatures : undefined), sel);
      // One row past `rows` must not be written.
      const out = await runOnce(
        gpu,
        moeRouteKernel({ ...sel, inFeatures }),
        { x, weight: w, routed: Uint32Array.from(routed), rowAdapter: Uint32Array.from(rowAdapter), choice: poisoned((rows + 1) * k * 2) },
        { rows },
        ["choice"],
      );
      const words = new Uint32Array(out.choice!.buffer);
      const values = out.choice!;
      const gotGates: number[] = [];
      const wantGates: number[] = [];
      for (let r = 0; r < rows; r++) {
        const experts = Array.from({ length: k }, (_, j) => words[(r * k + j) * 2]!);
        const weights = Array.from({ length: k }, (_, j) => values[(r * k + j) * 2 + 1]!);
        if (!isRouted(r)) {
          assert.equal(experts, new Array(k).fill(NO_EXPERT), `${sel.label}: row ${r} (slot ${rowAdapter[r]}) is not routed: NO_EXPERT`);
          assert.equal(weights, [1, ...new Array(k - 1).fill(0)], `${sel.label}: row ${r} is not routed: one plain pass of weight 1`);
          continue;
        }
        const want = routeRow(x, r * inFeatures, w, rowAdapter[r]! * E * inFeatures, inFeatures, sel);
        assert.equal(experts, want.order, `${sel.label}: row ${r}: the kept experts, best first`);
        gotGates.push(...weights);
        wantGates.push(...want.order.map((e) => want.gate[e]!));
      }
      for (let i = rows * k * 2; i < (rows + 1) * k * 2; i++) assert.is(words[i], POISON, `${sel.label}: the row past rows is not written`);
      const error = relativeError(gotGates, wantGates);
      console.log(`moe_route E ${E} in ${inFeatures} ${sel.label}: gate error ${error.toExponential(1)}`);
      assert.ok(error < BOUND, `${sel.label}: gate relative error ${error}`);
    }
  });
}

test("moe_route breaks exact ties to the lower expert index (experts with identical router rows have bit-identical logits)", async () => {
  const E = 6;
  const inFeatures = 37;
  const rows = 12;
  // Experts 1 and 4, and 2 and 5, have the same router row: each pair ties exactly on every row.
  const w = randomFloats(random, E * inFeatures, 3 / Math.sqrt(inFeatures));
  w.copyWithin(4 * inFeatures, 1 * inFeatures, 2 * inFeatures);
  w.copyWithin(5 * inFeatures, 2 * inFeatures, 3 * inFeatures);
  const x = randomFloats(random, rows * inFeatures);
  let checked = 0;
  let tiesKept = 0;
  for (const sel of selections(E, 3)) {
    const k = sel.topK;
    const out = await runOnce(
      gpu,
      moeRouteKernel({ ...sel, inFeatures }),
      { x, weight: w, routed: Uint32Array.of(1), rowAdapter: new Uint32Array(rows), choice: poisoned(rows * k * 2) },
      { rows },
      ["choice"],
    );
    const words = new Uint32Array(out.choice!.buffer);
    for (let r = 0; r < rows; r++) {
      const experts = Array.from({ length: k }, (_, j) => words[(r * k + j) * 2]!);
      const weights = Array.from({ length: k }, (_, j) => out.choice![(r * k + j) * 2 + 1]!);
      for (const [lo, hi] of [[1, 4], [2, 5]] as const) {
        const i = experts.indexOf(lo);
        const j = experts.indexOf(hi);
        // Kept together: the lower index first, equal gates; only one kept: the lower one.
        if (j >= 0) assert.ok(i >= 0 && i < j && weights[i] === weights[j], `${sel.label}: row ${r}: expert ${lo} before its twin ${hi} (${experts})`);
      }
      // And the whole order is float64's, whose twin logits tie exactly too, where no two other logits
      // deciding it are closer than MARGIN (exact ties, gap 0, are the point here).
      const want = routeRow(x, r * inFeatures, w, 0, inFeatures, sel);
      const z = Array.from({ length: E }, (_, e) => dot(x, r * inFeatures, w, e * inFeatures, inFeatures)).sort((a, b) => b - a);
      const nearTie = z.slice(0, Math.min(k, E - 1)).some((v, i) => v !== z[i + 1] && v - z[i + 1]! < MARGIN);
      if (nearTie) continue;
      checked++;
      if (experts.includes(4) || experts.includes(5)) tiesKept++;
      assert.equal(experts, want.order, `${sel.label}: row ${r}: the float64 order with ties to the lower index`);
      want.order.forEach((e, i) => assert.ok(Math.abs(weights[i]! - want.gate[e]!) < BOUND * want.gate[e]!, `${sel.label}: row ${r}: gate of expert ${e}`));
    }
  }
  console.log(`moe_route ties: ${checked} rows compared, ${tiesKept} keeping a twin`);
  assert.ok(checked >= 30 && tiesKept >= 10, `enough rows compared (${checked}) with a tied pair kept (${tiesKept})`);
});

test("moe_route refuses expert counts and top_k out of range", () => {
  assert.throws(() => moeRouteKernel({ experts: 1, topK: 1, renormalize: false, inFeatures: 8 }), /experts must be an integer from 2 to 64/);
  assert.throws(() => moeRouteKernel({ experts: 65, topK: 1, renormalize: false, inFeatures: 8 }), /experts must be an integer from 2 to 64/);
  assert.throws(() => moeRouteKernel({ experts: 4, topK: 5, renormalize: false, inFeatures: 8 }), /topK must be an integer from 1 to 4/);
  assert.throws(() => moeRouteKernel({ experts: 4, topK: 0, renormalize: false, inFeatures: 8 }), /topK must be an integer from 1 to 4/);
});

// ---------------------------------------------------------------------------------------------------
// moe_mix

test("moe_mix: three passes over rows of 37 (several workgroups): residual + the weighted sum within 1e-5 of float64; a weight-0 pass leaves y bit-identical whatever x holds", async () => {
  const width = 37;
  const K = 3;
  const rows = 13;
  // Per row and pass a weight; 0 where the row does not take the pass (pass 0 of row 4 too: y = residual).
  const zeroAt = new Set(["4:0", "1:1", "2:1", "2:2", "5:2", "7:1", "9:2", "12:1", "12:2"]);
  const weight = (r: number, p: number) => (zeroAt.has(`${r}:${p}`) ? 0 : 0.05 + 0.9 * random());
  const choice = new Uint32Array(rows * K * 2);
  const weights = Array.from({ length: rows }, (_, r) => Array.from({ length: K }, (_, p) => weight(r, p)));
  for (let r = 0; r < rows; r++)
    for (let p = 0; p < K; p++) {
      choice[(r * K + p) * 2] = p === 0 ? NO_EXPERT : p; // the expert is not read
      choice[(r * K + p) * 2 + 1] = bitsOf(weights[r]![p]!);
    }
  const residual = randomFloats(random, rows * width, 4);
  // Each pass's output; NaN in the rows that pass must ignore.
  const xs = Array.from({ length: K }, (_, p) => {
    const x = randomFloats(random, rows * width);
    for (let r = 0; r < rows; r++) if (weights[r]![p] === 0) x.fill(NaN, r * width, (r + 1) * width);
    return x;
  });
  let y: Float32Array = new Float32Array(rows * width).fill(NaN); // pass 0 must not read y
  for (let p = 0; p < K; p++) {
    const before = p === 0 ? residual : y;
    const out = await runOnce(gpu, moeMixKernel({ width, topK: K }), { x: xs[p]!, residual, choice, y }, { n: rows * width, ffnPass: p }, ["y"]);
    const after = out.y!;
    for (let r = 0; r < rows; r++)
      if (weights[r]![p] === 0) {
        const was = new Uint32Array(before.buffer, r * width * 4, width);
        const now = new Uint32Array(after.buffer, r * width * 4, width);
        assert.equal(Array.from(now), Array.from(was), `pass ${p}, row ${r} (weight 0): y ${p === 0 ? "is the residual" : "is unchanged"} bit for bit`);
      }
    y = after;
  }
  const want = Array.from({ length: rows * width }, (_, i) => {
    const r = Math.floor(i / width);
    let v = residual[i]!;
    for (let p = 0; p < K; p++) if (weights[r]![p] !== 0) v += weights[r]![p]! * xs[p]![i]!;
    return v;
  });
  const error = relativeError(y, want);
  console.log(`moe_mix: error ${error.toExponential(1)}`);
  assert.ok(error < BOUND, `moe_mix relative error ${error}`);
});

// ---------------------------------------------------------------------------------------------------
// lora_shrink, moe "route" and "pass"

interface ShrinkCase {
  readonly inFeatures: number;
  readonly maxRank: number;
  readonly slots: readonly LoraSlotInfo[];
  readonly rowAdapter: readonly number[];
  /** Rows whose module gate (column gateIndex) is exactly 0: inactive. */
  readonly offRows: readonly number[];
  readonly gateStride: number;
  readonly gateIndex: number;
}

/** A [slots, maxRank, in], NaN past each slot's rank (never read); module gates, 0 on the off rows. */
function shrinkInputs(c: ShrinkCase) {
  const { inFeatures, maxRank } = c;
  const a = randomFloats(random, c.slots.length * maxRank * inFeatures);
  c.slots.forEach((s, slot) => a.fill(NaN, (slot * maxRank + s.rank) * inFeatures, (slot + 1) * maxRank * inFeatures));
  const gates = Float32Array.from({ length: c.rowAdapter.length * c.gateStride }, () => 0.25 + random());
  for (const r of c.offRows) gates[r * c.gateStride + c.gateIndex] = 0;
  return { a, gates };
}

const isActive = (c: ShrinkCase, r: number) => c.rowAdapter[r] !== NO_ADAPTER && !c.offRows.includes(r);

/** The expert owning rank j of a slot of rank `rank` split into E experts: expert e owns e rank/E .. (e+1) rank/E - 1. */
const ownerOf = (j: number, rank: number, E: number) => Math.floor((j * E) / rank);

/**
 * Checks one shrink output against the float64 t (`want[r][j]` for j < the row's rank on active rows;
 * every other value word must keep its poison), with or without the row info.
 */
function checkShrink(name: string, c: ShrinkCase, gates: Float32Array, got: Uint32Array, want: readonly (readonly number[] | undefined)[], rowInfo: boolean): number {
  const T = loraRowColumns(c.maxRank, rowInfo);
  const infoAt = 4 * Math.ceil(c.maxRank / 4);
  const values = new Float32Array(got.buffer);
  const gotValues: number[] = [];
  const wantValues: number[] = [];
  c.rowAdapter.forEach((slot, r) => {
    const row = want[r];
    const rank = row?.length ?? 0;
    for (let j = 0; j < (rowInfo ? infoAt : c.maxRank); j++) {
      const at = r * T + j;
      if (j >= rank) {
        assert.is(got[at], POISON, `${name}: row ${r}, word ${j}: ${row ? "past the slot's rank" : "an inactive row"}, not written`);
      } else if (row![j] === 0) {
        assert.is(values[at], 0, `${name}: row ${r}, rank ${j}: exactly 0`);
      } else {
        gotValues.push(values[at]!);
        wantValues.push(row![j]!);
      }
    }
    if (!rowInfo) return;
    const info = Array.from(got.subarray(r * T + infoAt, r * T + infoAt + ROW_INFO_WORDS));
    if (!isActive(c, r)) {
      assert.equal(info, [NO_ADAPTER, POISON, POISON, POISON], `${name}: row ${r} is inactive: its info says NO_ADAPTER and nothing else`);
    } else {
      const s = c.slots[slot]!;
      const wantInfo = [slot, bitsOf(gates[r * c.gateStride + c.gateIndex]!), bitsOf(s.scaling), Math.min(s.rank, c.maxRank)];
      assert.equal(info, wantInfo, `${name}: row ${r}: info slot, gate bits, scaling bits, rank`);
    }
  });
  assert.ok(wantValues.length > 0, `${name}: some value to compare`);
  return relativeError(gotValues, wantValues);
}

interface RouteCase extends ShrinkCase {
  readonly sel: MoeSelection & { readonly label: string };
  readonly routed: readonly number[];
}

async function checkRoute(name: string, c: RouteCase) {
  const E = c.sel.experts;
  const { inFeatures } = c;
  const rows = c.rowAdapter.length;
  const router = routers(c.slots.length, E, inFeatures, c.routed);
  const { a, gates } = shrinkInputs(c);
  const x = drawRows(rows, inFeatures, router, (r) => (isActive(c, r) && c.routed[c.rowAdapter[r]!] ? c.rowAdapter[r]! * E * inFeatures : undefined), c.sel);
  // float64 t: each rank's dot product times its expert's gate (1 on a slot whose routed flag is 0).
  let unkept = 0;
  const want = c.rowAdapter.map((s, r) => {
    if (!isActive(c, r)) return undefined;
    const { rank } = c.slots[s]!;
    const h = c.routed[s] ? routeRow(x, r * inFeatures, router, s * E * inFeatures, inFeatures, c.sel).gate : new Array<number>(E).fill(1);
    return Array.from({ length: rank }, (_, j) => {
      const g = h[ownerOf(j, rank, E)]!;
      if (g === 0) unkept++;
      return g === 0 ? 0 : g * dot(x, r * inFeatures, a, (s * c.maxRank + j) * inFeatures, inFeatures);
    });
  });
  if (c.sel.topK < E) assert.ok(unkept > 0, `${name}: some ranks belong to unkept experts`);
  const errors: string[] = [];
  for (const rowInfo of [false, true]) {
    const out = await runOnce(
      gpu,
      loraShrinkKernel({ inFeatures, outFeatures: 1, maxRank: c.maxRank, rowInfo, moe: "route", experts: E, topK: c.sel.topK, renormalize: c.sel.renormalize }),
      {
        x,
        a,
        slots: slotWords(c.slots),
        rowAdapter: Uint32Array.from(c.rowAdapter),
        gates,
        router,
        routed: Uint32Array.from(c.routed),
        t: poisoned(rows * loraRowColumns(c.maxRank, rowInfo)),
      },
      { rows, gateStride: c.gateStride, gateIndex: c.gateIndex },
      ["t"],
    );
    const error = checkShrink(`${name}${rowInfo ? ", row info" : ""}`, c, gates, new Uint32Array(out.t!.buffer), want, rowInfo);
    errors.push(`${rowInfo ? "row info" : "plain"} ${error.toExponential(1)}`);
    assert.ok(error < BOUND, `${name}${rowInfo ? ", row info" : ""}: t relative error ${error}`);
  }
  console.log(`lora_shrink route ${name}: t error ${errors.join(", ")}`);
}

// Three slots of different ranks, the last not routed (plain LoRA of a rank E does not divide); rows of
// no adapter and gated-off rows among them.
const ROUTE_ROWS = [0, 1, 0, 2, NO_ADAPTER, 1, 1, 0, 2, 0, 1, 0, 0, 2, NO_ADAPTER, 1, 0, 2, 1, 0, 0, 1, 2];
const ROUTE_OFF = [3, 9, 15];

for (const [E, K, inFeatures] of [[4, 2, 37], [5, 3, 301], [8, 3, 37]] as const) {
  const slots = [{ rank: 4 * E, scaling: 2 }, { rank: 2 * E, scaling: 0.5 }, { rank: E + 1, scaling: 1.25 }];
  for (const sel of selections(E, K))
    test(`lora_shrink moe route (per_module), ${E} experts, ${sel.label}, ${inFeatures} in-features, slot ranks ${slots.map((s) => s.rank).join("/")} (the last unrouted): within 1e-5, with and without row info`, async () => {
      await checkRoute(`E ${E} ${sel.label} in ${inFeatures}`, {
        inFeatures,
        maxRank: 4 * E,
        slots,
        rowAdapter: ROUTE_ROWS,
        offRows: ROUTE_OFF,
        gateStride: 3,
        gateIndex: 1,
        sel,
        routed: [1, 1, 0],
      });
    });
}

test("lora_shrink moe pass (per_ffn): each pass keeps its choice's expert's ranks, a weight-0 choice zeroes t, NO_EXPERT keeps every rank; slot ranks 12/8 (routed, 4 experts) and 5 (plain); with and without row info", async () => {
  const E = 4;
  const K = 2;
  for (const inFeatures of [37, 301]) {
    const c: ShrinkCase = {
      inFeatures,
      maxRank: 12,
      slots: [{ rank: 12, scaling: 2 }, { rank: 8, scaling: 0.5 }, { rank: 5, scaling: 1.25 }],
      rowAdapter: ROUTE_ROWS,
      offRows: ROUTE_OFF,
      gateStride: 3,
      gateIndex: 2,
    };
    const rows = c.rowAdapter.length;
    const routedSlot = (s: number) => s === 0 || s === 1;
    // Choices as moe_route writes them: distinct experts best first with falling weights on a routed
    // slot's rows (some second passes of weight 0), the plain pass elsewhere.
    const choice = new Uint32Array(rows * K * 2);
    const picks = c.rowAdapter.map((s, r) => {
      if (s === NO_ADAPTER || !routedSlot(s)) return [{ expert: NO_EXPERT, weight: 1 }, { expert: NO_EXPERT, weight: 0 }];
      const first = Math.floor(random() * E);
      const second = (first + 1 + Math.floor(random() * (E - 1))) % E;
      const w0 = 0.5 + 0.5 * random();
      return [{ expert: first, weight: w0 }, { expert: second, weight: r % 5 === 2 ? 0 : 1 - w0 }];
    });
    picks.forEach((row, r) =>
      row.forEach((p, j) => {
        choice[(r * K + j) * 2] = p.expert;
        choice[(r * K + j) * 2 + 1] = bitsOf(p.weight);
      }),
    );
    assert.ok(picks.some((p, r) => isActive(c, r) && p[1]!.weight === 0 && p[1]!.expert !== NO_EXPERT), "some routed row has a weight-0 pass");
    const x = randomFloats(random, rows * inFeatures);
    const { a, gates } = shrinkInputs(c);
    for (let pass = 0; pass < K; pass++) {
      const want = c.rowAdapter.map((s, r) => {
        if (!isActive(c, r)) return undefined;
        const { rank } = c.slots[s]!;
        const { expert, weight } = picks[r]![pass]!;
        return Array.from({ length: rank }, (_, j) => {
          const kept = weight !== 0 && (expert === NO_EXPERT || ownerOf(j, rank, E) === expert);
          return kept ? dot(x, r * inFeatures, a, (s * c.maxRank + j) * inFeatures, inFeatures) : 0;
        });
      });
      for (const rowInfo of [false, true]) {
        const name = `in ${inFeatures}, pass ${pass}${rowInfo ? ", row info" : ""}`;
        const out = await runOnce(
          gpu,
          loraShrinkKernel({ inFeatures, outFeatures: 1, maxRank: c.maxRank, rowInfo, moe: "pass", experts: E, topK: K }),
          { x, a, slots: slotWords(c.slots), rowAdapter: Uint32Array.from(c.rowAdapter), gates, choice, t: poisoned(rows * loraRowColumns(c.maxRank, rowInfo)) },
          { rows, gateStride: c.gateStride, gateIndex: c.gateIndex, ffnPass: pass },
          ["t"],
        );
        const error = checkShrink(name, c, gates, new Uint32Array(out.t!.buffer), want, rowInfo);
        console.log(`lora_shrink pass ${name}: t error ${error.toExponential(1)}`);
        assert.ok(error < BOUND, `${name}: t relative error ${error}`);
      }
    }
  }
});

test.after(() => gpu.context.destroy());
test.run();
