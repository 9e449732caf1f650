// DoRA in the spec language: the `dora` expert option, the one-flag-per-adapter rule (MIL216), the
// budget's count of the magnitude vectors, and a compiled package's manifest and typed API.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { computeBudget } from "../../compiler/budget.ts";
import { checkSource } from "../../compiler/check.ts";
import { compilePackage } from "../../compiler/emit/compile-package.ts";
import { MANIFEST_FILE, PackageError, validateManifest } from "../../runtime/package/format.ts";

const FILE = "/virtual/dora.milora";
const BASE = "base b: llama { hidden_size 64 layers 2 heads 4 kv_heads 2 intermediate_size 176 vocab_size 100 }\n";

function adapter(body: string, name = "a") {
  const { diagnostics, program } = checkSource(`${BASE}adapter a on b { ${body} }\nadapter v extends a { router off }\n`, FILE);
  return { diagnostics, adapter: program.adapters.find((x) => x.name === name) };
}

test("`dora true` marks every expert it reaches, a variant keeps it, and plain experts carry no flag", () => {
  const dora = adapter("experts all { rank 4 dora true }");
  assert.equal(dora.diagnostics, []);
  assert.is(dora.adapter!.experts.length, 14);
  assert.ok(dora.adapter!.experts.every((e) => e.dora === true));
  assert.ok(adapter("experts all { rank 4 dora true }", "v").adapter!.experts.every((e) => e.dora === true));
  const plain = adapter("experts all { rank 4 dora false }");
  assert.equal(plain.diagnostics, []);
  assert.ok(plain.adapter!.experts.every((e) => !("dora" in e)));
});

test("DoRA on some experts and not others is MIL216, naming one of each", () => {
  const { diagnostics } = adapter("experts attn.* { dora true }  experts mlp.*");
  assert.equal(diagnostics.map((d) => d.code), ["MIL216"]);
  assert.match(diagnostics[0]!.message, /DoRA on some experts \(layer 0 q_proj\) and not on others \(layer 0 gate_proj\); PEFT stores one use_dora per adapter/);
  assert.equal([diagnostics[0]!.span.start.line, diagnostics[0]!.span.start.column], [2, 9]);
  // a layer override that turns DoRA off in one layer is the same mix
  assert.equal(adapter("experts all { dora true }  at layers 1 { experts v_proj { dora false } }").diagnostics.map((d) => d.code), ["MIL216"]);
});

test("`dora` takes a boolean (MIL201)", () => {
  const { diagnostics } = adapter("experts all { dora 1 }");
  assert.equal(diagnostics.map((d) => d.code), ["MIL201"]);
  assert.match(diagnostics[0]!.message, /`dora` expects true or false, got `1`/);
});

test("the budget counts DoRA's magnitude vector, out parameters per module, as PEFT does", () => {
  const lora = computeBudget(adapter("experts all { rank 4 }").adapter!);
  const dora = computeBudget(adapter("experts all { rank 4 dora true }").adapter!);
  // per layer: q 64, k 32, v 32, o 64, gate 176, up 176, down 64 output features
  const magnitudes = 2 * (64 + 32 + 32 + 64 + 176 + 176 + 64);
  assert.is(dora.loraParams - lora.loraParams, magnitudes);
  assert.is(dora.trainableParams - lora.trainableParams, magnitudes);
  const q = (b: typeof lora) => b.modules.find((m) => m.module === "q_proj")!.params;
  assert.is(q(dora), 2 * (4 * (64 + 64) + 64));
  assert.is(dora.bytes.f32, 4 * dora.trainableParams);
});

test("a package for a DoRA adapter: its manifest's experts say dora true and validate, every LoRA expand binds the DoRA factors, the typed API says dora", () => {
  const dir = mkdtempSync(join(tmpdir(), "milora-dora-spec-"));
  try {
    const spec = join(dir, "dora.milora");
    writeFileSync(spec, `${BASE}adapter a on b { experts all { rank 4 dora true }  router off }\n`);
    const files = compilePackage({ spec, adapter: "a" }).package!.files;
    const manifest = JSON.parse(files.find((f) => f.path === MANIFEST_FILE)!.contents);
    assert.ok(validateManifest(manifest, "pkg/manifest.json"));
    assert.ok(manifest.adapter.experts.every((e: { dora?: boolean }) => e.dora === true));
    const expands = manifest.kernels.filter((k: { key: string }) => k.key.startsWith("lora_expand("));
    assert.equal(expands.map((k: { key: string }) => k.key).sort(), [
      "lora_expand(outFeatures=176,maxRank=4,dora=true,rowInfo=true)",
      "lora_expand(outFeatures=32,maxRank=4,dora=true,rowInfo=true)",
      "lora_expand(outFeatures=64,maxRank=4,dora=true,residual=true,rowInfo=true)",
      "lora_expand(outFeatures=64,maxRank=4,dora=true,rowInfo=true)",
    ]);
    assert.ok(expands.every((k: { bindings: { name: string }[] }) => k.bindings.some((b) => b.name === "dora")));
    assert.match(files.find((f) => f.path === "src/index.ts")!.contents, /rslora: false, dora: true/);
    manifest.adapter.experts[0].dora = false;
    assert.throws(() => validateManifest(manifest, "pkg/manifest.json"), (e: unknown) => e instanceof PackageError && /adapter\.experts\[0\]\.dora must be one of true/.test((e as Error).message));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
