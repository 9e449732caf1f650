import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles, checkSource } from "../../compiler/check.ts";
import { CHECK_CODES } from "../../compiler/codes.ts";

const FILE = "/virtual/spec.milora";
/** A 4-layer base on line 1, so adapters in the tests start on line 2. */
const BASE = "base b: llama { hidden_size 64 layers 4 heads 4 intermediate_size 128 vocab_size 100 }\n";

interface Expected {
  line: number;
  column: number;
  message: RegExp;
  hint?: RegExp;
  file?: string;
}

/** Asserts the spec gives exactly one diagnostic, with this code, place and message. */
function expectOne(text: string, code: string, e: Expected, file = FILE): void {
  const { diagnostics } = checkSource(text, file);
  assert.equal(
    diagnostics.map((d) => d.code),
    [code],
    diagnostics.map((d) => `${d.code} ${d.span.start.line}:${d.span.start.column} ${d.message}`).join("\n"),
  );
  const [d] = diagnostics;
  assert.is(d!.span.file, e.file ?? file);
  assert.equal([d!.span.start.line, d!.span.start.column], [e.line, e.column]);
  assert.match(d!.message, e.message);
  if (e.hint) assert.match(d!.hint ?? "", e.hint);
}

function tempDir(files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), "milora-check-"));
  for (const [name, text] of Object.entries(files)) {
    mkdirSync(join(dir, name, ".."), { recursive: true });
    writeFileSync(join(dir, name), text);
  }
  return dir;
}

const tinyConfig = {
  model_type: "llama",
  hidden_size: 64,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  intermediate_size: 176,
  vocab_size: 512,
};

test("a clean spec resolves bases, experts, variants and routers", () => {
  const { diagnostics, program } = checkSource(
    BASE +
      `adapter a on b {
        experts attn.*, mlp.* { rank 8 alpha 16 dropout 0.05 }
        experts down_proj { rank 16 }
        experts k_proj off
        layers 0..2
        at layers 2 { experts mlp.* { rank 4 } experts q_proj { rslora true } }
        router { pooling mean select top_k 3 }
      }
      adapter a_token extends a { router { when token } }
      adapter a_lora extends a_token { router off experts k_proj }`,
    FILE,
  );
  assert.equal(diagnostics, []);
  const [a, token, lora] = program.adapters;
  assert.equal(a!.layers, [0, 1, 2]);
  assert.is(a!.experts.length, 3 * 6);
  const slot = (layer: number, module: string) => a!.experts.find((s) => s.layer === layer && s.module === module);
  assert.is(slot(0, "k_proj"), undefined);
  assert.equal([slot(0, "down_proj")!.rank, slot(2, "down_proj")!.rank, slot(2, "up_proj")!.rank], [16, 4, 4]);
  assert.equal([slot(0, "q_proj")!.scaling, slot(2, "q_proj")!.scaling], [16 / 8, 16 / Math.sqrt(8)]);
  assert.equal([slot(1, "gate_proj")!.inFeatures, slot(1, "gate_proj")!.outFeatures], [64, 128]);
  assert.equal(a!.router, {
    ...a!.router!,
    pooling: "mean",
    selection: { rule: "top_k", k: 3, renormalize: false },
    when: "prompt",
    balance: 0.1,
  });
  assert.equal([token!.extends, token!.router?.when, token!.router?.pooling], ["a", "token", "mean"]);
  assert.is(lora!.router, undefined);
  assert.is(lora!.experts.length, 3 * 7);
});

