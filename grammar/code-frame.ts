// The one printer for diagnostics: a `file:line:col: error CODE: message` header, the source
// line under a line-number gutter with carets beneath the span, and the hint.
import pc from "picocolors";
import type { Diagnostic } from "./diagnostic.ts";
import { SourceText } from "./source-text.ts";

/** Characters of a source line a frame shows at most, and how many of them come before the caret. */
export const FRAME_WIDTH = 120;
const FRAME_BEFORE = 40;

/** The line table of the last source rendered: a file's diagnostics are rendered one after another. */
let lastSource: SourceText | undefined;

function sourceText(text: string, file: string): SourceText {
  if (lastSource === undefined || lastSource.text !== text || lastSource.file !== file) lastSource = new SourceText(text, file);
  return lastSource;
}

/** Diagnostics printed at most by renderDiagnostics; the rest are counted. */
export const MAX_SHOWN_DIAGNOSTICS = 100;

/**
 * Frames for a list of diagnostics, at most `max` of them, then one line "... and N more" (errors and
 * warnings counted); each frame ends in a newline.
 */
export function renderDiagnostics(
  diagnostics: readonly Diagnostic[],
  sourceOf: (file: string) => string | undefined,
  opts: { color?: boolean; max?: number } = {},
): string[] {
  const max = opts.max ?? MAX_SHOWN_DIAGNOSTICS;
  const out = diagnostics.slice(0, max).map((d) => renderDiagnostic(d, sourceOf(d.span.file), opts) + "\n");
  const rest = diagnostics.slice(max);
  if (rest.length > 0) {
    const errors = rest.filter((d) => d.severity === "error").length;
    const kinds = [errors > 0 ? `${errors} more error${errors === 1 ? "" : "s"}` : "", rest.length > errors ? `${rest.length - errors} more warning${rest.length - errors === 1 ? "" : "s"}` : ""];
    out.push(`... and ${kinds.filter((k) => k !== "").join(" and ")} not shown\n`);
  }
  return out;
}

export function renderDiagnostic(d: Diagnostic, source: string | undefined, opts: { color?: boolean } = {}): string {
  const c = pc.createColors(opts.color ?? false);
  const paint = d.severity === "error" ? c.red : c.yellow;
  const { line, column } = d.span.start;
  const out = [`${c.bold(`${d.span.file}:${line}:${column}:`)} ${paint(c.bold(d.severity))} ${c.bold(`${d.code}: ${d.message}`)}`];
  if (source !== undefined) {
    const full = sourceText(source, d.span.file).line(line);
    const width = String(line).length;
    // a multi-line span is underlined to the end of its first line
    const endColumn = d.span.end.line === line ? d.span.end.column : full.length + 1;
    // a long line is shown as a window around the caret, so a 1 MB line costs one short frame
    const from = full.length <= FRAME_WIDTH ? 0 : Math.max(0, Math.min(column - 1 - FRAME_BEFORE, full.length - FRAME_WIDTH));
    const to = Math.min(full.length, from + FRAME_WIDTH);
    const before = from > 0 ? "..." : "";
    const text = before + full.slice(from, to) + (to < full.length ? "..." : "");
    const start = Math.min(column - 1, to);
    const carets = "^".repeat(Math.max(1, Math.min(endColumn - 1, to) - start));
    // keep tabs so the carets line up under tab-indented text
    const pad = (before + full.slice(from, start)).replace(/[^\t]/g, " ");
    out.push(`${c.dim(`${String(line).padStart(width + 1)} |`)} ${text}`);
    out.push(`${c.dim(`${" ".repeat(width + 1)} |`)} ${pad}${paint(carets)}`);
  }
  if (d.hint !== undefined) out.push(`  ${c.cyan("= hint:")} ${d.hint}`);
  return out.join("\n");
}
