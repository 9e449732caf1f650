// The gate-table kernel: a router's per-item gates land in the engine's [rows, layers * 7] table at
// the router's module columns, for the rows that name an item, and nothing else changes.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { gateTableKernel } from "../../../compiler/kernels/gate-table.ts";
import { NO_SEQUENCE } from "../../../compiler/kernels/router.ts";
import { openGpu, randomFloats, runOnce, seeded } from "./gpu-check.ts";

const gpu = await openGpu();
const random = seeded(5);

test("a 3-expert router (modules 1, 4, 6) writes layer 1's columns of its rows; other rows and layers are untouched", async () => {
  const columns = [1, 4, 6];
  const width = 7;
  const stride = 14; // two layers
  const base = 7; // layer 1
  const rowItem = new Uint32Array([0, NO_SEQUENCE, 1, 0]);
  const itemGates = randomFloats(random, 2 * columns.length);
  const table = randomFloats(random, rowItem.length * stride, 5);
  const want = Float32Array.from(table);
  rowItem.forEach((item, row) => {
    if (item === NO_SEQUENCE) return;
    for (let c = 0; c < width; c++) {
      const e = columns.indexOf(c);
      want[row * stride + base + c] = e < 0 ? 0 : itemGates[item * columns.length + e]!;
    }
  });
  const out = await runOnce(gpu, gateTableKernel({ columns, width }), { itemGates, rowItem, table }, { rows: rowItem.length, stride, base }, ["table"]);
  assert.equal(Array.from(out.table!), Array.from(want));
});

test("columns must be distinct and inside the layer", () => {
  assert.throws(() => gateTableKernel({ columns: [1, 1], width: 7 }), /distinct columns below 7/);
  assert.throws(() => gateTableKernel({ columns: [7], width: 7 }), /distinct columns below 7/);
});

test.after(() => gpu.context.destroy());
test.run();
