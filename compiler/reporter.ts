// Collects the checker's diagnostics; a code's severity comes from its number (5xx are warnings).
import type { Span } from "../grammar/ast.ts";
import type { Diagnostic } from "../grammar/diagnostic.ts";
import { severityOf, type CheckCode } from "./codes.ts";

export class Reporter {
  readonly diagnostics: Diagnostic[] = [];

  report(code: CheckCode, span: Span, message: string, hint?: string): void {
    const d: Diagnostic = { code, severity: severityOf(code), message, span, ...(hint === undefined ? {} : { hint }) };
    this.diagnostics.push(d);
  }

  get errorCount(): number {
    return this.diagnostics.filter((d) => d.severity === "error").length;
  }
}
