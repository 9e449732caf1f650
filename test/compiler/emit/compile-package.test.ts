// Compiling specs into package files: every example compiles, the same input gives the same bytes, the
// manifest describes the plan and names the kernel files, and kernel headers cite the spec's lines.
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles } from "../../../compiler/check.ts";
import { compilePackage, CompileError, type CompileOptions } from "../../../compiler/emit/compile-package.ts";
import { COMPILER_VERSION, compatibleVersions, type Manifest } from "../../../compiler/emit/manifest.ts";
import { splitKernelFile } from "../../../compiler/emit/wgsl-files.ts";
import { kernelSources } from "../../../compiler/plan.ts";

const examples = readdirSync("examples")
  .filter((f) => f.endsWith(".milora"))
  .map((f) => join("examples", f));

function compiled(options: CompileOptions) {
  const result = compilePackage(options);
  assert.ok(result.package, `${options.spec} ${options.adapter}: ${result.diagnostics.map((d) => d.message).join("; ")}`);
  return new Map(result.package.files.map((f) => [f.path, f.contents]));
}

function manifestOf(files: Map<string, string>): Manifest {
  return JSON.parse(files.get("manifest.json")!) as Manifest;
}

test("every adapter of every example compiles into a package with the API, manifest and kernels", () => {
  let adapters = 0;
  for (const spec of examples) {
    for (const adapter of checkFiles([spec]).program.adapters) {
      adapters++;
      const files = compiled({ spec, adapter: adapter.name });
      for (const path of ["package.json", "README.md", "manifest.json", "src/index.ts", "index.js", "index.d.ts", "cli.js"]) {
        assert.ok(files.has(path), `${spec} ${adapter.name}: no ${path}`);
      }
      const manifest = manifestOf(files);
      assert.is(manifest.adapter.name, adapter.name);
      assert.equal(manifest.kernels.map((k) => k.key), manifest.plan.kernels.map((k) => k.key));
      for (const k of manifest.kernels) assert.ok(files.has(k.file), `${spec}: ${k.file} missing`);
    }
  }
  assert.ok(adapters >= 10, `only ${adapters} adapters in examples/`);
});

test("compiling twice gives the same bytes", () => {
  const first = compiled({ spec: "examples/from-config.milora", adapter: "support_bot" });
  const second = compiled({ spec: "examples/from-config.milora", adapter: "support_bot" });
  assert.equal([...second.keys()], [...first.keys()]);
  for (const [path, text] of first) assert.ok(second.get(path) === text, `${path} differs between two compiles`);
});

test("the manifest records the compiler version, the spec's hash, the plan, router and budget", () => {
  const files = compiled({ spec: "examples/llama-tiny.milora", adapter: "tiny" });
  const m = manifestOf(files);
  assert.is(m.compiler.version, COMPILER_VERSION);
  assert.is(m.spec.file, "llama-tiny.milora");
  assert.match(m.spec.sha256, /^sha256:[0-9a-f]{64}$/);
  assert.is(m.plan.dims.hidden, 64);
  assert.is(m.plan.dims.ctx, 256);
  assert.is(m.plan.maxLoraRank, 4);
  assert.equal(m.adapter.router?.selection, { rule: "top_k", k: 2, renormalize: false });
  assert.is(m.budget.loraParams, 2 * (4 * (64 + 64) * 2 + 4 * (64 + 32) * 2 + 4 * (64 + 176) * 3));
  // keys sorted at every level, so a reordered field never shows up as a change
  const keys = Object.keys(JSON.parse(files.get("manifest.json")!));
  assert.equal(keys, [...keys].sort());

  const other = manifestOf(compiled({ spec: "examples/llama2-7b.milora", adapter: "llama2_milora" }));
  assert.is.not(other.spec.sha256, m.spec.sha256);
  assert.is(other.plan.dims.ctx, 2048, "a 4096-position base gets kernels for the default 2048-position context");
});

test("each kernel file is its generated WGSL under a header citing the spec lines that specialised it", () => {
  const files = compiled({ spec: "examples/llama-tiny.milora", adapter: "tiny" });
  const m = manifestOf(files);
  const sources = kernelSources(m.plan);
  for (const k of m.kernels) assert.is(splitKernelFile(files.get(k.file)!).wgsl, sources.get(k.key)!.wgsl, k.file);

  const norm = m.kernels.find((k) => k.key.startsWith("rmsnorm"))!;
  const { header } = splitKernelFile(files.get(norm.file)!);
  assert.match(header, "llama-tiny.milora:2  base llama_tiny: llama {");
  assert.match(header, "llama-tiny.milora:3  hidden_size 64");
  assert.match(header, "rms_norm_eps 0.000001 (not written: the llama family's default)");
  const vocab = m.kernels.find((k) => k.key.startsWith("sampling"))!;
  assert.match(files.get(vocab.file)!, "llama-tiny.milora:8  vocab_size 512");
  const shrink = m.kernels.find((k) => k.key.startsWith("lora_shrink"))!;
  assert.match(files.get(shrink.file)!, "llama-tiny.milora:14  experts all { rank 4 alpha 8 dropout 0.05 }");
});

