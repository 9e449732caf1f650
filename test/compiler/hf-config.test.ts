import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { Span } from "../../grammar/ast.ts";
import { baseFromHfConfig, readHfConfig } from "../../compiler/hf-config.ts";

const at = { offset: 10, line: 2, column: 18 };
const span: Span = { file: "spec.milora", start: at, end: { offset: 25, line: 2, column: 33 } };

/** The config.json of meta-llama/Llama-3.2-1B (the keys milora reads, plus some it ignores). */
const llama32_1b = {
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  hidden_act: "silu",
  hidden_size: 2048,
  num_hidden_layers: 16,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 64,
  intermediate_size: 8192,
  vocab_size: 128256,
  rope_theta: 500000,
  rms_norm_eps: 1e-5,
  max_position_embeddings: 131072,
  tie_word_embeddings: true,
  rope_scaling: null,
  torch_dtype: "bfloat16",
};

test("a Llama 3.2 config maps to milora's names", () => {
  const { base, problems } = baseFromHfConfig(llama32_1b, "llama32", "/models/l/config.json", span);
  assert.equal(problems, []);
  assert.ok(base);
  assert.equal(
    {
      family: base.family,
      hidden: base.hiddenSize,
      layers: base.layers,
      heads: base.heads,
      kv: base.kvHeads,
      headDim: base.headDim,
      inter: base.intermediateSize,
      vocab: base.vocabSize,
      theta: base.ropeTheta,
      eps: base.rmsNormEps,
      maxPos: base.maxPositions,
      tied: base.tieEmbeddings,
    },
    {
      family: "llama",
      hidden: 2048,
      layers: 16,
      heads: 32,
      kv: 8,
      headDim: 64,
      inter: 8192,
      vocab: 128256,
      theta: 500000,
      eps: 1e-5,
      maxPos: 131072,
      tied: true,
    },
  );
  assert.is(base.configPath, "/models/l/config.json");
  assert.is(base.span, span);
});

test("kv heads and head size are derived when a config leaves them out", () => {
  const { num_key_value_heads: _kv, head_dim: _hd, ...rest } = llama32_1b;
  const { base } = baseFromHfConfig(rest, "b", "config.json", span);
  assert.is(base?.kvHeads, 32);
  assert.is(base?.headDim, 64);
});

test("problems are reported at the `from` string with a clear message", () => {
  const cases: [unknown, string, RegExp][] = [
    [[1, 2], "MIL304", /is not a JSON object/],
    [{ ...llama32_1b, model_type: "gpt2" }, "MIL305", /model_type "gpt2", which milora does not support/],
    [{ hidden_size: 8 }, "MIL305", /has no model_type/],
    [
      { model_type: "llama", hidden_size: 64 },
      "MIL306",
      /lacks num_hidden_layers, num_attention_heads, intermediate_size, vocab_size/,
    ],
    [
      { ...llama32_1b, num_hidden_layers: "16" },
      "MIL306",
      /num_hidden_layers in config config\.json must be a positive integer, got "16"/,
    ],
    [
      { ...llama32_1b, rope_scaling: { rope_type: "yarn", factor: 4 } },
      "MIL307",
      /unsupported option: rope_scaling rope_type "yarn"/,
    ],
    [{ ...llama32_1b, hidden_act: "gelu" }, "MIL307", /hidden_act "gelu" \(milora implements silu for llama\)/],
    [{ ...llama32_1b, num_key_value_heads: 5 }, "MIL207", /heads 32 is not divisible by kv_heads 5/],
  ];
  for (const [json, code, message] of cases) {
    const { base, problems } = baseFromHfConfig(json, "b", "config.json", span);
    assert.is(base, undefined);
    assert.is(problems.length, 1, JSON.stringify(problems));
    assert.is(problems[0]!.code, code);
    assert.match(problems[0]!.message, message);
    assert.equal(problems[0]!.span, span);
  }
});

test("readHfConfig reads a model directory and names the base after it", () => {
  const dir = join(mkdtempSync(join(tmpdir(), "milora-hf-")), "tiny-llama");
  mkdirSync(dir);
  writeFileSync(join(dir, "config.json"), JSON.stringify({ ...llama32_1b, num_hidden_layers: 2 }));
  const base = readHfConfig(dir);
  assert.is(base.name, "tiny-llama");
  assert.is(base.layers, 2);
});

test("readHfConfig throws an Error that says what is wrong", () => {
  const dir = mkdtempSync(join(tmpdir(), "milora-hf-"));
  assert.throws(() => readHfConfig(dir), /cannot read config .*config\.json: no such file/);
  writeFileSync(join(dir, "config.json"), "{ not json");
  assert.throws(() => readHfConfig(dir), /is not valid JSON/);
  writeFileSync(join(dir, "config.json"), JSON.stringify({ model_type: "bert" }));
  assert.throws(() => readHfConfig(join(dir, "config.json")), /model_type "bert".*\(supported: "llama", "mistral", "qwen2", "gemma"\)/);
});

test("sizes no real model reaches are refused naming the file and the key, before anything is built", () => {
  for (const [key, value, limit] of [
    ["head_dim", 1e8, 1024],
    ["hidden_size", 1e9, 65536],
    ["num_hidden_layers", 1e6, 1024],
    ["vocab_size", 2 ** 30, 2 ** 22],
    ["intermediate_size", 1e7, 2 ** 18],
  ] as const) {
    const heap = process.memoryUsage().heapUsed;
    const started = performance.now();
    const { base, problems } = baseFromHfConfig({ ...llama32_1b, [key]: value }, "huge", "/models/huge/config.json", span);
    assert.ok(performance.now() - started < 100);
    assert.ok(process.memoryUsage().heapUsed - heap < 20 * 2 ** 20);
    assert.is(base, undefined);
    assert.equal(problems.map((p) => [p.code, p.message]), [
      ["MIL308", `${key} in config /models/huge/config.json is ${value}, above milora's limit of ${limit}`],
    ]);
  }
  // a head size derived as hidden_size / heads is bounded as well
  const { head_dim: _, ...noHeadDim } = llama32_1b;
  const derived = baseFromHfConfig({ ...noHeadDim, hidden_size: 65536, num_attention_heads: 32, num_key_value_heads: 8 }, "wide", "c.json", span);
  assert.match(derived.problems.map((p) => p.message).join(), "hidden_size / heads = 65536 / 32 = 2048 is above milora's limit of 1024");
});

test("milora run and serve read a checkpoint's config through readHfConfig, which refuses huge sizes", () => {
  const dir = mkdtempSync(join(tmpdir(), "milora-hf-"));
  writeFileSync(join(dir, "config.json"), JSON.stringify({ ...llama32_1b, num_hidden_layers: 1e6 }));
  assert.throws(() => readHfConfig(dir), /num_hidden_layers in config .*config\.json is 1000000, above milora's limit of 1024/);
  writeFileSync(join(dir, "config.json"), `{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100, "rope_theta": 1e999}`);
  assert.throws(() => readHfConfig(dir), /rope_theta in config .* must be a positive number, got Infinity/);
});

test.run();
