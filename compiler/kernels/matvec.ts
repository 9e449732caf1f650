// Skinny matrix product for decode and small batches: y[M, N] = x[M, K] w[N, K]^T (+ residual).
//   bindings: x (read, f32[M, K]), w (read, f32[N, K]), [residual (read, f32[M, S])], y (read_write, f32[M, S])
//   params:   rows (M), and with `stride`, column (where the N columns start in y)
// S is `stride` for a row block of a split weight (see MatmulConstants.stride), else N.
// Bound by weight reads on a GPU, so each weight row is streamed once for all M rows: a workgroup owns
// 32 output columns, 8 invocations per column stride along K in vec4 steps, and the partial sums meet
// in workgroup memory.
// (8 lanes rather than 32: three reduction steps instead of five, 0.5-0.7x the time of a step on
// llvmpipe at 1 to 32 rows, docs/performance.md "Decode batches".)
// Rows go in groups of MATVEC_GROUP_ROWS, each indexed from its group's first row; a group after the
// first re-reads the workgroup's 32 weight rows from cache, so M rows cost one pass over the weights
// plus M dot products, where the 64-row matmul tile would compute (and waste) 64 rows.
import type { KernelSource } from "./kernel.ts";
import { outputLayout, type MatmulConstants } from "./matmul.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource, vec4Rows } from "./wgsl.ts";

/** As MatmulConstants: K inputs, N outputs, the residual epilogue, and y's row width for a row block. */
export type MatvecConstants = MatmulConstants;

/** Rows one pass over a workgroup's weight rows accumulates (registers and workgroup memory per row). */
export const MATVEC_GROUP_ROWS = 8;
const COLUMNS = 32; // output columns per workgroup
const LANES = 8; // invocations per column, at least MATVEC_GROUP_ROWS (lane r writes row r)
const WORKGROUP = COLUMNS * LANES;

export function matvecKernel({ K, N, residual, stride }: MatvecConstants): KernelSource {
  const x = vec4Rows("x", K);
  const w = vec4Rows("w", K);
  const out = outputLayout(N, stride);
  const G = MATVEC_GROUP_ROWS;
  return kernelSource({
    name: "matvec",
    constants: { K, N, residual, ...(stride === undefined ? {} : { stride }) },
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

var<workgroup> partial: array<f32, ${G * WORKGROUP}>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let col = ${LINEAR_GROUP} * ${COLUMNS}u + lid / ${LANES}u;
  let lane = lid % ${LANES}u;
  for (var first = 0u; first < params.rows; first += ${G}u) {
    let rows = min(params.rows - first, ${G}u);
    var acc: array<f32, ${G}>;
    if (col < ${N}u) {
      for (var q = lane; q < ${x.quads}u; q += ${LANES}u) {
        let wv = load_w(col, q);
        for (var r = 0u; r < rows; r++) { acc[r] += dot(load_x(first + r, q), wv); }
      }
    }
    for (var r = 0u; r < rows; r++) { partial[r * ${WORKGROUP}u + lid] = acc[r]; }
    for (var stride = ${LANES / 2}u; stride > 0u; stride /= 2u) {
      workgroupBarrier();
      if (lane < stride) {
        for (var r = 0u; r < rows; r++) {
          partial[r * ${WORKGROUP}u + lid] += partial[r * ${WORKGROUP}u + lid + stride];
        }
      }
    }
    workgroupBarrier();
    // Lane r of each column writes row first + r.
    if (col < ${N}u && lane < rows) {
      let at = ${out.index("(first + lane)", "col")};
      y[at] = partial[lane * ${WORKGROUP}u + lid - lane]${residual ? " + residual[at]" : ""};
    }
    // The next group overwrites partial.
    workgroupBarrier();
  }
}`,
    dispatch: { grid: Math.ceil(N / COLUMNS), emptyWhenZero: "rows" },
  });
}
