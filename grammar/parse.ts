// The grammar's public entry: text in, AST and syntax diagnostics out. Never throws.
//
// Syntax diagnostic codes (docs/language.md copies this table):
//
// | code   | meaning                                                                  |
// |--------|--------------------------------------------------------------------------|
// | MIL001 | a character no token starts with (`#`, `;`, a lone `-`)                  |
// | MIL002 | a token where the grammar expects something else: "expected X, found Y"  |
// | MIL003 | a string with no closing `"` on its line                                 |
// | MIL004 | a `/*` comment with no closing `*/`                                      |
// | MIL005 | an unknown escape in a string (the escapes are `\"`, `\\` and `\n`)      |
// | MIL006 | `at` followed by something other than `layers` (or `layer`)              |
// | MIL007 | a router with more than one `select` rule                                |
// | MIL008 | blocks nested more than 32 deep (the grammar nests 3 deep)                |
// | MIL009 | more than 100 syntax errors: the rest of the file is not parsed           |
import { EOF, type IRecognitionException, type IToken } from "chevrotain";
import type { SpecFile } from "./ast.ts";
import { AstBuilder } from "./cst-to-ast.ts";
import type { Diagnostic } from "./diagnostic.ts";
import { LCurly, lex, RCurly, UnterminatedBlockComment, UnterminatedString } from "./lexer.ts";
import { MAX_SYNTAX_ERRORS, MiloraParser } from "./parser.ts";
import { SourceText } from "./source-text.ts";
import { SyntaxMessages } from "./syntax-messages.ts";

const messages = new SyntaxMessages();
/** Building the parser analyses the grammar; do it once, parsing is synchronous. */
const parser = new MiloraParser(messages);

export function parseSpec(text: string, file: string): { ast: SpecFile; diagnostics: Diagnostic[] } {
  const source = new SourceText(text, file);
  const lexed = lex(text);
  const { tokens, tooDeep } = withinDepth(lexed.tokens);
  messages.reset(tokens);
  const cst = parser.parseFile(tokens);
  const builder = new AstBuilder(source);
  const ast = builder.specFile(cst, lexed.comments);
  const limits: Diagnostic[] = [];
  if (tooDeep !== undefined) {
    const message = `blocks are nested more than ${MAX_DEPTH} deep here; the rest of the file is not parsed`;
    limits.push(limitDiagnostic("MIL008", source, tooDeep, message, "a spec nests blocks at most 3 deep: adapter { at layers ... { experts ... { } } }"));
  }
  const stopped = parser.stoppedAt;
  if (stopped !== undefined && !Number.isNaN(stopped.startOffset)) {
    const message = `${MAX_SYNTAX_ERRORS} syntax errors; the rest of the file is not parsed`;
    limits.push(limitDiagnostic("MIL009", source, stopped, message, "fix these and check again"));
  }
  const diagnostics = [
    ...lexicalDiagnostics(source, lexed.badCharacters, lexed.tokens, lexed.comments),
    ...syntaxDiagnostics(source, parser.errors, tokens.at(-1)),
    ...builder.diagnostics,
    ...limits,
  ].sort((a, b) => a.span.start.offset - b.span.start.offset || a.code.localeCompare(b.code));
  return { ast, diagnostics };
}

/** Braces open at once that the parser accepts: the grammar needs 3, and recovery from more is wasted work. */
export const MAX_DEPTH = 32;

/** The tokens up to the first "{" that opens block MAX_DEPTH + 1 (that "{", if any, is `tooDeep`). */
function withinDepth(tokens: IToken[]): { tokens: IToken[]; tooDeep?: IToken } {
  let depth = 0;
  for (let i = 0; i < tokens.length; i++) {
    const token = tokens[i]!;
    if (token.tokenType === LCurly && ++depth > MAX_DEPTH) return { tokens: tokens.slice(0, i), tooDeep: token };
    if (token.tokenType === RCurly && depth > 0) depth--;
  }
  return { tokens };
}

function limitDiagnostic(code: Diagnostic["code"], source: SourceText, at: IToken, message: string, hint: string): Diagnostic {
  return { code, severity: "error", message, span: source.span(at.startOffset, at.startOffset + at.image.length), hint };
}

/** Characters users type out of habit from other languages. */
const BAD_CHARACTER_HINTS: ReadonlyMap<string, string> = new Map([
  ["#", "comments start with // or /*"],
  [";", "no separator is needed between properties"],
  ["=", 'write "key value", without "="'],
]);

function lexicalDiagnostics(
  source: SourceText,
  badCharacters: readonly { offset: number; length: number }[],
  tokens: readonly IToken[],
  comments: readonly IToken[],
): Diagnostic[] {
  const diagnostics: Diagnostic[] = [];
  const error = (code: Diagnostic["code"], message: string, start: number, end: number, hint?: string): void => {
    diagnostics.push({ code, severity: "error", message, span: source.span(start, end), ...(hint && { hint }) });
  };
  for (const { offset, length } of badCharacters) {
    const text = source.text.slice(offset, offset + length);
    const what = length === 1 ? `character ${JSON.stringify(text)}` : `characters ${JSON.stringify(text)}`;
    error("MIL001", `unexpected ${what}`, offset, offset + length, BAD_CHARACTER_HINTS.get(text[0] ?? ""));
  }
  for (const token of tokens) {
    if (token.tokenType !== UnterminatedString) continue;
    const end = token.startOffset + token.image.length;
    error("MIL003", "unterminated string", token.startOffset, end, 'close it with " before the end of the line');
  }
  for (const comment of comments) {
    if (comment.tokenType !== UnterminatedBlockComment) continue;
    error("MIL004", "unterminated block comment", comment.startOffset, comment.startOffset + 2, "close it with */");
  }
  return diagnostics;
}

/**
 * One diagnostic per place: recovery can report the same token twice. An error at the end of the
 * file points just after its last token, where the missing text belongs.
 */
function syntaxDiagnostics(
  source: SourceText,
  errors: readonly IRecognitionException[],
  lastToken: IToken | undefined,
): Diagnostic[] {
  const endOfInput = lastToken ? lastToken.startOffset + lastToken.image.length : 0;
  const seen = new Set<number>();
  const diagnostics: Diagnostic[] = [];
  for (const e of errors) {
    const atEnd = e.token.tokenType === EOF || Number.isNaN(e.token.startOffset);
    const start = atEnd ? endOfInput : e.token.startOffset;
    if (seen.has(start)) continue;
    seen.add(start);
    const end = atEnd ? start : start + e.token.image.length;
    diagnostics.push({ code: "MIL002", severity: "error", message: e.message, span: source.span(start, end) });
  }
  return diagnostics;
}
