// Matrix product for prefill: y[M, N] = x[M, K] w[N, K]^T (+ residual[M, N] when `residual`).
//   bindings: x (read, f32[M, K]), w (read, [N, K] in the `weights` format), [residual (read, f32[M, S])], y (read_write, f32[M, S])
//   params:   rows (M), and with `stride`, column (where the N columns start in y)
// S is `stride` for a row block of a split weight, whose columns land straight in their place in y, else N.
// Register-tiled: a workgroup of 16x16 invocations computes a 64x64 block of y, each invocation a 4x4
// sub-block (rows ty + 16i, columns tx + 16j) from x and w tiles staged in workgroup memory as vec4 along K.
// An f16 or q8 weight is dequantised as it is staged (weight-rows.ts), so the tile loop is f32 throughout.
import type { KernelParam, KernelSource } from "./kernel.ts";
import { weightQuads, type PackedWeightFormat } from "./weight-rows.ts";
import { kernelSource, vec4Rows } from "./wgsl.ts";

export interface MatmulConstants {
  /** Input features (columns of x and w). */
  readonly K: number;
  /** Output features (rows of w, columns of y). */
  readonly N: number;
  /** Add `residual` to the product in the epilogue. */
  readonly residual: boolean;
  /**
   * Row width of y (and residual) when w is a row block of a wider weight: the block's N columns go to
   * columns params.column .. column + N - 1. Absent when w is the whole weight (y is [M, N]).
   */
  readonly stride?: number;
  /** w's storage format when packed (runtime/package/format.ts WEIGHT_FORMATS); absent for f32. */
  readonly weights?: PackedWeightFormat;
}

/** The constants as they enter a kernel's key: the optional ones only when given. */
export function linearKeyConstants({ K, N, residual, stride, weights }: MatmulConstants): Record<string, number | boolean | string> {
  return { K, N, residual, ...(stride === undefined ? {} : { stride }), ...(weights === undefined ? {} : { weights }) };
}

/**
 * Where output (row, col) of a linear kernel lives in y and residual: row * N + col for a whole weight,
 * row * stride + column + col for a row block, with `column` a param so that all blocks of one height
 * share a kernel.
 */
export function outputLayout(N: number, stride: number | undefined): { params: KernelParam[]; index(row: string, col: string): string } {
  if (stride === undefined) return { params: [], index: (row, col) => `${row} * ${N}u + ${col}` };
  if (!Number.isInteger(stride) || stride < N) throw new Error(`a row block of ${N} outputs needs a row stride of at least ${N}, got ${stride}`);
  return { params: [{ name: "column", type: "u32" }], index: (row, col) => `${row} * ${stride}u + params.column + ${col}` };
}

const THREADS = 16; // per side of the workgroup
const PER_THREAD = 4; // outputs per side of each invocation
const TILE = THREADS * PER_THREAD; // 64 rows and 64 columns per workgroup
const TILE_K_QUADS = 4; // K tile of 16 values as 4 vec4

export function matmulKernel(constants: MatmulConstants): KernelSource {
  const { K, N, residual, stride } = constants;
  const x = vec4Rows("x", K);
  const w = weightQuads(constants.weights ?? "f32", K);
  const columnBlocks = Math.ceil(N / TILE);
  const out = outputLayout(N, stride);
  return kernelSource({
    name: "matmul",
    constants: linearKeyConstants(constants),
    storage: [
      x.decl,
      w.decl,
      ...(residual ? [{ name: "residual", access: "read" as const, type: "array<f32>" }] : []),
      { name: "y", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }, ...out.params],
    body: /* wgsl */ `
${x.wgsl}
${w.wgsl}

var<workgroup> xTile: array<vec4<f32>, ${TILE * TILE_K_QUADS}>;
var<workgroup> wTile: array<vec4<f32>, ${TILE * TILE_K_QUADS}>;

@compute @workgroup_size(${THREADS * THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let row0 = wg.y * ${TILE}u;
  let col0 = wg.x * ${TILE}u;
  let tx = lid % ${THREADS}u;
  let ty = lid / ${THREADS}u;
  // Each invocation stages one vec4 of each tile: tile row lid / 4, quad lid % 4.
  let stageRow = lid / ${TILE_K_QUADS}u;
  let stageQuad = lid % ${TILE_K_QUADS}u;
  var acc: array<vec4<f32>, ${PER_THREAD}>;
  for (var k0 = 0u; k0 < ${x.quads}u; k0 += ${TILE_K_QUADS}u) {
    let quad = k0 + stageQuad;
    let xRow = row0 + stageRow;
    let wRow = col0 + stageRow;
    var xv = vec4<f32>(0.0);
    var wv = vec4<f32>(0.0);
    if (xRow < params.rows && quad < ${x.quads}u) { xv = load_x(xRow, quad); }
    if (wRow < ${N}u && quad < ${x.quads}u) { wv = load_w(wRow, quad); }
    xTile[lid] = xv;
    wTile[lid] = wv;
    workgroupBarrier();
    for (var q = 0u; q < ${TILE_K_QUADS}u; q++) {
      let b0 = wTile[(tx) * ${TILE_K_QUADS}u + q];
      let b1 = wTile[(tx + ${THREADS}u) * ${TILE_K_QUADS}u + q];
      let b2 = wTile[(tx + ${2 * THREADS}u) * ${TILE_K_QUADS}u + q];
      let b3 = wTile[(tx + ${3 * THREADS}u) * ${TILE_K_QUADS}u + q];
      for (var i = 0u; i < ${PER_THREAD}u; i++) {
        let a = xTile[(ty + i * ${THREADS}u) * ${TILE_K_QUADS}u + q];
        acc[i] += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
      }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < ${PER_THREAD}u; i++) {
    let row = row0 + ty + i * ${THREADS}u;
    if (row >= params.rows) { break; }
    for (var j = 0u; j < ${PER_THREAD}u; j++) {
      let col = col0 + tx + j * ${THREADS}u;
      if (col < ${N}u) {
        let at = ${out.index("row", "col")};
        y[at] = acc[i][j]${residual ? " + residual[at]" : ""};
      }
    }
  }
}`,
    // Row tiles in y (at most 65535 of them: workgroups() refuses more); no rows, no work.
    dispatch: { groups: [columnBlocks, { param: "rows", per: TILE }, 1], emptyWhenZero: "rows" },
  });
}
