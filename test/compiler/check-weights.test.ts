// The base's `weights` key: how the runtime stores the linear weights (f32, f16, q8 or q4), with the
// usual diagnostics for an unknown format or a value of the wrong type.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkSource } from "../../compiler/check.ts";
import { formatSpec } from "../../grammar/format.ts";
import { parseSpec } from "../../grammar/parse.ts";

const FILE = "/virtual/spec.milora";
const base = (key: string) => `base b: llama { hidden_size 64 layers 4 heads 4 intermediate_size 128 vocab_size 100 ${key} }\n`;

test("weights f16, q8 and q4 reach the base; absent, the base says nothing (the checkpoint decides)", () => {
  for (const format of ["f32", "f16", "q8", "q4"] as const) {
    const { program, diagnostics } = checkSource(base(`weights ${format}`), FILE);
    assert.equal(diagnostics, []);
    assert.is(program.bases[0]!.weights, format);
  }
  assert.not.ok("weights" in checkSource(base(""), FILE).program.bases[0]!);
});

test("an unknown format is MIL104 with a suggestion; a number or two values MIL201", () => {
  const one = (key: string) => {
    const { diagnostics } = checkSource(base(key), FILE);
    assert.is(diagnostics.length, 1, diagnostics.map((d) => d.message).join("\n"));
    return diagnostics[0]!;
  };
  const unknown = one("weights q2");
  assert.is(unknown.code, "MIL104");
  assert.match(unknown.message, /unknown weights `q2`/);
  assert.match(unknown.hint ?? "", /q8/);
  assert.is(one("weights 16").code, "MIL201");
  assert.is(one("weights f16, q8").code, "MIL201");
});

test("the formatter keeps the key", () => {
  assert.match(formatSpec(parseSpec(base("weights q8"), FILE).ast), /weights q8/);
});

test.run();
