// Beam search through a compiled package's typed API: generateBeams returns every hypothesis with its
// score, best first, the same as the engine's beam search; generate(prompt, { beams }) yields the best.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles } from "../../../compiler/check.ts";
import { compilePackage } from "../../../compiler/emit/compile-package.ts";
import { writePackage } from "../../../compiler/emit/write-package.ts";
import { writeRandomAdapter } from "../../../examples/random-adapter.ts";
import { PRESETS, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { loadCompiledModel, type CompiledModel } from "../../../runtime/package/loader.ts";
import { EngineError } from "../../../runtime/engine/engine.ts";

const SPEC = "examples/llama-tiny.milora";
const root = mkdtempSync(join(tmpdir(), "milora-package-beams-"));
const checkpoint = join(root, "tiny-model");
const packageDir = join(root, "tiny");
const adapterDir = join(root, "tenant");
let gpu: GpuContext;
let model: CompiledModel<"acme">;
const prompt = [1, 72, 101, 108, 108];

test.before(async () => {
  writeRandomCheckpoint(checkpoint, { ...PRESETS.tiny, seed: 11 });
  writePackage(packageDir, compilePackage({ spec: SPEC, adapter: "tiny" }).package!.files, { force: true });
  writeRandomAdapter(adapterDir, { spec: checkFiles([SPEC]).program.adapters.find((a) => a.name === "tiny")!, seed: 3 });
  gpu = await acquireDevice();
  model = await loadCompiledModel<"acme">(packageDir, { base: checkpoint, adapters: { acme: adapterDir }, device: gpu, maxSequences: 4 });
});
test.after(() => {
  model.destroy();
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

test("generateBeams: all beams with scores, best first; generate with beams yields the best one's tokens", async () => {
  const all = await model.generateBeams(prompt, { tenant: "acme", beams: 3, maxTokens: 5 });
  assert.is(all.length, 3);
  for (let i = 1; i < all.length; i++) assert.ok(all[i - 1]!.score >= all[i]!.score);
  assert.ok(all.every((h) => typeof h.text === "string" && h.ids.length > 0 && h.score < 0));
  const ids: number[] = [];
  for await (const t of model.generate(prompt, { tenant: "acme", beams: 3, maxTokens: 5 })) ids.push(t.id);
  assert.equal(ids, all[0]!.ids);
  const two = await model.generateBeams(prompt, { tenant: "acme", beams: 3, maxTokens: 5, numReturnSequences: 2, lengthPenalty: 1 });
  assert.equal(two.map((h) => h.ids), all.slice(0, 2).map((h) => h.ids));
});

test("more beams than the package's sequences is an EngineError naming maxSequences", async () => {
  try {
    await model.generateBeams(prompt, { beams: 5, maxTokens: 3 });
    assert.unreachable();
  } catch (e) {
    assert.instance(e, EngineError);
    assert.match((e as Error).message, /raise maxSequences/);
  }
});

test.run();
