// Streaming text out of tokens: nothing released that could still change, stop strings cut exactly.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { TextStream } from "../../../../runtime/serving/http/text-stream.ts";

/** A toy vocabulary: token i is PIECES[i]; "\uFFFD" stands for half a character. */
const PIECES = ["he", "llo", " wor", "ld", "\uFFFD", "é", "!"];
const decode = (ids: readonly number[]) => ids.map((i) => PIECES[i]).join("").replace("\uFFFDé", "é");

function run(tokens: number[], stops: string[]) {
  const s = new TextStream(decode, stops);
  const deltas = tokens.map((t) => s.push(t));
  return { deltas: deltas.map((d) => d.delta), stopped: deltas.map((d) => d.stopped), rest: s.flush() };
}

test("without stops every token's text is released at once, and the pieces add up", () => {
  const r = run([0, 1, 2, 3], []);
  assert.equal(r.deltas, ["he", "llo", " wor", "ld"]);
  assert.is(r.rest, "");
});

test("a half-decoded character is held until it completes", () => {
  assert.equal(run([0, 4, 5], []).deltas, ["he", "", "é"]);
});

test("text that may begin a stop string waits; a stop string ends the text before it", () => {
  const r = run([0, 1, 2, 3, 6], ["o wo"]);
  assert.equal(r.deltas, ["he", "ll", "", "", ""]);
  assert.equal(r.stopped, [false, false, true, true, true]);
  assert.is(r.rest, "");
});

test("held text comes out at the end when the stop string never completes", () => {
  const r = run([0, 1], ["lox"]);
  assert.equal(r.deltas, ["he", "l"]);
  assert.is(r.rest, "lo");
});

test.run();