test("defaults: LoRA options, every layer and the MiLoRA router", () => {
  const { program, diagnostics } = checkSource(BASE + "adapter a on b { experts all }", FILE);
  assert.equal(diagnostics, []);
  const [a] = program.adapters;
  assert.equal(a!.layers, [0, 1, 2, 3]);
  assert.equal(
    {
      rank: a!.experts[0]!.rank,
      alpha: a!.experts[0]!.alpha,
      dropout: a!.experts[0]!.dropout,
      rslora: a!.experts[0]!.rslora,
    },
    { rank: 8, alpha: 32, dropout: 0.3, rslora: false },
  );
  assert.equal(a!.router, {
    placement: "per_layer",
    input: "layer_input",
    pooling: "last",
    selection: { rule: "top_k", k: 2, renormalize: false },
    activation: "none",
    when: "prompt",
    noise: true,
    balance: 0.1,
  });
  const [base] = program.bases;
  assert.equal([base!.kvHeads, base!.headDim, base!.ropeTheta, base!.rmsNormEps], [4, 16, 10000, 1e-6]);
});

// ---- 1xx names

test("MIL101 unknown family", () => {
  expectOne("base b: lama { }", "MIL101", {
    line: 1,
    column: 9,
    message: /unknown family `lama`/,
    hint: /did you mean `llama`\?/,
  });
});

test("MIL102 unknown expert module", () => {
  expectOne(BASE + "adapter a on b { experts all, up_prj }", "MIL102", {
    line: 2,
    column: 31,
    message: /unknown expert module `up_prj`/,
    hint: /did you mean `up_proj`\?/,
  });
  expectOne(BASE + "adapter a on b { experts q_proj.* }", "MIL102", {
    line: 2,
    column: 26,
    message: /`q_proj` is a module, not a group/,
  });
});

test("MIL103 unknown key, with the milora name for a Hugging Face one", () => {
  expectOne("base b: llama { num_attention_heads 8 }", "MIL103", {
    line: 1,
    column: 17,
    message: /unknown base key `num_attention_heads`/,
    hint: /in milora this is `heads`/,
  });
  expectOne(BASE + "adapter a on b { experts all router { pool last } }", "MIL103", {
    line: 2,
    column: 39,
    message: /unknown router key `pool`/,
    hint: /did you mean `pooling`\?/,
  });
});

test("MIL104 unknown value of a router key", () => {
  expectOne(BASE + "adapter a on b { experts all router { pooling avg } }", "MIL104", {
    line: 2,
    column: 47,
    message: /unknown pooling `avg`/,
    hint: /last.*mean.*max.*attention/,
  });
  expectOne(BASE + "adapter a on b { experts all router { select top_p 2 } }", "MIL104", {
    line: 2,
    column: 46,
    message: /unknown selection rule `top_p`/,
    hint: /did you mean `top_k`\?/,
  });
});

test("MIL105 duplicate key in one block", () => {
  expectOne(BASE + "adapter a on b { experts all { rank 4 rank 8 } }", "MIL105", {
    line: 2,
    column: 39,
    message: /`rank` is already set in this block \(line 2\)/,
  });
  expectOne(BASE + "adapter a on b { experts all router { } router off }", "MIL105", {
    line: 2,
    column: 41,
    message: /adapter `a` has a second router block \(first at line 2\)/,
  });
});

test("MIL106 duplicate names, in one file and across imports", () => {
  expectOne("base b: llama { }\nbase b: llama { }", "MIL106", {
    line: 2,
    column: 6,
    message: /base `b` is already defined at \/virtual\/spec\.milora:1:6/,
  });
  const dir = tempDir({ "common.milora": BASE });
  expectOne(
    `import "common.milora"\n${BASE}`,
    "MIL106",
    { line: 2, column: 6, message: /common\.milora:1:6/ },
    join(dir, "main.milora"),
  );
});

test("MIL107 adapter on an undefined base", () => {
  expectOne(BASE + "adapter a on c { experts all }", "MIL107", {
    line: 2,
    column: 14,
    message: /adapter `a` is on undefined base `c`/,
    hint: /did you mean `b`\?/,
  });
});

test("MIL108 extends of an undefined adapter", () => {
  expectOne(BASE + "adapter v extends nothing { }", "MIL108", {
    line: 2,
    column: 19,
    message: /extends undefined adapter `nothing`/,
  });
});

