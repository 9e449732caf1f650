// rope_scaling from a config.json (rope_type or the older type key) and from a base block's
// `rope_scaling TYPE { ... }` entry: the scaling each gives, and every refusal with its code and place.
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { Span } from "../../grammar/ast.ts";
import { checkSource } from "../../compiler/check.ts";
import { baseFromHfConfig } from "../../compiler/hf-config.ts";
import { positionLimit, ropeScalingText } from "../../compiler/rope-scaling.ts";
import { compilePackage } from "../../compiler/emit/compile-package.ts";
import { validateManifest } from "../../runtime/package/format.ts";

const at = { offset: 0, line: 1, column: 1 };
const span: Span = { file: "spec.milora", start: at, end: at };

/** meta-llama/Llama-3.2-1B's config.json, the keys milora reads. */
const llama32 = {
  model_type: "llama",
  hidden_size: 2048,
  num_hidden_layers: 16,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 64,
  intermediate_size: 8192,
  vocab_size: 128256,
  rope_theta: 500000,
  max_position_embeddings: 131072,
  tie_word_embeddings: true,
  rope_scaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: "llama3" },
};

test("config.json: llama3 (Llama 3.2's own), linear and dynamic by rope_type or type; null and default are plain RoPE", () => {
  const cases: [unknown, unknown][] = [
    [llama32.rope_scaling, { type: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 }],
    [{ type: "linear", factor: 2 }, { type: "linear", factor: 2 }],
    [{ rope_type: "dynamic", type: "linear", factor: 4 }, { type: "dynamic", factor: 4, originalMaxPositions: 131072 }],
    // transformers accepts original_max_position_embeddings for dynamic and scales from max_position_embeddings
    [{ type: "dynamic", factor: 2, original_max_position_embeddings: 131072 }, { type: "dynamic", factor: 2, originalMaxPositions: 131072 }],
    [null, undefined],
    [{ rope_type: "default" }, undefined],
  ];
  for (const [scaling, want] of cases) {
    const { base, problems } = baseFromHfConfig({ ...llama32, rope_scaling: scaling }, "l", "config.json", span);
    assert.equal(problems, [], JSON.stringify(scaling));
    assert.equal(base!.ropeScaling, want, JSON.stringify(scaling));
  }
});

