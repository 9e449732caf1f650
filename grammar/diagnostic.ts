// Diagnostics as data. Every stage (lexer, parser, checker, loaders) reports problems in this
// shape; one printer (grammar/code-frame.ts) renders them for the CLI, the API and the tests.
import type { Span } from "./ast.ts";

export type Severity = "error" | "warning";

/** A stable code such as `MIL101`; each is documented in docs/language.md. */
export type DiagnosticCode = `MIL${number}`;

export interface Diagnostic {
  readonly code: DiagnosticCode;
  readonly severity: Severity;
  readonly message: string;
  readonly span: Span;
  /** A fix-it or suggestion, e.g. "did you mean up_proj?". */
  readonly hint?: string;
}