test("MIL109 extends cycle", () => {
  expectOne(BASE + "adapter x extends y { }\nadapter y extends x { }", "MIL109", {
    line: 3,
    column: 19,
    message: /adapters extend each other in a cycle: x -> y -> x/,
  });
});

// ---- 2xx values

test("MIL201 value of the wrong type or count", () => {
  expectOne(BASE + "adapter a on b { experts all { rank eight } }", "MIL201", {
    line: 2,
    column: 37,
    message: /`rank` expects a number, got `eight`/,
  });
  expectOne(BASE + "adapter a on b { experts all { rslora 1 } }", "MIL201", {
    line: 2,
    column: 39,
    message: /`rslora` expects true or false, got `1`/,
  });
  expectOne(BASE + "adapter a on b { experts all { rank 4, 8 } }", "MIL201", {
    line: 2,
    column: 37,
    message: /`rank` takes one value \(a number\), got 2/,
  });
});

test("MIL202 rank not a positive integer", () => {
  expectOne(BASE + "adapter a on b { experts all { rank 0 } }", "MIL202", {
    line: 2,
    column: 37,
    message: /rank must be a positive integer, got 0/,
  });
  expectOne(BASE + "adapter a on b { experts all { rank 2.5 } }", "MIL202", {
    line: 2,
    column: 37,
    message: /got 2\.5/,
  });
});

test("MIL203 alpha not positive", () => {
  expectOne(BASE + "adapter a on b { experts all { alpha 0 } }", "MIL203", {
    line: 2,
    column: 38,
    message: /alpha must be greater than 0, got 0/,
  });
});

test("MIL204 dropout outside [0, 1)", () => {
  expectOne(BASE + "adapter a on b { experts all { dropout 1 } }", "MIL204", {
    line: 2,
    column: 40,
    message: /dropout must be at least 0 and below 1, got 1/,
  });
});

test("MIL205 non-positive or fractional base sizes", () => {
  expectOne("base b: llama { layers 0 }", "MIL205", {
    line: 1,
    column: 24,
    message: /`layers` must be a positive integer, got 0/,
  });
  expectOne("base b: llama { rms_norm_eps -1e-5 }", "MIL205", {
    line: 1,
    column: 30,
    message: /`rms_norm_eps` must be a positive number, got -1e-5/,
  });
});

test("MIL206 hidden_size not divisible by heads", () => {
  expectOne("base b: llama { hidden_size 100 heads 8 }", "MIL206", {
    line: 1,
    column: 17,
    message: /hidden_size 100 is not divisible by heads 8/,
  });
});

test("MIL207 heads not divisible by kv_heads", () => {
  expectOne("base b: llama { heads 8 kv_heads 3 }", "MIL207", {
    line: 1,
    column: 25,
    message: /heads 8 is not divisible by kv_heads 3/,
  });
});

test("MIL208 layers outside the base name its layer count", () => {
  expectOne(BASE + "adapter a on b { experts all layers 0..9 }", "MIL208", {
    line: 2,
    column: 40,
    message: /layer 9 is outside base `b`, which has 4 layers \(0\.\.3\)/,
  });
});

test("MIL209 reversed layer range", () => {
  expectOne(BASE + "adapter a on b { experts all layers 3..1 }", "MIL209", {
    line: 2,
    column: 37,
    message: /layer range 3\.\.1 is reversed/,
    hint: /write 1\.\.3/,
  });
});

test("MIL210 an adapter without experts", () => {
  expectOne(BASE + "adapter a on b { router off }", "MIL210", {
    line: 2,
    column: 9,
    message: /adapter `a` enables no experts/,
  });
  expectOne(BASE + "adapter a on b { experts all }\nadapter c extends a { experts all off }", "MIL210", {
    line: 3,
    column: 9,
    message: /`c` enables no experts/,
  });
});

// ---- 3xx files and imports