test("a MiLoRA package ships its routers' kernels as files citing the router block", () => {
  const files = compiled({ spec: "examples/llama-tiny.milora", adapter: "tiny" });
  const m = manifestOf(files);
  const routerFiles = m.kernels.filter((k) => k.key.startsWith("router_")).map((k) => k.file);
  assert.equal(routerFiles, [
    "kernels/router_score_hidden-64.wgsl",
    "kernels/router_pool_hidden-64_pooling-attention.wgsl",
    "kernels/router_gate_hidden-64_columns-0-1-2-3-4-5-6_width-7_selection-top_k2_activation-none.wgsl",
  ]);
  const { header } = splitKernelFile(files.get(routerFiles[2]!)!);
  assert.match(header, "// Used by: router gate of layers 0, 1");
  for (const line of ["15  router {", "16  pooling attention", "17  select top_k 2", "18  when prompt"]) assert.match(header, `llama-tiny.milora:${line}`);
  // A variant's header cites the router lines it inherits and the one it changes.
  const tokenFiles = compiled({ spec: "examples/llama-tiny.milora", adapter: "tiny_token" });
  const gate = manifestOf(tokenFiles).kernels.find((k) => k.key.startsWith("router_gate"))!;
  const tokenHeader = splitKernelFile(tokenFiles.get(gate.file)!).header;
  assert.match(tokenHeader, "llama-tiny.milora:16  pooling attention");
  assert.match(tokenHeader, "llama-tiny.milora:25  router { when token }");
  assert.not.ok(manifestOf(compiled({ spec: "examples/llama-tiny.milora", adapter: "tiny_lora" })).kernels.some((k) => k.key.startsWith("router_")));
});

test("a base read from config.json is cited by its file, and --ctx changes the attention kernels' context", () => {
  const files = compiled({ spec: "examples/from-config.milora", adapter: "support_bot", ctx: 64 });
  const attention = manifestOf(files).kernels.find((k) => k.key.startsWith("attention"))!;
  assert.match(attention.key, "maxPositions=64");
  const header = splitKernelFile(files.get(attention.file)!).header;
  assert.match(header, "hf-base.milora:2  base tiny_hf from");
  assert.match(header, "(not written: from tiny-hf/config.json or its defaults)");
  assert.match(header, "context 64 positions (milora compile --ctx), within max_positions 128");
});

test("the typed API and README carry the spec's source lines and budget", () => {
  const files = compiled({ spec: "examples/from-config.milora", adapter: "support_bot_lora" });
  const api = files.get("src/index.ts")!;
  assert.match(api, "export class SupportBotLora<Tenant extends string = string>");
  assert.match(api, 'export const EXPERT_MODULES = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] as const;');
  assert.match(api, "export const ROUTER = null;");
  // the variant's lines follow those of the adapter it extends, the base (another file) first
  assert.match(api, /\/\/ hf-base\.milora\n \* {1,2}2 \| base tiny_hf from/);
  assert.match(api, /4 \| adapter support_bot on tiny_hf \{[^]*19 \| adapter support_bot_lora extends support_bot \{ router off \}/);
  assert.match(api, "total trainable");
  const readme = files.get("README.md")!;
  assert.match(readme, "# milora-support-bot-lora");
  assert.match(readme, "None: plain LoRA");
  assert.match(readme, "import { SupportBotLora } from \"milora-support-bot-lora\";");
  assert.equal(JSON.parse(files.get("package.json")!).bin, { "milora-support-bot-lora": "cli.js" });
});

test("package name and version come from the options", () => {
  const files = compiled({ spec: "examples/llama-tiny.milora", adapter: "tiny_token", name: "@acme/tiny", version: "2.1.0" });
  const pkg = JSON.parse(files.get("package.json")!);
  assert.is(pkg.name, "@acme/tiny");
  assert.is(pkg.version, "2.1.0");
  assert.equal(pkg.bin, { tiny: "cli.js" });
  assert.is(pkg.dependencies.milora, undefined, "the package carries its runtime (milora-runtime/)");
  assert.equal(Object.keys(pkg.dependencies), ["@huggingface/tokenizers", "@webgpu/types", "re2js", "webgpu"]);
  assert.equal(Object.keys(pkg.exports["."]), ["types", "default"], "types must be the first export condition");
});

test("requests the spec cannot satisfy are errors that say what to do", () => {
  const fails = (options: CompileOptions, message: string) => {
    try {
      compilePackage(options);
      assert.unreachable("compiled");
    } catch (e) {
      assert.instance(e, CompileError);
      assert.match((e as Error).message, message);
    }
  };
  fails({ spec: "examples/llama-tiny.milora" }, "declares 3 adapters (tiny, tiny_token, tiny_lora): choose one with --adapter NAME");
  fails({ spec: "examples/llama-tiny.milora", adapter: "tiny_lroa" }, "has no adapter tiny_lroa: did you mean `tiny_lora`?");
  fails({ spec: "examples/hf-base.milora" }, "declares no adapter");
  fails({ spec: "examples/llama-tiny.milora", adapter: "tiny", name: "Tiny Model" }, "is not a valid npm package name");
  fails({ spec: "examples/llama-tiny.milora", adapter: "tiny", version: "1" }, "is not a semantic version");
  fails({ spec: "examples/llama-tiny.milora", adapter: "tiny", ctx: 300 }, "context 300 must be an integer from 1 to max_positions 256");
});

test("a spec with errors gives its diagnostics and no package", () => {
  const result = compilePackage({ spec: "test/grammar/fixtures/does-not-exist.milora" });
  assert.is(result.package, undefined);
  assert.ok(result.diagnostics.some((d) => d.severity === "error"));
});

test("runtimes accept manifests of the same major version, and before 1.0 of the same minor", () => {
  assert.ok(compatibleVersions("0.1.0", "0.1.7"));
  assert.not.ok(compatibleVersions("0.2.0", "0.1.0"));
  assert.ok(compatibleVersions("1.2.0", "1.5.3"));
  assert.not.ok(compatibleVersions("2.0.0", "1.9.0"));
});

test("COMPILER_VERSION is milora's package.json version", async () => {
  const { readFileSync } = await import("node:fs");
  assert.is(COMPILER_VERSION, JSON.parse(readFileSync("package.json", "utf8")).version);
});

test.run();
