import { test } from "uvu";
import * as assert from "uvu/assert";
import type { Diagnostic } from "../../grammar/diagnostic.ts";
import { parseSpec } from "../../grammar/parse.ts";

/** `line:column CODE message` for each diagnostic, in order. */
function errors(text: string): string[] {
  return parseSpec(text, "t.milora").diagnostics.map(brief);
}

function brief(d: Diagnostic): string {
  return `${d.span.start.line}:${d.span.start.column} ${d.code} ${d.message}`;
}

test("MIL001: a character no token starts with, with a hint for the usual suspects", () => {
  const [d] = parseSpec("base m: llama {\n  layers = 32\n}", "t.milora").diagnostics;
  assert.is(brief(d!), '2:10 MIL001 unexpected character "="');
  assert.is(d!.hint, 'write "key value", without "="');
  assert.equal(errors("base m: llama { layers 2 #\n}"), ['1:26 MIL001 unexpected character "#"']);
});

test("MIL002: says what was expected after what, and what was found", () => {
  assert.equal(errors("adapter bot on m rank 8 }"), ['1:18 MIL002 expected "{" after "m", found "rank"']);
  assert.equal(errors("adapter bot m { }"), ['1:13 MIL002 expected "on" or "extends" after "bot", found "m"']);
  assert.equal(errors("base m: llama { rank }"), [
    '1:22 MIL002 expected a value (a number, a string, true, false or a name) after "rank", found "}"',
  ]);
  assert.equal(errors("adapter a on m { experts }"), [
    '1:26 MIL002 expected a module name (e.g. q_proj, attn.*, all) after "experts", found "}"',
  ]);
  assert.equal(errors("rank 8"), ['1:1 MIL002 expected "import", "base" or "adapter", found "rank"']);
  assert.equal(errors('base m from 12'), ['1:13 MIL002 expected a string after "from", found "12"']);
});

test("MIL002: a missing } at the end of the file is one error, just after the last token", () => {
  const text = "adapter a on m {\n  router {\n    when prompt\n";
  assert.equal(errors(text), ['3:16 MIL002 expected "}" to close the "{" at 2:10, found end of file']);
});

test("MIL002: a } too many is one error at that }", () => {
  assert.equal(errors("base m: llama { layers 2 } }\nbase n: llama"), ['1:28 MIL002 unexpected "}" with no matching "{"']);
});

test("MIL003: an unterminated string is reported, and the rest still parses", () => {
  const { ast, diagnostics } = parseSpec('base m from "cfg.json\nbase n: llama', "t.milora");
  assert.equal(diagnostics.map(brief), ["1:13 MIL003 unterminated string"]);
  assert.equal(
    ast.bases.map((b) => b.name.name),
    ["m", "n"],
  );
  assert.is(ast.bases[0]?.from?.value, "cfg.json");
});

test("MIL004: an unterminated block comment points at its opening", () => {
  assert.equal(errors("base m: llama\n  /* the rest"), ["2:3 MIL004 unterminated block comment"]);
});

test("MIL005: an unknown escape in a string points at the escape", () => {
  const [d] = parseSpec('import "dir\\tfile"', "t.milora").diagnostics;
  assert.is(brief(d!), '1:12 MIL005 unknown escape "\\t" in string');
  assert.is(d!.span.end.column - d!.span.start.column, 2);
});

test("MIL006: at takes layers", () => {
  assert.equal(errors("adapter a on m { at heads 1 { experts all } }"), ['1:21 MIL006 expected "layers" after "at", found "heads"']);
});

test("MIL007: a router with two select rules", () => {
  assert.equal(errors("adapter a on m { router { select dense select top_k 2 } }"), [
    "1:40 MIL007 a router takes one select rule; remove one of them",
  ]);
});

test("recovery: three separate errors, three diagnostics, and the rest of the AST", () => {
  const text = [
    "base m: llama {",
    "  layers 32",
    "  heads", // 1: property without a value
    "}",
    "adapter a on m {",
    "  experts attn.* { rank 8 alpha 16 }",
    "  router { select top_k 2 pooling }", // 2: property without a value
    "  layers 0..3",
    "}",
    "adapter b extends a {", // 3: never closed before the next declaration
    "  experts all",
    "base n: llama { layers 2 }",
  ].join("\n");
  const { ast, diagnostics } = parseSpec(text, "t.milora");
  assert.equal(diagnostics.map(brief), [
    '4:1 MIL002 expected a value (a number, a string, true, false or a name) after "heads", found "}"',
    '7:35 MIL002 expected a value (a number, a string, true, false or a name) after "pooling", found "}"',
    '12:1 MIL002 expected "}" to close the "{" at 10:21, found "base"',
  ]);
  assert.equal(
    ast.bases.map((b) => b.name.name),
    ["m", "n"],
  );
  assert.equal(
    ast.adapters.map((a) => [a.name.name, a.body.map((s) => s.kind)]),
    [
      ["a", ["ExpertsStmt", "RouterDecl", "Property"]],
      ["b", ["ExpertsStmt"]],
    ],
  );
});

test("messages and their order do not change between runs", () => {
  const text = "adapter a on { experts } router {\nbase ; m";
  assert.equal(errors(text), errors(text));
});

test.run();