test("MIL301 import of a missing file", () => {
  expectOne('import "missing.milora"', "MIL301", {
    line: 1,
    column: 8,
    message: /cannot read \/virtual\/missing\.milora: no such file/,
  });
  const { diagnostics } = checkFiles(["/virtual/none.milora"]);
  assert.equal(
    diagnostics.map((d) => [d.code, d.span.file, d.message]),
    [["MIL301", "/virtual/none.milora", "cannot read /virtual/none.milora: no such file"]],
  );
});

test("MIL302 import cycle, named file by file", () => {
  const dir = tempDir({
    "a.milora": 'import "b.milora"\n' + BASE,
    "b.milora": 'import "a.milora"\n',
  });
  const { diagnostics } = checkFiles([join(dir, "a.milora")]);
  assert.is(diagnostics.length, 1);
  assert.is(diagnostics[0]!.code, "MIL302");
  assert.is(diagnostics[0]!.span.file, join(dir, "b.milora"));
  assert.equal([diagnostics[0]!.span.start.line, diagnostics[0]!.span.start.column], [1, 8]);
  assert.is(diagnostics[0]!.message, "import cycle: a.milora -> b.milora -> a.milora");
});

test("MIL303-MIL307 problems of a `from` config point at its path", () => {
  const dir = tempDir({
    "bad-json/config.json": "{ hidden_size: 64",
    "gpt2/config.json": JSON.stringify({ ...tinyConfig, model_type: "gpt2" }),
    "partial/config.json": JSON.stringify({ model_type: "llama", hidden_size: 64 }),
    "scaled/config.json": JSON.stringify({ ...tinyConfig, rope_scaling: { type: "yarn", factor: 2 } }),
  });
  const spec = join(dir, "spec.milora");
  const cases: [string, string, RegExp][] = [
    ["nowhere/config.json", "MIL303", /cannot read config .*nowhere\/config\.json: no such file/],
    ["bad-json/config.json", "MIL304", /is not valid JSON/],
    ["gpt2/config.json", "MIL305", /model_type "gpt2", which milora does not support/],
    ["partial/config.json", "MIL306", /lacks num_hidden_layers, num_attention_heads, intermediate_size, vocab_size/],
    ["scaled/config.json", "MIL307", /unsupported option: rope_scaling type "yarn"/],
  ];
  for (const [path, code, message] of cases) {
    expectOne(`base b from "${path}"`, code, { line: 1, column: 13, message }, spec);
  }
});

test("a `from` base reads the config next to the spec, and its block overrides it", () => {
  const dir = tempDir({ "models/tiny/config.json": JSON.stringify(tinyConfig) });
  const { program, diagnostics } = checkSource(
    'base t from "models/tiny/config.json" { max_positions 128 }',
    join(dir, "s.milora"),
  );
  assert.equal(diagnostics, []);
  const [t] = program.bases;
  assert.equal([t!.hiddenSize, t!.kvHeads, t!.headDim, t!.maxPositions], [64, 2, 16, 128]);
  assert.is(t!.configPath, join(dir, "models/tiny/config.json"));
});

test("diagnostics in an imported file carry that file's path", () => {
  const dir = tempDir({ "lib/common.milora": "base b: llama { layers 0 }" });
  const { diagnostics } = checkSource('import "lib/common.milora"', join(dir, "main.milora"));
  assert.equal(
    diagnostics.map((d) => [d.code, d.span.file]),
    [["MIL205", join(dir, "lib/common.milora")]],
  );
});

// ---- 4xx routing

test("MIL401 top_k larger than the experts of a layer names the layer", () => {
  expectOne(BASE + "adapter a on b { experts q_proj router { select top_k 2 } }", "MIL401", {
    line: 2,
    column: 55,
    message: /top_k 2 is larger than the 1 expert enabled in layer 0 \(and 3 more layers\): q_proj/,
  });
  expectOne(
    BASE + "adapter a on b { experts all at layers 3 { experts attn.* off } router { select top_k 4 } }",
    "MIL401",
    {
      line: 2,
      column: 87,
      message: /top_k 4 is larger than the 3 experts enabled in layer 3: gate_proj, up_proj, down_proj/,
    },
  );
});

