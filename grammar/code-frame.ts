// The one printer for diagnostics: a `file:line:col: error CODE: message` header, the source
// line under a line-number gutter with carets beneath the span, and the hint.
import pc from "picocolors";
import type { Diagnostic } from "./diagnostic.ts";
import { SourceText } from "./source-text.ts";

export function renderDiagnostic(d: Diagnostic, source: string | undefined, opts: { color?: boolean } = {}): string {
  const c = pc.createColors(opts.color ?? false);
  const paint = d.severity === "error" ? c.red : c.yellow;
  const { line, column } = d.span.start;
  const out = [`${c.bold(`${d.span.file}:${line}:${column}:`)} ${paint(c.bold(d.severity))} ${c.bold(`${d.code}: ${d.message}`)}`];
  if (source !== undefined) {
    const text = new SourceText(source, d.span.file).line(line);
    const width = String(line).length;
    // a multi-line span is underlined to the end of its first line
    const end = d.span.end.line === line ? d.span.end.column : text.length + 1;
    const carets = "^".repeat(Math.max(1, end - column));
    // keep tabs so the carets line up under tab-indented text
    const pad = text.slice(0, column - 1).replace(/[^\t]/g, " ");
    out.push(`${c.dim(`${String(line).padStart(width + 1)} |`)} ${text}`);
    out.push(`${c.dim(`${" ".repeat(width + 1)} |`)} ${pad}${paint(carets)}`);
  }
  if (d.hint !== undefined) out.push(`  ${c.cyan("= hint:")} ${d.hint}`);
  return out.join("\n");
}