test("config.json: unsupported types, missing or ill-typed keys and an ambiguous dynamic are refused naming the key and the file", () => {
  const cases: [unknown, string, RegExp][] = [
    [{ rope_type: "yarn", factor: 4 }, "MIL307", /config \/m\/config\.json uses an unsupported option: rope_scaling rope_type "yarn" \(milora implements linear, dynamic, llama3\)/],
    [{ type: "longrope", short_factor: [1] }, "MIL307", /rope_scaling type "longrope"/],
    [{ factor: 2 }, "MIL306", /rope_scaling in config \/m\/config\.json has neither rope_type nor type/],
    [{ rope_type: "llama3", factor: 8 }, "MIL306", /lacks low_freq_factor, high_freq_factor, original_max_position_embeddings \(rope_type llama3 needs/],
    [{ rope_type: "linear", factor: "2" }, "MIL306", /rope_scaling in config \/m\/config\.json: factor must be a number, got "2"/],
    [{ rope_type: "linear", factor: 0.5 }, "MIL306", /factor must be a number >= 1, got 0\.5/],
    [{ ...llama32.rope_scaling, high_freq_factor: 1 }, "MIL306", /high_freq_factor must be above low_freq_factor 1, got 1/],
    [{ ...llama32.rope_scaling, original_max_position_embeddings: 8192.5 }, "MIL306", /original_max_position_embeddings must be a positive integer/],
    [{ type: "dynamic", factor: 2, original_max_position_embeddings: 4096 }, "MIL307", /dynamic with original_max_position_embeddings 4096 unlike max_position_embeddings 131072/],
    ["llama3", "MIL306", /rope_scaling in config \/m\/config\.json must be an object or null/],
  ];
  for (const [scaling, code, message] of cases) {
    const { base, problems } = baseFromHfConfig({ ...llama32, rope_scaling: scaling }, "l", "/m/config.json", span);
    assert.is(base, undefined);
    assert.equal(problems.map((p) => p.code), [code], JSON.stringify(scaling));
    assert.match(problems[0]!.message, message);
  }
});

const BASE = "base b: llama { hidden_size 64 layers 2 heads 4 intermediate_size 128 vocab_size 100 max_positions 64";

function checked(text: string) {
  const { program, diagnostics } = checkSource(text, "/virtual/spec.milora");
  return { base: program.bases[0], diagnostics: diagnostics.map((d) => `${d.code} ${d.span.start.line}:${d.span.start.column} ${d.message}${d.hint ? ` (${d.hint})` : ""}`) };
}

test("a spec's rope_scaling entry gives the same scaling a config does; dynamic scales from the final max_positions", () => {
  const llama3 = checked(`${BASE}\n rope_scaling llama3 { factor 32 low_freq_factor 1 high_freq_factor 4 original_max_positions 16 } }`);
  assert.equal(llama3.diagnostics, []);
  assert.equal(llama3.base!.ropeScaling, { type: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 16 });
  assert.is(ropeScalingText(llama3.base!.ropeScaling!), "rope_scaling llama3 { factor 32 low_freq_factor 1 high_freq_factor 4 original_max_positions 16 }");
  const dynamic = checked(`${BASE} rope_scaling dynamic { factor 2.5 } }`);
  assert.equal(dynamic.base!.ropeScaling, { type: "dynamic", factor: 2.5, originalMaxPositions: 64 });
  assert.is(positionLimit(dynamic.base!), 160, "dynamic plans up to factor * max_positions");
  assert.is(positionLimit(llama3.base!), 64);
});

test("a spec's rope_scaling replaces a config's, and max_positions set over a config's dynamic scaling moves its original context", () => {
  const dir = mkdtempSync(join(tmpdir(), "milora-rope-"));
  writeFileSync(join(dir, "config.json"), JSON.stringify({ ...llama32, rope_scaling: { type: "dynamic", factor: 2 } }));
  const spec = (block: string) => checkSource(`base b from "config.json" { ${block} }`, join(dir, "spec.milora")).program.bases[0]!.ropeScaling;
  assert.equal(spec("max_positions 4096"), { type: "dynamic", factor: 2, originalMaxPositions: 4096 });
  assert.equal(spec("rope_scaling linear { factor 3 }"), { type: "linear", factor: 3 });
});

test("spec diagnostics: at the type, the option or the key, with hints", () => {
  const cases: [string, string[]][] = [
    ["rope_scaling yarn { factor 4 }", ["MIL104 2:15 rope_scaling yarn is not supported (milora implements linear, dynamic, llama3)"]],
    ["rope_scaling lama3 { factor 4 }", ["MIL104 2:15 unknown rope_scaling `lama3` (did you mean `llama3`?)"]],
    ["rope_scaling 4", ["MIL201 2:15 `rope_scaling` takes one type (linear | dynamic | llama3) and an options block, got 4 (e.g. `rope_scaling linear { factor 4 }`)"]],
    ["rope_scaling linear", ["MIL214 2:2 rope_scaling linear lacks `factor` (write `rope_scaling linear { factor N }`)"]],
    ["rope_scaling linear { factor 0.5 }", ["MIL214 2:31 rope_scaling linear: `factor` must be a number >= 1, got 0.5"]],
    [
      "rope_scaling llama3 { factor 8 low_freq_factor 4 high_freq_factor 1 original_max_position_embeddings 8192 }",
      [
        "MIL214 2:2 rope_scaling llama3 lacks `original_max_positions` (write `rope_scaling llama3 { factor N low_freq_factor N high_freq_factor N original_max_positions N }`)",
        "MIL214 2:68 rope_scaling llama3: `high_freq_factor` must be above low_freq_factor 4, got 1",
        "MIL103 2:70 unknown rope_scaling llama3 key `original_max_position_embeddings` (in milora this is `original_max_positions`)",
      ],
    ],
    ["rope_scaling dynamic { factor 2 original_max_positions 16 }", ["MIL103 2:34 unknown rope_scaling dynamic key `original_max_positions` (dynamic scales from the base's max_positions, as Hugging Face does)"]],
    ["rope_scaling linear { factor two }", ["MIL201 2:31 `factor` expects a number, got `two`"]],
    ["layers 2 { factor 2 }", ["MIL105 2:2 `layers` is already set in this block (line 1) (remove one of them)"]],
    ["vocab_size 100 rope_scaling linear { factor 2 } rope_scaling linear { factor 3 }", []],
  ];
  for (const [entry, want] of cases) {
    const got = checked(`${BASE}\n ${entry} }`).diagnostics;
    if (want.length === 0) assert.ok(got.some((d) => d.startsWith("MIL105")), got.join("\n"));
    else assert.equal(got, want, entry);
  }
  const block = checked(`${BASE.replace(" max_positions 64", "")}\n max_positions 64 { factor 2 } }`).diagnostics;
  assert.equal(block, ["MIL215 2:2 `max_positions` takes no options block (only `rope_scaling TYPE { ... }` has options)"]);
});

test("a compiled package carries the scaling: the manifest's base and dims, the dynamic rope kernel with its lengths binding, a context up to factor x max_positions", () => {
  const dir = mkdtempSync(join(tmpdir(), "milora-rope-"));
  const spec = join(dir, "long.milora");
  writeFileSync(spec, `${BASE} rope_scaling dynamic { factor 4 } }\nadapter a on b { experts attn.* { rank 4 } }\n`);
  const files = new Map(compilePackage({ spec, ctx: 256 }).package!.files.map((f) => [f.path, f.contents]));
  const manifest = validateManifest(JSON.parse(files.get("manifest.json")!), "manifest.json");
  const scaling = { type: "dynamic", factor: 4, originalMaxPositions: 64 };
  assert.equal([manifest.base.ropeScaling, manifest.plan.dims.ropeScaling, manifest.plan.dims.ctx], [scaling, scaling, 256]);
  const rope = manifest.kernels.find((k) => k.name === "rope")!;
  assert.equal(rope.bindings.map((b) => b.name), ["q", "k", "positions", "lengths", "params"]);
  assert.match(files.get(rope.file)!, "//   rope_scaling dynamic { factor 4 }\n");
  assert.throws(() => compilePackage({ spec, ctx: 257 }), /context 257 must be an integer from 1 to 256 \(dynamic rope scaling: factor x max_positions\)/);
});

test.run();