test("MIL402 top_k not a positive integer", () => {
  expectOne(BASE + "adapter a on b { experts all router { select top_k 0 } }", "MIL402", {
    line: 2,
    column: 52,
    message: /top_k must be a positive integer, got 0/,
  });
});

test("MIL403 threshold outside (0, 1)", () => {
  expectOne(BASE + "adapter a on b { experts all router { select threshold 1.5 } }", "MIL403", {
    line: 2,
    column: 56,
    message: /threshold must be between 0 and 1 \(exclusive\), got 1\.5/,
  });
});

test("MIL404 selection rule with a wrong argument", () => {
  expectOne(BASE + "adapter a on b { experts all router { select dense 2 } }", "MIL404", {
    line: 2,
    column: 52,
    message: /`select dense` takes no argument/,
  });
});

test("MIL404 renormalize on dense selection, MIL104 a misspelt modifier", () => {
  expectOne(BASE + "adapter a on b { experts all router { select dense renormalize } }", "MIL404", {
    line: 2,
    column: 52,
    message: /already sum to 1/,
  });
  expectOne(BASE + "adapter a on b { experts all router { select top_k 2 renormalise } }", "MIL104", {
    line: 2,
    column: 54,
    message: /unknown selection modifier `renormalise`/,
    hint: /renormalize/,
  });
});

test("select renormalize and the paper's gates: the selection records the form; a variant's select replaces it whole", () => {
  const { program, diagnostics } = checkSource(
    BASE +
      "adapter a on b { experts all router { select top_k 2 renormalize  activation gelu } }\n" +
      "adapter t extends a { router { select threshold 0.25 renormalize } }\n" +
      "adapter p extends a { router { select top_k 3 } }\n",
    FILE,
  );
  assert.equal(diagnostics, []);
  const [a, t, p] = program.adapters;
  assert.equal(a!.router?.selection, { rule: "top_k", k: 2, renormalize: true });
  assert.is(a!.router?.activation, "gelu");
  assert.equal(t!.router?.selection, { rule: "threshold", threshold: 0.25, renormalize: true });
  assert.equal(p!.router?.selection, { rule: "top_k", k: 3, renormalize: false });
});

test("activation rational: the paper's orders by default, an options block overrides them, a variant keeps them", () => {
  const { program, diagnostics } = checkSource(
    BASE +
      "adapter a on b { experts all router { activation rational } }\n" +
      "adapter c on b { experts all router { activation rational { denominator 4 } } }\n" +
      "adapter v extends c { router { pooling mean } }\n" +
      "adapter g extends c { router { activation gelu } }\n",
    FILE,
  );
  assert.equal(diagnostics, []);
  const [a, c, v, g] = program.adapters;
  assert.equal([a!.router?.activation, a!.router?.rational], ["rational", { numerator: 6, denominator: 5 }]);
  assert.equal(c!.router?.rational, { numerator: 6, denominator: 4 });
  assert.equal(v!.router?.rational, { numerator: 6, denominator: 4 });
  assert.equal([g!.router?.activation, g!.router?.rational], ["gelu", undefined]);
});

test("MIL406 rational orders out of range, or an options block where none is taken", () => {
  expectOne(BASE + "adapter a on b { experts all router { activation rational { numerator 0 } } }", "MIL406", {
    line: 2,
    column: 71,
    message: /rational numerator order must be an integer from 1 to 10, got 0/,
    hint: /numerator 6 denominator 5/,
  });
  expectOne(BASE + "adapter a on b { experts all router { activation gelu { numerator 3 } } }", "MIL406", {
    line: 2,
    column: 39,
    message: /activation gelu takes no options block/,
  });
  expectOne(BASE + "adapter a on b { experts all router { pooling mean { numerator 3 } } }", "MIL406", {
    line: 2,
    column: 39,
    message: /`pooling` takes no options block/,
  });
  expectOne(BASE + "adapter a on b { experts all router { activation rational { numerater 3 } } }", "MIL103", {
    line: 2,
    column: 61,
    message: /unknown rational activation key `numerater`/,
    hint: /numerator/,
  });
});

