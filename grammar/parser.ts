// The .milora grammar as a Chevrotain CST parser. Rules are class properties so a misspelt
// SUBRULE is a compile error; labels name the CST children that cst-to-ast.ts reads.
import { CstParser, type CstNode, type IParserErrorMessageProvider, type IRecognitionException, type IToken } from "chevrotain";
import {
  Adapter,
  allTokens,
  At,
  Base,
  Colon,
  Comma,
  Dot,
  DotDot,
  Experts,
  Extends,
  False,
  From,
  Identifier,
  Import,
  LCurly,
  NumberLiteral,
  Off,
  On,
  RCurly,
  Router,
  Select,
  Star,
  StringLiteral,
  True,
} from "./lexer.ts";

const VALUE = "a value (a number, a string, true, false or a name)";

/** Syntax errors one parse reports before it stops: enough for any real file, bounded for any input. */
export const MAX_SYNTAX_ERRORS = 100;

/** Chevrotain internals the error cap uses (chevrotain 11: traits/error_handler.js, traits/lexer_adapter.js). */
interface ParserInternals {
  SAVE_ERROR(this: unknown, error: IRecognitionException): IRecognitionException;
  moveToTerminatedState(): void;
}

export class MiloraParser extends CstParser {
  constructor(errorMessageProvider: IParserErrorMessageProvider) {
    super(allTokens, { recoveryEnabled: true, nodeLocationTracking: "full", errorMessageProvider });
    this.performSelfAnalysis();
  }

  /** Syntax errors saved in this parse; at MAX_SYNTAX_ERRORS the parse stops (see SAVE_ERROR). */
  private errorCount = 0;
  /** The token at which the parse stopped for too many errors, if it did. */
  stoppedAt: IToken | undefined;

  /** Parses a file's tokens: at most MAX_SYNTAX_ERRORS errors, then the rest of the input is skipped. */
  parseFile(tokens: IToken[]): CstNode {
    this.input = tokens;
    this.errorCount = 0;
    this.stoppedAt = undefined;
    return this.specFile();
  }

  /**
   * Chevrotain's hook for each recognition error (an internal method, so reached through the prototype).
   * Recovery costs work per error, and a file of 100,000 broken blocks would spend it on every one; after
   * MAX_SYNTAX_ERRORS the parser jumps to the end of the input, and later errors (the blocks left open
   * there) are not kept.
   */
  SAVE_ERROR(error: IRecognitionException): IRecognitionException {
    if (this.stoppedAt !== undefined) return error;
    const saved = (CstParser.prototype as unknown as ParserInternals).SAVE_ERROR.call(this, error);
    if (++this.errorCount >= MAX_SYNTAX_ERRORS) {
      this.stoppedAt = error.token;
      (this as unknown as ParserInternals).moveToTerminatedState();
    }
    return saved;
  }

  /** The entry rule: a whole file. */
  public specFile = this.RULE("specFile", () => {
    this.MANY(() => this.SUBRULE(this.declaration));
  });

  /** Chevrotain's recovery re-synchronises at the next declaration keyword after an error. */
  public declaration = this.RULE("declaration", () => {
    this.OR({
      DEF: [
        { ALT: () => this.SUBRULE(this.importDecl) },
        { ALT: () => this.SUBRULE(this.baseDecl) },
        { ALT: () => this.SUBRULE(this.adapterDecl) },
      ],
      ERR_MSG: '"import", "base" or "adapter"',
    });
  });

  public importDecl = this.RULE("importDecl", () => {
    this.CONSUME(Import);
    this.CONSUME(StringLiteral, { LABEL: "path" });
  });

  public baseDecl = this.RULE("baseDecl", () => {
    this.CONSUME(Base);
    this.CONSUME(Identifier, { LABEL: "name" });
    this.OR([
      {
        ALT: () => {
          this.CONSUME(Colon);
          this.CONSUME2(Identifier, { LABEL: "family" });
        },
      },
      {
        ALT: () => {
          this.CONSUME(From);
          this.CONSUME(StringLiteral, { LABEL: "from" });
        },
      },
    ]);
    this.OPTION(() => this.SUBRULE(this.baseBlock));
  });

  /** A base's keys; one may carry an options block: `rope_scaling llama3 { factor 32 ... }`. */
  public baseBlock = this.RULE("baseBlock", () => {
    this.CONSUME(LCurly);
    this.MANY(() => {
      this.SUBRULE(this.property);
      this.OPTION(() => this.SUBRULE(this.propertyBlock));
    });
    this.CONSUME(RCurly);
  });

