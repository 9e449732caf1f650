// A base block's key may carry an options block, as a router's may: `rope_scaling llama3 { factor 32 ... }`.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { formatSpec } from "../../grammar/format.ts";
import { parseSpec } from "../../grammar/parse.ts";

const SPEC = `base b: llama {
  hidden_size 64 rope_scaling llama3 { factor 32 low_freq_factor 1 high_freq_factor 4 original_max_positions 8192 }
  max_positions 131072
}
base c from "config.json" { rope_scaling linear { factor 2 } }
`;

test("the options block belongs to the key before it, and the key's span ends at the block's brace", () => {
  const { ast, diagnostics } = parseSpec(SPEC, "t.milora");
  assert.equal(diagnostics, []);
  const [hidden, scaling, maxPositions] = ast.bases[0]!.properties;
  assert.equal([hidden!.options, maxPositions!.options], [undefined, undefined]);
  assert.equal(scaling!.options?.map((o) => o.key.name), ["factor", "low_freq_factor", "high_freq_factor", "original_max_positions"]);
  assert.is(SPEC.slice(scaling!.span.start.offset, scaling!.span.end.offset), "rope_scaling llama3 { factor 32 low_freq_factor 1 high_freq_factor 4 original_max_positions 8192 }");
  assert.equal(ast.bases[1]!.properties[0]!.options?.map((o) => o.key.name), ["factor"]);
});

test("the formatter prints it on one line and reads back the same", () => {
  const formatted = formatSpec(parseSpec(SPEC, "t.milora").ast);
  assert.match(formatted, "  rope_scaling llama3 { factor 32 low_freq_factor 1 high_freq_factor 4 original_max_positions 8192 }\n");
  assert.is(formatSpec(parseSpec(formatted, "t.milora").ast), formatted);
});

test("an unclosed options block is a syntax error at its place, and the next declaration still parses", () => {
  const { ast, diagnostics } = parseSpec("base b: llama { rope_scaling linear { factor 2 }\nbase c: llama { layers 2 }\n", "t.milora");
  assert.ok(diagnostics.length > 0 && diagnostics.every((d) => d.severity === "error"));
  assert.equal(ast.bases.map((b) => b.name.name), ["b", "c"]);
});

test.run();
