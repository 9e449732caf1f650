import { readFileSync } from "node:fs";
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { AdapterDecl, Span } from "../../grammar/ast.ts";
import { parseSpec } from "../../grammar/parse.ts";

const EXAMPLE = readFileSync(new URL("fixtures/support-bot.milora", import.meta.url), "utf8");

/** The AST without spans: what the text says, not where. */
function shape(value: unknown): unknown {
  return JSON.parse(JSON.stringify(value, (key, v: unknown) => (key === "span" ? undefined : v)));
}

function parseClean(text: string) {
  const { ast, diagnostics } = parseSpec(text, "t.milora");
  assert.equal(diagnostics, []);
  return ast;
}

function adapterBody(text: string): unknown {
  const [adapter] = parseClean(`adapter a on b { ${text} }`).adapters;
  return shape((adapter as AdapterDecl).body);
}

/** `line:column-line:column` of a span, for readable assertions. */
function at(span: Span): string {
  return `${span.start.line}:${span.start.column}-${span.end.line}:${span.end.column}`;
}

test("the language reference example parses without diagnostics", () => {
  const ast = parseClean(EXAMPLE);
  assert.equal(
    ast.bases.map((b) => b.name.name),
    ["llama2_7b", "tiny", "tiny2"],
  );
  assert.equal(
    ast.adapters.map((a) => a.name.name),
    ["support_bot", "support_bot_token", "support_bot_lora"],
  );
  assert.is(ast.comments.length, 10);
});

test("import", () => {
  assert.equal(shape(parseClean('import "common.milora"').imports), [
    { kind: "ImportDecl", path: { kind: "String", value: "common.milora" } },
  ]);
});

test("base with a family and overrides, every kind of value", () => {
  const ast = parseClean('base m: llama { layers 32 rms_norm_eps 1e-5 tie_embeddings false name "x\\"y" act silu }');
  assert.equal(shape(ast.bases[0]), {
    kind: "BaseDecl",
    name: { kind: "Identifier", name: "m" },
    family: { kind: "Identifier", name: "llama" },
    properties: [
      { kind: "Property", key: { kind: "Identifier", name: "layers" }, values: [{ kind: "Number", value: 32, text: "32", integer: true }] },
      {
        kind: "Property",
        key: { kind: "Identifier", name: "rms_norm_eps" },
        values: [{ kind: "Number", value: 0.00001, text: "1e-5", integer: false }],
      },
      { kind: "Property", key: { kind: "Identifier", name: "tie_embeddings" }, values: [{ kind: "Boolean", value: false }] },
      { kind: "Property", key: { kind: "Identifier", name: "name" }, values: [{ kind: "String", value: 'x"y' }] },
      { kind: "Property", key: { kind: "Identifier", name: "act" }, values: [{ kind: "Ident", name: "silu" }] },
    ],
  });
});

test("base from a config file, with and without overrides", () => {
  const ast = parseClean('base a from "a.json"\nbase b from "b.json" { max_positions 512 }');
  assert.equal(shape(ast.bases), [
    { kind: "BaseDecl", name: { kind: "Identifier", name: "a" }, from: { kind: "String", value: "a.json" }, properties: [] },
    {
      kind: "BaseDecl",
      name: { kind: "Identifier", name: "b" },
      from: { kind: "String", value: "b.json" },
      properties: [
        {
          kind: "Property",
          key: { kind: "Identifier", name: "max_positions" },
          values: [{ kind: "Number", value: 512, text: "512", integer: true }],
        },
      ],
    },
  ]);
});

test("adapter on a base and adapter extending another", () => {
  const ast = parseClean("adapter a on m { }\nadapter b extends a { }");
  assert.equal(shape(ast.adapters), [
    { kind: "AdapterDecl", name: { kind: "Identifier", name: "a" }, on: { kind: "Identifier", name: "m" }, body: [] },
    { kind: "AdapterDecl", name: { kind: "Identifier", name: "b" }, extends: { kind: "Identifier", name: "a" }, body: [] },
  ]);
});

