// Skinny matrix product for decode and small batches: y[M, N] = x[M, K] w[N, K]^T (+ residual).
//   bindings: x (read, f32[M, K]), w (read, [N, K] in the `weights` format), [residual (read, f32[M, S])], y (read_write, f32[M, S])
//   params:   rows (M), and with `stride`, column (where the N columns start in y)
// S is `stride` for a row block of a split weight (see MatmulConstants.stride), else N.
// Each invocation computes 4 output columns, so one read of x serves 4 weight rows, reading the
// weights a unit at a time (weight-rows.ts: 4 f32, 8 f16, 16 q8 or 32 q4 elements, one 16-byte load,
// dequantised in registers). `lanes` invocations share a column group, striding along K, and meet in
// workgroup memory; lanes are few (at least 64 units each, at most 8 lanes), because on llvmpipe each
// invocation's fixed cost outweighs the parallelism (docs/performance.md, "Weight formats").
// Rows go in groups of MATVEC_GROUP_ROWS, every row's accumulator a named register (a loop over rows
// indexing an array of them put them in memory on llvmpipe, 3-4x slower); a group after the first
// re-reads the weight rows from cache, so M rows cost one pass over the weights plus M dot products,
// where the 64-row matmul tile would compute (and waste) 64 rows. One row, the decode step, has its
// own path: a group of one, without the other rows' guards.
import type { KernelSource } from "./kernel.ts";
import { linearKeyConstants, outputLayout, type MatmulConstants } from "./matmul.ts";
import { NO_ADAPTER, loraRowColumns } from "../../runtime/gpu/layouts.ts";
import { weightUnits } from "./weight-rows.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, kernelSource, vec4Rows } from "./wgsl.ts";

/**
 * As MatmulConstants (K inputs, N outputs, the residual epilogue, y's row width for a row block, w's
 * format), and `loraRank`: the LoRA epilogue (loraEpilogue) with t rows of that largest rank.
 */
export interface MatvecConstants extends MatmulConstants {
  readonly loraRank?: number;
}

/** Rows one pass over the weight rows accumulates (a register per row and column). */
export const MATVEC_GROUP_ROWS = 8;
const PER_INVOCATION = 4; // output columns per invocation
const WORKGROUP = 64;
const MIN_UNITS_PER_LANE = 64;
const MAX_LANES = 8;

/** Invocations per column group: a power of two up to 8 giving each at least 64 units of K. */
function lanesFor(units: number): number {
  let lanes = 1;
  while (lanes < MAX_LANES && units >= 2 * lanes * MIN_UNITS_PER_LANE) lanes *= 2;
  return lanes;
}

/**
 * The LoRA update of a module in the matvec's epilogue, so that decode runs a module's LoRA as its
 * shrink and this one kernel instead of a third dispatch (lora.ts's expand, whose formula it is):
 * y = W x + g s B t, or for a DoRA slot (d != 1) (1 + g (d - 1)) W x + d g s B t, from the row info the
 * shrink wrote after the row's t (slot, gate, scaling, rank; slot NO_ADAPTER: the row adds nothing,
 * and y is bit for bit the plain matvec's). Bindings t (words [rows, loraRowColumns]: f32 bits, the
 * slot and rank as integers), b ([slots, N, R]) and dora ([slots, N]). Only for a whole weight: a row
 * block (a split weight) keeps the expand kernel.
 * Both terms are linear in each lane's partial sum, so every lane scales its own partial of W x and adds
 * its share of the rank loop (ranks lane, lane + lanes, ...) before the lanes meet: the rank loop runs
 * `lanes` ways in parallel, four columns per read of t, instead of one column after another after
 * the reduction (1.6-2.7x the plain matvec at rank 32 on llvmpipe, docs/performance.md).
 */
