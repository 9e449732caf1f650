// Collects the checker's diagnostics; a code's severity comes from its number (5xx are warnings).
import type { Span } from "../grammar/ast.ts";
import type { Diagnostic } from "../grammar/diagnostic.ts";
import { severityOf, type CheckCode } from "./codes.ts";

export class Reporter {
  readonly diagnostics: Diagnostic[] = [];
  /** Errors among the diagnostics up to `counted`: a running count, so asking is O(1) however many there are. */
  private errors = 0;
  private counted = 0;

  report(code: CheckCode, span: Span, message: string, hint?: string): void {
    const d: Diagnostic = { code, severity: severityOf(code), message, span, ...(hint === undefined ? {} : { hint }) };
    this.diagnostics.push(d);
  }

  /** Counts what report() and direct pushes (loaders add theirs to `diagnostics`) have added since the last call. */
  get errorCount(): number {
    for (; this.counted < this.diagnostics.length; this.counted++) {
      if (this.diagnostics[this.counted]!.severity === "error") this.errors++;
    }
    return this.errors;
  }
}