test("MIL405 negative balance", () => {
  expectOne(BASE + "adapter a on b { experts all router { balance -0.1 } }", "MIL405", {
    line: 2,
    column: 47,
    message: /balance must be 0 or more, got -0\.1/,
  });
});

// ---- 5xx warnings

test("MIL501 warns that top_k 1 renormalize starves the router of gradient; the paper's top_k 1 does not", () => {
  expectOne(BASE + "adapter a on b { experts all router { select top_k 1 renormalize } }", "MIL501", {
    line: 2,
    column: 54,
    message: /top_k 1 renormalize the gate of the one chosen expert is always 1, so the router gets no gradient/,
    hint: /drop `renormalize`/,
  });
  assert.is(
    checkSource(BASE + "adapter a on b { experts all router { select top_k 1 renormalize } }", FILE).program.adapters.length,
    1,
  );
  assert.equal(checkSource(BASE + "adapter a on b { experts all router { select top_k 1 } }", FILE).diagnostics, []);
});

test("MIL502 warns about a balance coefficient above 1", () => {
  expectOne(BASE + "adapter a on b { experts all router { balance 5 } }", "MIL502", {
    line: 2,
    column: 47,
    message: /balance 5 is above 1/,
  });
});

test("MIL503 warns about an experts line later lines override entirely", () => {
  expectOne(BASE + "adapter a on b {\n  experts all { rank 4 }\n  experts attn.*, mlp.* { rank 8 }\n}", "MIL503", {
    line: 3,
    column: 3,
    message: /this experts line has no effect/,
  });
});

test("MIL504 warns about `at layers` outside the adapter's layers", () => {
  expectOne(BASE + "adapter a on b { experts all layers 0..1 at layers 1..3 { experts q_proj off } }", "MIL504", {
    line: 2,
    column: 52,
    message: /layers 2\.\.3 are not among the adapter's layers/,
  });
});

test("a declaration with a syntax error gets no follow-on errors", () => {
  const { diagnostics, program } = checkSource(
    BASE + "adapter a on b extends c { experts all }\nadapter d on b { experts all }",
    FILE,
  );
  assert.equal(
    diagnostics.map((d) => d.code),
    ["MIL002"],
  );
  assert.equal(
    program.adapters.map((a) => a.name),
    ["d"],
  );
});

test("an adapter on a broken base still has its own mistakes reported", () => {
  const { diagnostics } = checkSource("base b: llama { layers 0 }\nadapter a on b { experts al { rank 0 } }", FILE);
  assert.equal(
    diagnostics.map((d) => [d.code, d.span.start.line, d.span.start.column]),
    [
      ["MIL205", 1, 24],
      ["MIL102", 2, 26],
      ["MIL202", 2, 36],
    ],
  );
});

test("docs/language.md documents every code, the parser's included", () => {
  const docs = readFileSync(new URL("../../docs/language.md", import.meta.url), "utf8");
  const parser = readFileSync(new URL("../../grammar/parse.ts", import.meta.url), "utf8");
  const syntaxCodes = [...parser.matchAll(/^\/\/ \| (MIL0\d\d) \|/gm)].map((m) => m[1]!);
  assert.ok(syntaxCodes.length > 0);
  const missing = [...syntaxCodes, ...Object.keys(CHECK_CODES)].filter(
    (code) => !new RegExp(`\\| ${code}\\b`).test(docs),
  );
  assert.equal(missing, []);
});

test.run();
