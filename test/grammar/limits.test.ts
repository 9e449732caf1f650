// Inputs far beyond any real spec: deep nesting, floods of syntax errors, megabyte lines. Each gives a
// bounded set of diagnostics quickly, without allocating in proportion to the damage.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { FRAME_WIDTH, MAX_SHOWN_DIAGNOSTICS, renderDiagnostic, renderDiagnostics } from "../../grammar/code-frame.ts";
import { MAX_DEPTH, parseSpec } from "../../grammar/parse.ts";
import { MAX_SYNTAX_ERRORS } from "../../grammar/parser.ts";

const HEAD = "base b: llama { layers 2 }\nadapter a on b {\n";

/** Runs `work`, asserting it took under `ms` and grew the heap by under `mb` megabytes. */
function bounded<T>(ms: number, mb: number, work: () => T): T {
  globalThis.gc?.();
  const heap = process.memoryUsage().heapUsed;
  const started = performance.now();
  const result = work();
  const took = performance.now() - started;
  const grew = (process.memoryUsage().heapUsed - heap) / 2 ** 20;
  assert.ok(took < ms, `took ${took.toFixed(0)} ms`);
  assert.ok(grew < mb, `heap grew by ${grew.toFixed(0)} MB`);
  return result;
}

test("100,000 nested router blocks: one MIL008 where nesting passes the limit, and parsing stops there", () => {
  const text = HEAD + "router {\n".repeat(100_000); // 900 KB
  const { diagnostics } = bounded(3000, 200, () => parseSpec(text, "deep.milora"));
  const deep = diagnostics.filter((d) => d.code === "MIL008");
  assert.is(deep.length, 1);
  // the adapter's "{" is the first, so the router opening block MAX_DEPTH + 1 is router number MAX_DEPTH
  assert.equal([deep[0]!.span.start.line, deep[0]!.span.start.column], [2 + MAX_DEPTH, 8]);
  assert.match(deep[0]!.message, `nested more than ${MAX_DEPTH} deep`);
  assert.ok(diagnostics.length <= MAX_DEPTH + 2, `${diagnostics.length} diagnostics`);
});

test("a flood of syntax errors stops at MAX_SYNTAX_ERRORS with MIL009 naming where", () => {
  // each line is a declaration with a key but no value, so nesting stays shallow
  const text = "base b: llama { layers }\n".repeat(50_000);
  const { diagnostics } = bounded(3000, 200, () => parseSpec(text, "flood.milora"));
  const syntax = diagnostics.filter((d) => d.code === "MIL002");
  assert.ok(syntax.length <= MAX_SYNTAX_ERRORS, `${syntax.length} syntax errors`);
  assert.ok(syntax.length >= 10);
  const stop = diagnostics.filter((d) => d.code === "MIL009");
  assert.is(stop.length, 1);
  assert.match(stop[0]!.message, `${MAX_SYNTAX_ERRORS} syntax errors; the rest of the file is not parsed`);
  assert.equal([stop[0]!.span.start.line, stop[0]!.span.start.column], [MAX_SYNTAX_ERRORS, 24]);
});

test("a file with few errors reports them all, without MIL009", () => {
  const text = "base b: llama { layers }\n".repeat(5);
  const codes = parseSpec(text, "few.milora").diagnostics.map((d) => d.code);
  assert.equal(codes, ["MIL002", "MIL002", "MIL002", "MIL002", "MIL002"]);
  assert.not.ok(codes.includes("MIL009"));
});

test("a code frame of a 360 KB line shows a window around the caret", () => {
  const line = `adapter a on b { layers ${"1, ".repeat(60_000)}1 # ${"1, ".repeat(60_000)}1 }`;
  const { diagnostics } = parseSpec(line, "long.milora");
  const [d] = diagnostics;
  assert.ok(d);
  const frame = bounded(200, 20, () => renderDiagnostic({ ...d, span: { ...d.span } }, line));
  const [, shown, carets] = frame.split("\n");
  assert.ok(shown!.length < FRAME_WIDTH + 20, `frame line of ${shown!.length} characters`);
  assert.ok(shown!.startsWith(" 1 | ...") && shown!.endsWith("..."));
  // the caret stands under the token the diagnostic names
  const caretAt = carets!.indexOf("^");
  const found = line.slice(d.span.start.offset, d.span.end.offset);
  assert.is(shown!.slice(caretAt, caretAt + found.length), found);
});

test("short lines are framed whole, as before", () => {
  const text = "base b: llama { layers 2 }\nadapter a on b { rank }\n";
  const [d] = parseSpec(text, "short.milora").diagnostics;
  assert.match(renderDiagnostic(d!, text), " 2 | adapter a on b { rank }\n");
});

test("renderDiagnostics prints at most MAX_SHOWN_DIAGNOSTICS frames, then counts the rest", () => {
  const text = "base b: llama { layers # }\n".repeat(300);
  const { diagnostics } = parseSpec(text, "many.milora");
  assert.ok(diagnostics.length > MAX_SHOWN_DIAGNOSTICS);
  const out = renderDiagnostics(diagnostics, () => text);
  assert.is(out.length, MAX_SHOWN_DIAGNOSTICS + 1);
  assert.is(out.at(-1), `... and ${diagnostics.length - MAX_SHOWN_DIAGNOSTICS} more errors not shown\n`);
  assert.is(renderDiagnostics(diagnostics.slice(0, 3), () => text).length, 3);
});

test.run();
