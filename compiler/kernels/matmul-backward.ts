// Input gradient of a linear layer through a frozen weight: dx[M, K] (+)= dy[M, N] w[N, K], the
// backward of matmul.ts / matvec.ts (y = x w^T). No weight gradient: the base is frozen.
//   bindings: dy (read, f32[M, S]), w (read, [N, K] in the `weights` format), dx (read_write, f32[M, K])
//   params:   rows (M), and with `stride`, column (where w's N columns start in dy)
// S is `stride` when w is a row block of a split weight (as MatmulConstants.stride): the block reads its
// N columns of the whole dy in place, and the blocks after the first accumulate into dx.
// With `accumulate`, dx += the product (the residual stream sums the gradients of its branches).
// Register-tiled like matmul.ts, but the reduction runs over w's rows: a workgroup of 16x16 invocations
// computes a 64x64 block of dx, each invocation 4 rows (ty + 16i) by 4 adjacent columns (4tx..4tx+3),
// from a 64x16 dy tile (vec4 along N) and a 16x64 w tile (vec4 along K) in workgroup memory. An f16 or
// q8 weight is dequantised as its tile is staged (weight-rows.ts, as the forward matmul does), so
// training over a base stored in fewer bytes reads the same values its forward product used.
import type { KernelSource } from "./kernel.ts";
import { outputLayout } from "./matmul.ts";
import { weightQuads, type PackedWeightFormat } from "./weight-rows.ts";
import { kernelSource } from "./wgsl.ts";

export interface MatmulBackwardConstants {
  /** Input features: columns of w and dx. */
  readonly K: number;
  /** Output features: rows of w, the columns of dy this kernel reads. */
  readonly N: number;
  /** dx += dy w instead of dx = dy w. */
  readonly accumulate: boolean;
  /** Row width of dy when w is a row block of a wider weight (its columns start at params.column). */
  readonly stride?: number;
  /** w's storage format when packed (runtime/package/format.ts WEIGHT_FORMATS); absent for f32. */
  readonly weights?: PackedWeightFormat;
}

const THREADS = 16;
const TILE = 64; // rows and columns of dx per workgroup
const TILE_N = 16; // reduction step

export function matmulInputGradKernel({ K, N, accumulate, stride, weights }: MatmulBackwardConstants): KernelSource {
  for (const [name, v] of Object.entries({ K, N }))
    if (!Number.isInteger(v) || v < 1) throw new Error(`matmul backward: ${name} must be a positive integer, got ${v}`);
  const w = weightQuads(weights ?? "f32", K);
  const dyLayout = outputLayout(N, stride);
  // dy read four columns at a time, as vec4 when its rows are whole and 4-aligned, else lane by lane.
  const dyVec = stride === undefined && N % 4 === 0;
  const loadDy = dyVec
    ? `return dy[(row * ${N}u + n) / 4u];`
    : `var v = vec4<f32>(0.0);
  let at = ${dyLayout.index("row", "n")};
  if (n < ${N}u) { v.x = dy[at]; }
  if (n + 1u < ${N}u) { v.y = dy[at + 1u]; }
  if (n + 2u < ${N}u) { v.z = dy[at + 2u]; }
  if (n + 3u < ${N}u) { v.w = dy[at + 3u]; }
  return v;`;
  return kernelSource({
    name: "matmul_dx",
    constants: { K, N, accumulate, ...(stride === undefined ? {} : { stride }), ...(weights === undefined ? {} : { weights }) },
    storage: [
      { name: "dy", access: "read", type: dyVec ? "array<vec4<f32>>" : "array<f32>" },
      w.decl,
      { name: "dx", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }, ...dyLayout.params],
    body: /* wgsl */ `
${w.wgsl}

// dy[row, n..n+3] (zero past N), n a multiple of 4.
fn load_dy(row: u32, n: u32) -> vec4<f32> {
  ${loadDy}
}

var<workgroup> dyTile: array<vec4<f32>, ${TILE * (TILE_N / 4)}>; // [64 rows][4 quads of n]
var<workgroup> wTile: array<vec4<f32>, ${TILE_N * (TILE / 4)}>; // [16 n][16 quads of k]

@compute @workgroup_size(${THREADS * THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let row0 = wg.y * ${TILE}u;
  let quad0 = wg.x * ${TILE / 4}u;
  let tx = lid % ${THREADS}u;
  let ty = lid / ${THREADS}u;
  let dyRow = row0 + lid / 4u;
  let dyQuad = lid % 4u;
  let wRow = lid / ${TILE / 4}u;
  let wQuad = quad0 + lid % ${TILE / 4}u;
  var acc: array<vec4<f32>, 4>;
  for (var n0 = 0u; n0 < ${N}u; n0 += ${TILE_N}u) {
    var dv = vec4<f32>(0.0);
    var wv = vec4<f32>(0.0);
    if (dyRow < params.rows) { dv = load_dy(dyRow, n0 + dyQuad * 4u); }
    if (n0 + wRow < ${N}u && wQuad < ${w.count}u) { wv = load_w(n0 + wRow, wQuad); }
    dyTile[lid] = dv;
    wTile[lid] = wv;
    workgroupBarrier();
    for (var q = 0u; q < 4u; q++) {
      let b0 = wTile[(q * 4u) * ${TILE / 4}u + tx];
      let b1 = wTile[(q * 4u + 1u) * ${TILE / 4}u + tx];
      let b2 = wTile[(q * 4u + 2u) * ${TILE / 4}u + tx];
      let b3 = wTile[(q * 4u + 3u) * ${TILE / 4}u + tx];
      for (var i = 0u; i < 4u; i++) {
        let a = dyTile[(ty + i * ${THREADS}u) * 4u + q];
        acc[i] += a.x * b0 + a.y * b1 + a.z * b2 + a.w * b3;
      }
    }
    workgroupBarrier();
  }
  let col0 = (quad0 + tx) * 4u;
  for (var i = 0u; i < 4u; i++) {
    let row = row0 + ty + i * ${THREADS}u;
    if (row >= params.rows) { break; }
    for (var j = 0u; j < 4u; j++) {
      let col = col0 + j;
      if (col < ${K}u) {
        let at = row * ${K}u + col;
        dx[at] = acc[i][j]${accumulate ? " + dx[at]" : ""};
      }
    }
  }
}`,
    // Row tiles in y (at most 65535 of them: workgroups() refuses more); no rows, no work.
    dispatch: { groups: [Math.ceil(K / TILE), { param: "rows", per: TILE }, 1], emptyWhenZero: "rows" },
  });
}