test("experts: patterns with options, off, and bare", () => {
  assert.equal(adapterBody("experts attn.*, down_proj { rank 8 alpha 16 } experts k_proj off experts all"), [
    {
      kind: "ExpertsStmt",
      patterns: [
        { kind: "ModulePattern", name: "attn", wildcard: true },
        { kind: "ModulePattern", name: "down_proj", wildcard: false },
      ],
      off: false,
      properties: [
        { kind: "Property", key: { kind: "Identifier", name: "rank" }, values: [{ kind: "Number", value: 8, text: "8", integer: true }] },
        { kind: "Property", key: { kind: "Identifier", name: "alpha" }, values: [{ kind: "Number", value: 16, text: "16", integer: true }] },
      ],
    },
    { kind: "ExpertsStmt", patterns: [{ kind: "ModulePattern", name: "k_proj", wildcard: false }], off: true, properties: [] },
    { kind: "ExpertsStmt", patterns: [{ kind: "ModulePattern", name: "all", wildcard: false }], off: false, properties: [] },
  ]);
});

test("layers as ranges, lists and names", () => {
  const range = (from: number, to: number) => ({
    kind: "Range",
    from: { kind: "Number", value: from, text: String(from), integer: true },
    to: { kind: "Number", value: to, text: String(to), integer: true },
  });
  assert.equal(adapterBody("layers 0..3, 8, 10..12 layers all"), [
    {
      kind: "Property",
      key: { kind: "Identifier", name: "layers" },
      values: [range(0, 3), { kind: "Number", value: 8, text: "8", integer: true }, range(10, 12)],
    },
    { kind: "Property", key: { kind: "Identifier", name: "layers" }, values: [{ kind: "Ident", name: "all" }] },
  ]);
});

test("per-layer override holds experts statements", () => {
  assert.equal(adapterBody("at layer 5 { experts mlp.* { rank 4 } experts q_proj off }"), [
    {
      kind: "LayerOverride",
      layers: [{ kind: "Number", value: 5, text: "5", integer: true }],
      body: [
        {
          kind: "ExpertsStmt",
          patterns: [{ kind: "ModulePattern", name: "mlp", wildcard: true }],
          off: false,
          properties: [
            { kind: "Property", key: { kind: "Identifier", name: "rank" }, values: [{ kind: "Number", value: 4, text: "4", integer: true }] },
          ],
        },
        { kind: "ExpertsStmt", patterns: [{ kind: "ModulePattern", name: "q_proj", wildcard: false }], off: true, properties: [] },
      ],
    },
  ]);
});

test("router with properties and a select rule, and router off", () => {
  assert.equal(adapterBody("router { pooling last select top_k 2 noise true } router { select dense } router off"), [
    {
      kind: "RouterDecl",
      off: false,
      properties: [
        { kind: "Property", key: { kind: "Identifier", name: "pooling" }, values: [{ kind: "Ident", name: "last" }] },
        { kind: "Property", key: { kind: "Identifier", name: "noise" }, values: [{ kind: "Boolean", value: true }] },
      ],
      select: {
        kind: "SelectClause",
        rule: { kind: "Identifier", name: "top_k" },
        argument: { kind: "Number", value: 2, text: "2", integer: true },
      },
    },
    { kind: "RouterDecl", off: false, properties: [], select: { kind: "SelectClause", rule: { kind: "Identifier", name: "dense" } } },
    { kind: "RouterDecl", off: true, properties: [] },
  ]);
});

test("spans cover exactly the text of each node", () => {
  const ast = parseClean(EXAMPLE);
  const [, , tiny2] = ast.bases;
  const adapter = ast.adapters[0] as AdapterDecl;
  assert.is(at(tiny2!.span), "17:1-17:49");
  assert.is(at(tiny2!.from!.span), "17:17-17:27");
  assert.is(at(adapter.span), "19:1-38:2");
  assert.is(at(adapter.name.span), "19:9-19:20");
  const experts = adapter.body[0]!;
  assert.is(at(experts.span), "20:3-20:70");
  const layers = adapter.body[4]!;
  assert.is(at(layers.span), "24:3-24:15");
  assert.is(EXAMPLE.slice(layers.span.start.offset, layers.span.end.offset), "layers 0..31");
  assert.is(at(ast.comments[0]!.span), "1:1-1:42");
  assert.is(ast.span.end.offset, EXAMPLE.length);
});

test("newlines are only whitespace: the same spec on one line parses the same", () => {
  const oneLine = EXAMPLE.replace(/\/\/.*$/gm, "").replace(/\s+/g, " ");
  const multi = parseClean(EXAMPLE);
  assert.equal(shape({ ...parseClean(oneLine), comments: [] }), shape({ ...multi, comments: [] }));
});

test.run();
