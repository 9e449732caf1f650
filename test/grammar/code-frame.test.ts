import { test } from "uvu";
import * as assert from "uvu/assert";
import type { Span } from "../../grammar/ast.ts";
import { renderDiagnostic } from "../../grammar/code-frame.ts";
import type { Diagnostic } from "../../grammar/diagnostic.ts";
import { parseSpec } from "../../grammar/parse.ts";
import { SourceText } from "../../grammar/source-text.ts";

const SOURCE = "adapter bot on m {\n\texperts attn.* { rank 0 }\n}\n";

function diagnostic(span: Span, extra: Partial<Diagnostic> = {}): Diagnostic {
  return { code: "MIL123", severity: "error", message: "rank must be at least 1", span, ...extra };
}

test("header, source line with its number, carets under the span, hint", () => {
  const text = new SourceText(SOURCE, "spec.milora");
  const start = SOURCE.indexOf("0 }");
  const d = diagnostic(text.span(start, start + 1), { hint: "use rank 1 or more" });
  assert.is(
    renderDiagnostic(d, SOURCE),
    [
      "spec.milora:2:24: error MIL123: rank must be at least 1",
      " 2 | \texperts attn.* { rank 0 }",
      "   | \t                      ^",
      "  = hint: use rank 1 or more",
    ].join("\n"),
  );
});

test("a multi-line span is underlined to the end of its first line; warnings say so", () => {
  const text = new SourceText(SOURCE, "spec.milora");
  const d = diagnostic(text.span(0, SOURCE.length), { severity: "warning", message: "adapter never used" });
  assert.is(
    renderDiagnostic(d, SOURCE),
    ["spec.milora:1:1: warning MIL123: adapter never used", " 1 | adapter bot on m {", "   | ^^^^^^^^^^^^^^^^^^"].join("\n"),
  );
});

test("the gutter widens with the line number, and an empty span gets one caret", () => {
  const source = `${"\n".repeat(11)}base m: llama {`;
  const { diagnostics } = parseSpec(source, "wide.milora");
  assert.is(
    renderDiagnostic(diagnostics[0]!, source),
    [
      'wide.milora:12:16: error MIL002: expected "}" to close the "{" at 12:15, found end of file',
      " 12 | base m: llama {",
      "    |                ^",
    ].join("\n"),
  );
});

test("without the source only the header and hint are printed", () => {
  const d = diagnostic(new SourceText("x", "gone.milora").span(0, 1), { hint: "check the file" });
  assert.is(renderDiagnostic(d, undefined), "gone.milora:1:1: error MIL123: rank must be at least 1\n  = hint: check the file");
});

test("colour only when asked", () => {
  const d = diagnostic(new SourceText("x", "c.milora").span(0, 1));
  assert.not.match(renderDiagnostic(d, "x"), "\x1b[");
  const colored = renderDiagnostic(d, "x", { color: true });
  assert.match(colored, "\x1b[31m");
  assert.is(colored.replace(/\x1b\[\d+m/g, ""), renderDiagnostic(d, "x"));
});

test.run();
