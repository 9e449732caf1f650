// Token selection on the device, one workgroup per row of logits, each row with its own settings:
// greedy argmax (temperature 0; the lowest index wins ties) or sampling from softmax(logits / T)
// restricted by top-k and then top-p, driven by a counter-based RNG of (seed, step).
//   bindings: logits (read, f32[rows, vocab]), settings (read, SAMPLING_WORDS u32 per row, see
//             packSamplingSettings), tokens (read_write, u32[rows])
//   params:   rows
// Top-k keeps every token whose logit is at least the k-th largest (ties at the cut all stay); top-p then
// keeps the fewest highest-probability tokens whose mass reaches p (again keeping ties). Both cuts are found
// as thresholds on an order-preserving u32 key of the logit by a 32-step bitwise search, so no sort is needed.
// The draw walks the kept tokens in index order until the cumulative weight passes u * (kept mass).
// test/reference/sampling.ts defines the same selection in float64 from these rules; the device self-test
// carries its own copy (bin/commands/sampling-reference.ts).
import type { KernelSource } from "./kernel.ts";

export { SAMPLING_WORDS, packSamplingSettings, type SamplingSettings } from "../../runtime/gpu/layouts.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource } from "./wgsl.ts";

/** PCG hash (Jarzynski and Olano 2020), identical to the kernel's `pcg`. */
export function pcg(v: number): number {
  const state = (Math.imul(v, 747796405) + 2891336453) >>> 0;
  const word = Math.imul(((state >>> ((state >>> 28) + 4)) ^ state) >>> 0, 277803737) >>> 0;
  return ((word >>> 22) ^ word) >>> 0;
}

/** The uniform draw in [0, 1) for (seed, step): 24 random bits, exact in f32 and f64. */
export function uniformDraw(seed: number, step: number): number {
  return (pcg((pcg(seed >>> 0) ^ step) >>> 0) >>> 8) / 16777216;
}

/** The kernels' `pcg`, the same hash as {@link pcg}: sampling's draws and dropout's masks use it. */
export const PCG_WGSL = /* wgsl */ `fn pcg(v: u32) -> u32 {
  let state = v * 747796405u + 2891336453u;
  let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
  return (word >> 22u) ^ word;
}`;

const WORKGROUP = 256;
const NONE = "0xffffffffu";

