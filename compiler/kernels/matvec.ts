// Skinny matrix product for decode and logits: y[M, N] = x[M, K] w[N, K]^T (+ residual) for M <= 8.
//   bindings: x (read, f32[M, K]), w (read, f32[N, K]), [residual (read, f32[M, S])], y (read_write, f32[M, S])
//   params:   rows (M, at most MATVEC_MAX_ROWS), and with `stride`, column (where the N columns start in y)
// S is `stride` for a row block of a split weight (see MatmulConstants.stride), else N.
// Memory-bound, so each weight row is streamed once for all M rows: a workgroup owns 8 output columns,
// 32 invocations per column stride along K in vec4 steps, and the partial sums meet in workgroup memory.
import type { KernelSource } from "./kernel.ts";
import { outputLayout, type MatmulConstants } from "./matmul.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, grid, kernelSource, vec4Rows } from "./wgsl.ts";

/** As MatmulConstants: K inputs, N outputs, the residual epilogue, and y's row width for a row block. */
export type MatvecConstants = MatmulConstants;

/** Most rows one matvec dispatch handles; larger batches use the matmul kernel. */
export const MATVEC_MAX_ROWS = 8;
const COLUMNS = 8; // output columns per workgroup
const LANES = 32; // invocations per column
const WORKGROUP = COLUMNS * LANES;

export function matvecKernel({ K, N, residual, stride }: MatvecConstants): KernelSource {
  const x = vec4Rows("x", K);
  const w = vec4Rows("w", K);
  const out = outputLayout(N, stride);
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

var<workgroup> partial: array<f32, ${MATVEC_MAX_ROWS * WORKGROUP}>;

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let col = ${LINEAR_GROUP} * ${COLUMNS}u + lid / ${LANES}u;
  let lane = lid % ${LANES}u;
  let rows = min(params.rows, ${MATVEC_MAX_ROWS}u);
  var acc: array<f32, ${MATVEC_MAX_ROWS}>;
  if (col < ${N}u) {
    for (var q = lane; q < ${x.quads}u; q += ${LANES}u) {
      let wv = load_w(col, q);
      for (var r = 0u; r < rows; r++) { acc[r] += dot(load_x(r, q), wv); }
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
  // Lane r of each column writes row r.
  if (col < ${N}u && lane < rows) {
    let at = ${out.index("lane", "col")};
    y[at] = partial[lane * ${WORKGROUP}u + lid - lane]${residual ? " + residual[at]" : ""};
  }
}`,
    dispatch: (p) => {
      const rows = p.rows ?? 0;
      if (rows > MATVEC_MAX_ROWS) throw new Error(`matvec handles at most ${MATVEC_MAX_ROWS} rows, got ${rows} (use matmul)`);
      return grid(rows === 0 ? 0 : Math.ceil(N / COLUMNS));
    },
  });
}
