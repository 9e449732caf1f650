// Writes router gates into the engine's gate table, the layout the LoRA kernels read: one row per
// token of the step, one column per (layer, module) (column base + module index). The router's gate
// kernel leaves one row of E gates per item (a routed prompt, or a token routed alone); each row of
// the step names its item, or NO_SEQUENCE to be left alone.
//   bindings: itemGates (read, f32[items, E]), rowItem (read, u32[rows]), table (read_write, f32[rows, stride])
//   params:   rows, stride, base
// Expert e of the router goes to column base + columns[e], so a router over a subset of the seven
// modules lands in the right columns; the other columns of the layer are set to 0 for routed rows.
import type { KernelSource } from "./kernel.ts";
import { NO_SEQUENCE } from "./router.ts";
import { GROUP_BUILTINS, LINEAR_GROUP, grid, kernelSource } from "./wgsl.ts";

export interface GateTableConstants {
  /** Table column (module index within the layer) of each of the router's experts, in gate order. */
  readonly columns: readonly number[];
  /** Columns per layer in the table. */
  readonly width: number;
}

const WORKGROUP = 64;

export function gateTableKernel({ columns, width }: GateTableConstants): KernelSource {
  const E = columns.length;
  if (E < 1 || columns.some((c) => !Number.isInteger(c) || c < 0 || c >= width) || new Set(columns).size !== E)
    throw new Error(`gate table: expert columns [${columns.join(", ")}] must be distinct columns below ${width}`);
  // For each table column of the layer, the expert that fills it (E for none: gate 0).
  const expertOf = Array.from({ length: width }, (_, c) => (columns.includes(c) ? columns.indexOf(c) : E));
  return kernelSource({
    name: "gate_table",
    constants: { columns: columns.join("-"), width },
    storage: [
      { name: "itemGates", access: "read", type: "array<f32>" },
      { name: "rowItem", access: "read", type: "array<u32>" },
      { name: "table", access: "read_write", type: "array<f32>" },
    ],
    params: [
      { name: "rows", type: "u32" },
      { name: "stride", type: "u32" },
      { name: "base", type: "u32" },
    ],
    body: /* wgsl */ `
const EXPERT_OF = array<u32, ${width}>(${expertOf.map((e) => `${e}u`).join(", ")});

@compute @workgroup_size(${WORKGROUP})
fn main(${GROUP_BUILTINS}) {
  let i = ${LINEAR_GROUP} * ${WORKGROUP}u + lid;
  if (i >= params.rows * ${width}u) { return; }
  let row = i / ${width}u;
  let item = rowItem[row];
  if (item == ${NO_SEQUENCE}u) { return; }
  let e = EXPERT_OF[i % ${width}u];
  table[row * params.stride + params.base + i % ${width}u] = select(0.0, itemGates[item * ${E}u + min(e, ${E - 1}u)], e < ${E}u);
}`,
    dispatch: (p) => grid(Math.ceil(((p.rows ?? 0) * width) / WORKGROUP)),
  });
}
