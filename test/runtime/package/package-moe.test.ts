// A compiled package of a per-token baseline (here MixLoRA-style per_ffn): its manifest carries the
// routing and the plan's feed-forward passes, its runtime runs a tenant's adapter as the float64
// reference does, and route() says why it has no per-layer gates.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles } from "../../../compiler/check.ts";
import { compilePackage } from "../../../compiler/emit/compile-package.ts";
import { writePackage } from "../../../compiler/emit/write-package.ts";
import { writeRandomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { loadCompiledModel, readCompiledPackage, type CompiledModel } from "../../../runtime/package/loader.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { loadReferenceWeights } from "../../reference/llama.ts";
import { referenceMoeGreedy } from "../../reference/moe-lora.ts";

const root = mkdtempSync(join(tmpdir(), "milora-package-moe-"));
const checkpoint = join(root, "tiny-model");
const spec = join(root, "mixlora.milora");
const packageDir = join(root, "package");
const adapterDir = join(root, "tenant");
let gpu: GpuContext;
let model: CompiledModel<"acme">;
let adapter: LoadedAdapter;
const prompt = [1, 72, 101, 108, 108, 33, 5];

test.before(async () => {
  writeRandomCheckpoint(checkpoint, { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 64, vocabSize: 300, maxPositions: 64, seed: 17 });
  writeFileSync(spec, `base tiny from "tiny-model/config.json"\n\nadapter mixlora on tiny {\n  experts all { rank 4 alpha 8 }\n  router { placement per_ffn num_experts 4 select top_k 2 renormalize }\n}\n`);
  writePackage(packageDir, compilePackage({ spec, adapter: "mixlora" }).package!.files, { force: true });
  adapter = writeRandomAdapter(adapterDir, { spec: checkFiles([spec]).program.adapters[0]!, seed: 5 });
  gpu = await acquireDevice();
  model = await loadCompiledModel<"acme">(packageDir, { base: checkpoint, adapters: { acme: adapterDir }, device: gpu, maxSequences: 2 });
});
test.after(() => {
  model.destroy();
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

test("the manifest says what the package routes: the adapter's moe and the plan's feed-forward passes", () => {
  const { manifest } = readCompiledPackage(packageDir);
  assert.equal(manifest.adapter.moe, { placement: "per_ffn", experts: 4, selection: { rule: "top_k", k: 2, renormalize: true }, balance: 0.01 });
  assert.equal(manifest.plan.layer.filter((op) => op.op === "moe_mix").length, 2, "one mix per kept expert");
});

test("a tenant's MixLoRA adapter generates what the reference does", async () => {
  const ids: number[] = [];
  for await (const t of model.generate(prompt, { tenant: "acme", maxTokens: 4 })) ids.push(t.id);
  const { base, weights } = loadReferenceWeights(checkpoint);
  assert.equal(ids, referenceMoeGreedy(base, weights, { ...adapter, name: "acme" }, prompt, 4).tokens);
});

test("route() refuses a per-token baseline: its routing is inside the modules, at every token", async () => {
  let refused: unknown;
  await model.route(prompt, { tenant: "acme" }).catch((e: unknown) => (refused = e));
  assert.match(String(refused), /routes every token per_ffn/);
});

test.run();