function loraEpilogue(N: number, R: number, lanes: number): string {
  const T = loraRowColumns(R, true);
  const infoAt = 4 * Math.ceil(R / 4);
  const cols = Array.from({ length: PER_INVOCATION }, (_, c) => c);
  return /* wgsl */ `
fn with_lora(row: u32, col: u32, lane: u32, wx: vec4<f32>) -> vec4<f32> {
  let info = row * ${T}u + ${infoAt}u;
  let s = t[info];
  if (s == ${NO_ADAPTER}u) { return wx; }
  let gate = bitcast<f32>(t[info + 1u]);
  let rank = t[info + 3u];
  ${cols.map((c) => `let b${c} = (s * ${N}u + min(col + ${c}u, ${N - 1}u)) * ${R}u;`).join(" ")}
  var acc = vec4<f32>(0.0);
  for (var j = lane; j < rank; j += ${lanes}u) {
    acc += bitcast<f32>(t[row * ${T}u + j]) * vec4<f32>(${cols.map((c) => `b[b${c} + j]`).join(", ")});
  }
  let d = vec4<f32>(${cols.map((c) => `dora[s * ${N}u + min(col + ${c}u, ${N - 1}u)]`).join(", ")});
  return (1.0 + gate * (d - 1.0)) * wx + d * (gate * bitcast<f32>(t[info + 2u])) * acc;
}`;
}

