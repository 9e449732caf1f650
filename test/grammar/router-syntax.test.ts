// The router block's two pieces of syntax beyond `key value`: `select RULE [ARG] renormalize` and an
// options block after a property (`activation rational { numerator 6 denominator 5 }`).
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { RouterDecl } from "../../grammar/ast.ts";
import { formatSpec } from "../../grammar/format.ts";
import { parseSpec } from "../../grammar/parse.ts";

const SPEC = `base b: llama { }
adapter a on b {
  experts all
  router { select top_k 2 renormalize  activation rational { numerator 6 denominator 4 }  pooling attention }
}
adapter c extends a { router { select dense activation gelu } }
`;

function router(text: string, adapter = 0): RouterDecl {
  const { ast, diagnostics } = parseSpec(text, "t.milora");
  assert.equal(diagnostics, []);
  return ast.adapters[adapter]!.body.find((s): s is RouterDecl => s.kind === "RouterDecl")!;
}

test("select takes a renormalize modifier; a property after the clause stays a property", () => {
  const r = router(SPEC);
  assert.is(r.select?.modifier?.name, "renormalize");
  assert.is(r.select?.argument?.value, 2);
  const dense = router(SPEC, 1);
  assert.is(dense.select?.modifier, undefined);
  assert.equal(dense.properties.map((p) => p.key.name), ["activation"]);
});

test("an options block belongs to the property before it, and its span ends at the block's brace", () => {
  const [activation, pooling] = router(SPEC).properties;
  assert.equal(activation!.options?.map((o) => [o.key.name, o.values[0]!.kind === "Number" ? o.values[0]!.value : undefined]), [["numerator", 6], ["denominator", 4]]);
  assert.is(pooling!.options, undefined);
  assert.is(SPEC.slice(activation!.span.start.offset, activation!.span.end.offset), "activation rational { numerator 6 denominator 4 }");
});

test("the formatter prints both forms on one line each and reads back the same", () => {
  const formatted = formatSpec(parseSpec(SPEC, "t.milora").ast);
  assert.match(formatted, "    select top_k 2 renormalize\n");
  assert.match(formatted, "    activation rational { numerator 6 denominator 4 }\n");
  assert.is(formatSpec(parseSpec(formatted, "t.milora").ast), formatted);
});

test.run();
