import { test } from "uvu";
import * as assert from "uvu/assert";
import { lex } from "../../grammar/lexer.ts";

/** `TokenName:image` for each token, the way the parser will see them. */
function tokens(text: string): string[] {
  return lex(text).tokens.map((t) => `${t.tokenType.name}:${t.image}`);
}

test("numbers keep their written form, exponents and signs included", () => {
  assert.equal(tokens("8 0.05 1e-5 -2.5E+3 12e3"), [
    "NumberLiteral:8",
    "NumberLiteral:0.05",
    "NumberLiteral:1e-5",
    "NumberLiteral:-2.5E+3",
    "NumberLiteral:12e3",
  ]);
});

test("a range lexes as number, '..', number", () => {
  assert.equal(tokens("0..31"), ["NumberLiteral:0", "DotDot:..", "NumberLiteral:31"]);
  assert.equal(tokens("attn.*"), ["Identifier:attn", "Dot:.", "Star:*"]);
});

test("keywords are reserved only as whole words", () => {
  assert.equal(tokens("base based off offset at attn router routers"), [
    "Kw_base:base",
    "Identifier:based",
    "Kw_off:off",
    "Identifier:offset",
    "Kw_at:at",
    "Identifier:attn",
    "Kw_router:router",
    "Identifier:routers",
  ]);
  assert.equal(tokens("layers all top_k dense"), [
    "Identifier:layers",
    "Identifier:all",
    "Identifier:top_k",
    "Identifier:dense",
  ]);
});

test("strings keep their escapes for the parser to read", () => {
  assert.equal(tokens('"a\\"b\\\\c\\n" x'), ['ClosedString:"a\\"b\\\\c\\n"', "Identifier:x"]);
});

test("an unterminated string stops at the end of its line", () => {
  assert.equal(tokens('import "common\nbase'), ["Kw_import:import", 'UnterminatedString:"common', "Kw_base:base"]);
});

test("comments go to their own group, unterminated ones included", () => {
  const result = lex("a // one\n/* two\n lines */ b /* open");
  assert.equal(
    result.tokens.map((t) => t.image),
    ["a", "b"],
  );
  assert.equal(
    result.comments.map((t) => `${t.tokenType.name}:${t.image}`),
    ["LineComment:// one", "BlockComment:/* two\n lines */", "UnterminatedBlockComment:/* open"],
  );
});

test("characters no token starts with are reported as runs, and lexing goes on", () => {
  const result = lex("a #$ b ; c");
  assert.equal(
    result.tokens.map((t) => t.image),
    ["a", "b", "c"],
  );
  assert.equal(result.badCharacters, [
    { offset: 2, length: 2 },
    { offset: 7, length: 1 },
  ]);
});

test.run();
