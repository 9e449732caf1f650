// Weights with NaN or infinity are refused when an adapter loads, naming the file, tensor and element
// (the base checkpoint's check is in engine.test.ts, where the engine uploads it).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { randomCheckpointBase } from "../../../examples/random-checkpoint.ts";
import { writeRandomPeftAdapter } from "../../../examples/random-adapter.ts";
import { ADAPTER_WEIGHTS_FILE, loadAdapter } from "../../../runtime/formats/adapter.ts";
import { firstNonFinite } from "../../../runtime/formats/finite.ts";
import { CheckpointError, SafetensorsFile, writeSafetensors } from "../../../runtime/formats/safetensors.ts";

const root = mkdtempSync(join(tmpdir(), "milora-finite-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

test("firstNonFinite finds NaN and both infinities, and passes the largest finite floats", () => {
  assert.is(firstNonFinite(Float32Array.from([0, -0, 3.4028234e38, -3.4028234e38, 1e-45])), -1);
  assert.is(firstNonFinite(Float32Array.from([1, 2, NaN])), 2);
  assert.is(firstNonFinite(Float32Array.from([Infinity, 1])), 0);
  assert.is(firstNonFinite(Float32Array.from([1, -Infinity])), 1);
});

test("an adapter with an infinity in lora_B is refused, naming the file, tensor and element", () => {
  const base = randomCheckpointBase({ hiddenSize: 16, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 24, vocabSize: 40, seed: 3 });
  const dir = join(root, "adapter");
  writeRandomPeftAdapter(dir, { base, modules: ["q_proj", "v_proj"], rank: 4, alpha: 8, seed: 5 });
  const path = join(dir, ADAPTER_WEIGHTS_FILE);
  const file = SafetensorsFile.open(path);
  const target = [...file.tensors.keys()].find((n) => n.includes("layers.1.self_attn.v_proj.lora_B"))!;
  const tensors = [...file.tensors.values()].map((t) => {
    const data = file.readF32(t.name);
    if (t.name === target) data[2 * 4 + 1] = Infinity; // row 2, column 1 of [out, rank 4]
    return { name: t.name, dtype: "F32" as const, shape: [...t.shape], data };
  });
  file.close();
  writeSafetensors(path, tensors);
  try {
    loadAdapter(dir, { name: "t", base });
    assert.unreachable("an infinite weight must be refused");
  } catch (e) {
    assert.instance(e, CheckpointError);
    assert.match((e as Error).message, `${path}: tensor "${target}" [8, 4] holds Infinity at [2, 1]`);
  }
});

test.run();