export function matvecKernel(constants: MatvecConstants): KernelSource {
  const { K, N, residual, stride, loraRank } = constants;
  if (loraRank !== undefined && stride !== undefined) throw new Error("matvec kernel: the LoRA epilogue is for a whole weight, not a row block");
  const x = vec4Rows("x", K);
  const w = weightUnits(constants.weights ?? "f32", K);
  const out = outputLayout(N, stride);
  const lanes = lanesFor(w.count);
  const columnsPerGroup = (WORKGROUP / lanes) * PER_INVOCATION;
  const Q = w.quadsPerLoad;
  const cols = Array.from({ length: PER_INVOCATION }, (_, c) => c);
  // The last unit may reach past x's row when K is not a multiple of the unit: read zeros there.
  const padded = w.count * Q > x.quads;
  const xQuad = (row: string, i: number) => `${padded ? "load_x_padded" : "load_x"}(${row}, u * ${Q}u + ${i}u)`;
  const wQuad = (c: number, i: number) => (Q === 1 ? `w${c}` : `w${c}[${i}]`);
  const write = (row: string, sums: string) => `for (var c = 0u; c < ${PER_INVOCATION}u; c++) {
          if (col + c < ${N}u) {
            let at = ${out.index(row, "(col + c)")};
            y[at] = ${sums}[c]${residual ? " + residual[at]" : ""};
          }
        }`;
  // One barrier, then lane l sums rows l, l + lanes, ... over the group's lanes.
  const reduce = `    workgroupBarrier();
    for (var r = lane; r < rows; r += ${lanes}u) {
      let at0 = r * ${WORKGROUP}u + lid - lane;
      let sums = ${Array.from({ length: lanes }, (_, l) => `partial[at0 + ${l}u]`).join(" + ")};
      ${write("(first + r)", "sums")}
    }
    // The next group overwrites partial.
    workgroupBarrier();`;
  /** Rows first .. first + G - 1 (`rows` of them present) against every weight row once. */
  const pass = (G: number) => {
    const rs = Array.from({ length: G }, (_, r) => r);
    const accumulate = rs.map((r) => {
      const xs = Array.from({ length: Q }, (_, i) => `let x${r}_${i} = ${xQuad(`first + ${r}u`, i)};`).join(" ");
      const dots = cols.map((c) => {
        const sum = Array.from({ length: Q }, (_, i) => `dot(x${r}_${i}, ${wQuad(c, i)})`).join(" + ");
        return w.scaled ? `d${c} * (${sum})` : sum;
      });
      const add = `${xs}\n        acc${r} += vec4<f32>(${dots.join(", ")});`;
      return G === 1 ? `      ${add}` : `      if (${r}u < rows) {\n        ${add}\n      }`;
    });
    const loop = `${rs.map((r) => `var acc${r} = vec4<f32>(0.0);`).join(" ")}
    for (var u = lane; u < ${w.count}u; u += ${lanes}u) {
      ${cols.map((c) => `let w${c} = load_w(wRow${c}, u);${w.scaled ? ` let d${c} = scale_w(wRow${c}, u);` : ""}`).join(" ")}
${accumulate.join("\n")}
    }`;
    if (loraRank !== undefined && G === 1) {
      const epilogue = `${loop}\n    acc0 = with_lora(first, col, lane, acc0);`;
      if (lanes === 1) return `${epilogue}\n    ${write("first", "acc0")}`;
      return `${epilogue}\n    partial[lid] = acc0;\n${reduce}`;
    }
    if (loraRank !== undefined) {
      // A group's rows go through one copy of the epilogue, a loop over their partials in workgroup
      // memory (each invocation its own): eight inlined copies made the whole kernel 10-15% slower on
      // llvmpipe, even its one-row path.
      const epilogue = `${loop}
    ${rs.map((r) => `partial[${r * WORKGROUP}u + lid] = acc${r};`).join(" ")}
    for (var r = 0u; r < rows; r++) {
      let at = r * ${WORKGROUP}u + lid;
      partial[at] = with_lora(first + r, col, lane, partial[at]);
    }`;
      if (lanes > 1) return `${epilogue}\n${reduce}`;
      return `${epilogue}
    for (var r = 0u; r < rows; r++) {
      let sums = partial[r * ${WORKGROUP}u + lid];
      ${write("(first + r)", "sums")}
    }`;
    }
    if (lanes === 1) {
      return `${loop}
    ${rs.map((r) => (G === 1 ? write(`first`, `acc${r}`) : `if (${r}u < rows) {\n      ${write(`(first + ${r}u)`, `acc${r}`)}\n    }`)).join("\n    ")}`;
    }
    return `${loop}
    ${rs.map((r) => `partial[${r * WORKGROUP}u + lid] = acc${r};`).join(" ")}
${reduce}`;
  };
  return kernelSource({
    name: "matvec",
    constants: { ...linearKeyConstants(constants), ...(loraRank === undefined ? {} : { loraRank }) },
    storage: [
      x.decl,
      w.decl,
      ...(residual ? [{ name: "residual", access: "read" as const, type: "array<f32>" }] : []),
      ...(loraRank === undefined
        ? []
        : [
            { name: "t", access: "read" as const, type: "array<u32>" },
            { name: "b", access: "read" as const, type: "array<f32>" },
            { name: "dora", access: "read" as const, type: "array<f32>" },
          ]),
      { name: "y", access: "read_write", type: "array<f32>" },
    ],
    params: [{ name: "rows", type: "u32" }, ...out.params],
    body: /* wgsl */ `
${x.wgsl}
${padded ? `fn load_x_padded(row: u32, quad: u32) -> vec4<f32> {\n  return select(vec4<f32>(0.0), load_x(row, min(quad, ${x.quads - 1}u)), quad < ${x.quads}u);\n}` : ""}
${w.wgsl}${loraRank === undefined ? "" : `\n${loraEpilogue(N, loraRank, lanes)}`}
${lanes > 1 || loraRank !== undefined ? `\nvar<workgroup> partial: array<vec4<f32>, ${MATVEC_GROUP_ROWS * WORKGROUP}>;\n` : ""}
@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let col = ${LINEAR_GROUP} * ${columnsPerGroup}u + (lid / ${lanes}u) * ${PER_INVOCATION}u;
  let lane = lid % ${lanes}u;
  // Columns past N read the last weight row (their sums are not written), so loads stay in the tensor.
  ${cols.map((c) => `let wRow${c} = min(col + ${c}u, ${N - 1}u);`).join(" ")}
  if (params.rows == 1u) {
    let first = 0u;
    let rows = 1u;
    ${pass(1)}
  } else {
    for (var first = 0u; first < params.rows; first += ${MATVEC_GROUP_ROWS}u) {
      let rows = min(params.rows - first, ${MATVEC_GROUP_ROWS}u);
    ${pass(MATVEC_GROUP_ROWS)}
    }
  }
}`,
    dispatch: { grid: Math.ceil(N / columnsPerGroup), emptyWhenZero: "rows" },
  });
}