export function samplingKernel({ vocab }: { readonly vocab: number }): KernelSource {
  const chunk = Math.ceil(vocab / WORKGROUP);
  return kernelSource({
    name: "sampling",
    constants: { vocab },
    storage: [
      { name: "logits", access: "read", type: "array<f32>" },
      { name: "settings", access: "read", type: "array<Sampling>" },
      { name: "tokens", access: "read_write", type: "array<u32>" },
    ],
    params: [{ name: "rows", type: "u32" }],
    body: /* wgsl */ `
struct Sampling { seed: u32, step: u32, temperature: f32, topK: u32, topP: f32 }

var<workgroup> sums: array<f32, ${WORKGROUP}>;
var<workgroup> indices: array<u32, ${WORKGROUP}>;
var<workgroup> counts: array<u32, ${WORKGROUP}>;
var<workgroup> found: atomic<u32>;
var<workgroup> lastKept: atomic<u32>;
// Row-wide values found by a reduction stay in workgroup memory and are re-read at each use: on Mesa
// 22.3's llvmpipe a reduced value held in a register across later barriers corrupts the reductions
// after it (docs/drivers.md), which WGSL does not allow but the driver does.
var<workgroup> rowTop: f32;
var<workgroup> rowGoal: f32;

${PCG_WGSL}

// Orders like the float: negative values flipped entirely, non-negative ones above them.
fn orderKey(x: f32) -> u32 {
  let b = bitcast<u32>(x);
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn sumAll(lid: u32, v: f32) -> f32 {
  sums[lid] = v;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { sums[lid] += sums[lid + stride]; }
  }
  workgroupBarrier();
  let total = sums[0];
  workgroupBarrier();
  return total;
}

fn countAll(lid: u32, v: u32) -> u32 {
  counts[lid] = v;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) { counts[lid] += counts[lid + stride]; }
  }
  workgroupBarrier();
  let total = counts[0];
  workgroupBarrier();
  return total;
}

fn countAtLeast(lid: u32, base: u32, key: u32) -> u32 {
  var n = 0u;
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) { n += select(0u, 1u, orderKey(logits[base + i]) >= key); }
  return countAll(lid, n);
}

fn massAtLeast(lid: u32, base: u32, key: u32, invT: f32) -> f32 {
  let top = rowTop;
  var m = 0.0;
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) {
    let x = logits[base + i];
    if (orderKey(x) >= key) { m += exp((x - top) * invT); }
  }
  return sumAll(lid, m);
}

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let row = ${LINEAR_GROUP};
  if (row >= params.rows) { return; }
  let base = row * ${vocab}u;
  let s = settings[row];

  // Argmax: each lane keeps its first maximum, then pairs merge preferring the lower index on ties.
  var best = -3.4e38;
  var bestAt = ${NONE};
  for (var i = lid; i < ${vocab}u; i += ${WORKGROUP}u) {
    let x = logits[base + i];
    if (bestAt == ${NONE} || x > best) { best = x; bestAt = i; }
  }
  sums[lid] = best;
  indices[lid] = bestAt;
  for (var stride = ${WORKGROUP / 2}u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lid < stride) {
      let x = sums[lid + stride];
      let at = indices[lid + stride];
      let mine = indices[lid];
      if (at != ${NONE} && (mine == ${NONE} || x > sums[lid] || (x == sums[lid] && at < mine))) {
        sums[lid] = x;
        indices[lid] = at;
      }
    }
  }
  workgroupBarrier();
  let argmax = indices[0];
  if (s.temperature <= 0.0) {
    if (lid == 0u) { tokens[row] = argmax; }
    return;
  }
  if (lid == 0u) { rowTop = sums[0]; }
  workgroupBarrier();
  let invT = 1.0 / s.temperature;

  // Largest key with at least topK tokens at or above it: the k-th largest logit's key.
  var cut = 0u;
  if (s.topK > 0u && s.topK < ${vocab}u) {
    for (var bit = 32u; bit > 0u; bit--) {
      let candidate = cut | (1u << (bit - 1u));
      if (countAtLeast(lid, base, candidate) >= s.topK) { cut = candidate; }
    }
  }
  // Largest key whose tokens at or above it (within the top-k cut) still carry topP of the mass.
  if (s.topP < 1.0) {
    let mass = massAtLeast(lid, base, cut, invT);
    if (lid == 0u) { rowGoal = s.topP * mass; }
    var pCut = 0u;
    for (var bit = 32u; bit > 0u; bit--) {
      let candidate = pCut | (1u << (bit - 1u));
      if (massAtLeast(lid, base, max(candidate, cut), invT) >= rowGoal) { pCut = candidate; }
    }
    cut = max(cut, pCut);
  }

  // Each lane owns a contiguous chunk; an exclusive scan of chunk masses finds the lane holding the draw.
  let first = min(lid * ${chunk}u, ${vocab}u);
  let end = min(first + ${chunk}u, ${vocab}u);
  let top = rowTop;
  var mine = 0.0;
  var mineLast = ${NONE};
  for (var i = first; i < end; i++) {
    let x = logits[base + i];
    if (orderKey(x) >= cut) { mine += exp((x - top) * invT); mineLast = i; }
  }
  if (lid == 0u) {
    atomicStore(&found, ${NONE});
    atomicStore(&lastKept, 0u);
  }
  sums[lid] = mine;
  workgroupBarrier();
  if (lid == 0u) {
    var scan = 0.0;
    for (var t = 0u; t < ${WORKGROUP}u; t++) {
      let c = sums[t];
      sums[t] = scan;
      scan += c;
    }
    indices[0] = bitcast<u32>(scan);
  }
  workgroupBarrier();
  let draw = f32(pcg(pcg(s.seed) ^ s.step) >> 8u) / 16777216.0 * bitcast<f32>(indices[0]);
  if (mineLast != ${NONE}) { atomicMax(&lastKept, mineLast); }
  var running = sums[lid];
  if (running <= draw && draw < running + mine) {
    for (var i = first; i < end; i++) {
      let x = logits[base + i];
      if (orderKey(x) >= cut) {
        running += exp((x - top) * invT);
        if (running > draw) {
          atomicMin(&found, i);
          break;
        }
      }
    }
  }
  workgroupBarrier();
  if (lid == 0u) {
    let pick = atomicLoad(&found);
    // Rounding can leave the draw just past the last kept token's cumulative weight.
    tokens[row] = select(pick, atomicLoad(&lastKept), pick == ${NONE});
  }
}`,
    dispatch: { grid: { param: "rows" } },
  });
}
