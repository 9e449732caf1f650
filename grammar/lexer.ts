// Tokens of the .milora language and the lexer that produces them.
// Keywords are reserved words, but `longer_alt` lets `offset` or `based` lex as identifiers.
// Token labels are the words diagnostics use for them ("a name", "\"{\"").
import { createToken, Lexer, type IToken, type TokenType } from "chevrotain";

export const Identifier = createToken({ name: "Identifier", pattern: /[A-Za-z_][A-Za-z0-9_]*/, label: "a name" });

function keyword(word: string): TokenType {
  return createToken({ name: `Kw_${word}`, pattern: new RegExp(word), longer_alt: Identifier, label: `"${word}"` });
}

export const Import = keyword("import");
export const Base = keyword("base");
export const Adapter = keyword("adapter");
export const On = keyword("on");
export const Extends = keyword("extends");
export const From = keyword("from");
export const Experts = keyword("experts");
export const Off = keyword("off");
export const At = keyword("at");
export const Router = keyword("router");
export const Select = keyword("select");
export const True = keyword("true");
export const False = keyword("false");

export const NumberLiteral = createToken({
  name: "NumberLiteral",
  pattern: /-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/,
  label: "a number",
});
export const StringLiteral = createToken({ name: "StringLiteral", pattern: Lexer.NA, label: "a string" });
const ClosedString = createToken({
  name: "ClosedString",
  pattern: /"(?:[^"\\\r\n]|\\.)*"/,
  categories: [StringLiteral],
  label: "a string",
});
/** A string that reaches the end of its line: still a string to the parser, so one mistake gives one error. */
export const UnterminatedString = createToken({
  name: "UnterminatedString",
  pattern: /"(?:[^"\\\r\n]|\\.)*\\?/,
  categories: [StringLiteral],
  label: "a string",
});

export const LineComment = createToken({ name: "LineComment", pattern: /\/\/[^\r\n]*/, group: "comments" });
export const BlockComment = createToken({ name: "BlockComment", pattern: /\/\*[^]*?\*\//, group: "comments" });
export const UnterminatedBlockComment = createToken({
  name: "UnterminatedBlockComment",
  pattern: /\/\*[^]*/,
  group: "comments",
});

export const LCurly = createToken({ name: "LCurly", pattern: "{", label: '"{"' });
export const RCurly = createToken({ name: "RCurly", pattern: "}", label: '"}"' });
export const Colon = createToken({ name: "Colon", pattern: ":", label: '":"' });
export const Comma = createToken({ name: "Comma", pattern: ",", label: '","' });
export const DotDot = createToken({ name: "DotDot", pattern: "..", label: '".."' });
export const Dot = createToken({ name: "Dot", pattern: ".", label: '"."' });
export const Star = createToken({ name: "Star", pattern: "*", label: '"*"' });
const WhiteSpace = createToken({ name: "WhiteSpace", pattern: /[ \t\r\n\f\v\uFEFF]+/, group: Lexer.SKIPPED });

export const allTokens: TokenType[] = [
  WhiteSpace,
  LineComment,
  BlockComment,
  UnterminatedBlockComment,
  ClosedString,
  UnterminatedString,
  StringLiteral,
  NumberLiteral,
  Import,
  Base,
  Adapter,
  On,
  Extends,
  From,
  Experts,
  Off,
  At,
  Router,
  Select,
  True,
  False,
  Identifier,
  LCurly,
  RCurly,
  Colon,
  Comma,
  DotDot,
  Dot,
  Star,
];

export const miloraLexer = new Lexer(allTokens, {
  positionTracking: "full",
  ensureOptimizations: true,
});

export interface LexResult {
  readonly tokens: IToken[];
  readonly comments: IToken[];
  /** Runs of characters no token matches: offset and length. */
  readonly badCharacters: readonly { offset: number; length: number }[];
}

export function lex(text: string): LexResult {
  const result = miloraLexer.tokenize(text);
  return {
    tokens: result.tokens,
    comments: result.groups["comments"] ?? [],
    badCharacters: result.errors.map((e) => ({ offset: e.offset, length: e.length })),
  };
}