  public adapterDecl = this.RULE("adapterDecl", () => {
    this.CONSUME(Adapter);
    this.CONSUME(Identifier, { LABEL: "name" });
    this.OR([
      {
        ALT: () => {
          this.CONSUME(On);
          this.CONSUME2(Identifier, { LABEL: "on" });
        },
      },
      {
        ALT: () => {
          this.CONSUME(Extends);
          this.CONSUME3(Identifier, { LABEL: "extends" });
        },
      },
    ]);
    this.CONSUME(LCurly);
    this.MANY(() => this.SUBRULE(this.adapterStatement));
    this.CONSUME(RCurly);
  });

  public adapterStatement = this.RULE("adapterStatement", () => {
    this.OR({
      DEF: [
        { ALT: () => this.SUBRULE(this.expertsStmt) },
        { ALT: () => this.SUBRULE(this.layerOverride) },
        { ALT: () => this.SUBRULE(this.routerDecl) },
        { ALT: () => this.SUBRULE(this.property) },
      ],
      ERR_MSG: 'a statement ("experts", "at", "router" or a property)',
    });
  });

  public expertsStmt = this.RULE("expertsStmt", () => {
    this.CONSUME(Experts);
    this.AT_LEAST_ONE_SEP({
      SEP: Comma,
      DEF: () => this.SUBRULE(this.modulePattern),
      ERR_MSG: "a module name (e.g. q_proj, attn.*, all)",
    });
    this.OPTION(() => {
      this.OR([{ ALT: () => this.CONSUME(Off) }, { ALT: () => this.SUBRULE(this.propertyBlock) }]);
    });
  });

  public modulePattern = this.RULE("modulePattern", () => {
    this.CONSUME(Identifier, { LABEL: "name" });
    this.OPTION(() => {
      this.CONSUME(Dot);
      this.CONSUME(Star);
    });
  });

  public layerOverride = this.RULE("layerOverride", () => {
    this.CONSUME(At);
    this.CONSUME(Identifier, { LABEL: "keyword" });
    this.AT_LEAST_ONE_SEP({ SEP: Comma, DEF: () => this.SUBRULE(this.value), ERR_MSG: VALUE });
    this.CONSUME(LCurly);
    this.MANY(() => this.SUBRULE(this.expertsStmt));
    this.CONSUME(RCurly);
  });

  public routerDecl = this.RULE("routerDecl", () => {
    this.CONSUME(Router);
    this.OR([
      { ALT: () => this.CONSUME(Off) },
      {
        ALT: () => {
          this.CONSUME(LCurly);
          this.MANY(() => {
            this.OR2({
              DEF: [
                { ALT: () => this.SUBRULE(this.selectClause) },
                {
                  // A property may carry an options block: `activation rational { numerator 6 }`.
                  ALT: () => {
                    this.SUBRULE(this.property);
                    this.OPTION(() => this.SUBRULE(this.propertyBlock));
                  },
                },
              ],
              ERR_MSG: '"select" or a property',
            });
          });
          this.CONSUME(RCurly);
        },
      },
    ]);
  });

  public selectClause = this.RULE("selectClause", () => {
    this.CONSUME(Select);
    this.CONSUME(Identifier, { LABEL: "rule" });
    this.OPTION(() => this.CONSUME(NumberLiteral, { LABEL: "argument" }));
    // `select top_k 2 renormalize`: only a name spelt like "renormalize" is read as the modifier, so
    // that a property after the clause (`select dense activation gelu`) stays a property.
    this.OPTION2({
      GATE: () => /^renormali[sz]/.test(this.LA(1).image),
      DEF: () => this.CONSUME2(Identifier, { LABEL: "modifier" }),
    });
  });

  public propertyBlock = this.RULE("propertyBlock", () => {
    this.CONSUME(LCurly);
    this.MANY(() => this.SUBRULE(this.property));
    this.CONSUME(RCurly);
  });

  public property = this.RULE("property", () => {
    this.CONSUME(Identifier, { LABEL: "key" });
    this.AT_LEAST_ONE_SEP({ SEP: Comma, DEF: () => this.SUBRULE(this.value), ERR_MSG: VALUE });
  });

  public value = this.RULE("value", () => {
    this.OR({
      DEF: [
        {
          ALT: () => {
            this.CONSUME(NumberLiteral, { LABEL: "number" });
            this.OPTION(() => {
              this.CONSUME(DotDot);
              this.CONSUME2(NumberLiteral, { LABEL: "rangeEnd" });
            });
          },
        },
        { ALT: () => this.CONSUME(StringLiteral, { LABEL: "string" }) },
        { ALT: () => this.CONSUME(True, { LABEL: "boolean" }) },
        { ALT: () => this.CONSUME(False, { LABEL: "boolean" }) },
        { ALT: () => this.CONSUME(Identifier, { LABEL: "ident" }) },
      ],
      ERR_MSG: VALUE,
    });
  });
}
