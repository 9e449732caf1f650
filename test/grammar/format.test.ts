import { readFileSync } from "node:fs";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { formatSpec } from "../../grammar/format.ts";
import { parseSpec } from "../../grammar/parse.ts";

const fixture = (name: string): string => readFileSync(new URL(`fixtures/${name}`, import.meta.url), "utf8");

function format(text: string): string {
  const { ast, diagnostics } = parseSpec(text, "t.milora");
  assert.equal(diagnostics, []);
  return formatSpec(ast);
}

/** Declarations and comment texts without spans: what formatting must not change. */
function meaning(text: string): unknown {
  const { ast } = parseSpec(text, "t.milora");
  const withoutSpans = JSON.parse(JSON.stringify(ast, (key, v: unknown) => (key === "span" ? undefined : v)));
  return { ...withoutSpans, comments: ast.comments.map((c) => c.text.replace(/\r\n?/g, "\n")).sort() };
}

// The golden pair was reviewed by hand: messy layout in, canonical layout out, every comment kept.
test("a messy spec comes out in canonical form", () => {
  assert.fixture(format(fixture("messy.milora")), fixture("messy.formatted.milora"));
});

test("formatting is idempotent and keeps the meaning", () => {
  for (const name of ["messy.milora", "support-bot.milora"]) {
    const once = format(fixture(name));
    assert.is(format(once), once, name);
    assert.equal(meaning(once), meaning(fixture(name)), name);
  }
});

test("imports move first and stay together; declarations keep their order, a blank line apart", () => {
  assert.is(
    format('adapter a on m { experts all }\nimport "x.milora"\nbase m: llama\nimport "y.milora"'),
    'import "x.milora"\nimport "y.milora"\n\nadapter a on m {\n  experts all\n}\n\nbase m: llama\n',
  );
});

test("a comment on its own line stays before the node after it, at that node's indentation", () => {
  assert.is(
    format("base m: llama {\n// the width\n      hidden_size 64 }"),
    "base m: llama {\n  // the width\n  hidden_size 64\n}\n",
  );
});

test("a comment at the end of a line stays at the end of that line", () => {
  assert.is(
    format("adapter a on m { // tenant A\n router { when token } } // done"),
    "adapter a on m { // tenant A\n  router {\n    when token\n  }\n} // done\n",
  );
});

test("two comments that end up on one line: the second leads the next line", () => {
  assert.is(
    format("adapter a on m {\n  experts q_proj, // queries\n    v_proj // values\n}"),
    "adapter a on m {\n  experts q_proj, v_proj // queries\n  // values\n}\n",
  );
});

test("numbers keep their notation, strings are re-escaped", () => {
  assert.is(
    format('base m from "a\\\\b \\"q\\"" { rms_norm_eps 1E-05 rope_theta 1e4 }'),
    'base m from "a\\\\b \\"q\\"" {\n  rms_norm_eps 1E-05\n  rope_theta 1e4\n}\n',
  );
});

test("CRLF line endings, in comments too, come out as LF", () => {
  const messy = fixture("messy.milora");
  assert.is(format(messy.replace(/\n/g, "\r\n")), format(messy));
});

test("an empty file stays empty; a file of comments keeps them", () => {
  assert.is(format(""), "");
  assert.is(format("  // only a note\n\n"), "// only a note\n");
});

test.run();
