// Words for syntax errors: Chevrotain asks this provider for each message, and the answer
// names what was found and what was expected the way a user would say it.
import { EOF, tokenLabel, type IParserErrorMessageProvider, type IToken, type TokenType } from "chevrotain";
import { LCurly, RCurly } from "./lexer.ts";

const MAX_SHOWN = 24;

/** How a token reads in a message: `"rank"`, `the string "a.json"`, `end of file`. */
export function describeToken(token: IToken): string {
  if (token.tokenType === EOF) return "end of file";
  const image = token.image.length > MAX_SHOWN ? `${token.image.slice(0, MAX_SHOWN)}...` : token.image;
  return image.startsWith('"') ? `the string ${image}` : `"${image}"`;
}

function after(previous: IToken | undefined): string {
  return previous === undefined || previous.tokenType === EOF || Number.isNaN(previous.startOffset)
    ? ""
    : ` after ${describeToken(previous)}`;
}

/** "a", "a or b", "a, b or c", without repeats, in grammar order. */
function oneOf(labels: readonly string[]): string {
  const unique = [...new Set(labels)];
  return unique.length <= 1 ? (unique[0] ?? "") : `${unique.slice(0, -1).join(", ")} or ${unique.at(-1)}`;
}

function firstTokens(paths: readonly (readonly TokenType[])[]): string[] {
  return paths.flatMap((path) => (path[0] === undefined ? [] : [tokenLabel(path[0])]));
}

export class SyntaxMessages implements IParserErrorMessageProvider {
  private starts: number[] = [];
  /** openBefore[i]: the innermost "{" still open before token i (i = token count: at the end). */
  private openBefore: (IToken | undefined)[] = [undefined];

  /** Takes the tokens about to be parsed, so a missing "}" can name the "{" it should close. */
  reset(tokens: readonly IToken[]): void {
    const open: IToken[] = [];
    this.starts = tokens.map((t) => t.startOffset);
    this.openBefore = [];
    for (const token of tokens) {
      this.openBefore.push(open.at(-1));
      if (token.tokenType === LCurly) open.push(token);
      else if (token.tokenType === RCurly) open.pop();
    }
    this.openBefore.push(open.at(-1));
  }

  buildMismatchTokenMessage(o: { expected: TokenType; actual: IToken; previous: IToken }): string {
    if (o.expected === EOF) return this.strayToken(o.actual);
    if (o.expected === RCurly) {
      const open = this.unclosedBrace(o.actual);
      if (open !== undefined) {
        return `expected "}" to close the "{" at ${open.startLine}:${open.startColumn}, found ${describeToken(o.actual)}`;
      }
    }
    return `expected ${tokenLabel(o.expected)}${after(o.previous)}, found ${describeToken(o.actual)}`;
  }

  buildNotAllInputParsedMessage(o: { firstRedundant: IToken }): string {
    return this.strayToken(o.firstRedundant);
  }

  buildNoViableAltMessage(o: {
    expectedPathsPerAlt: TokenType[][][];
    actual: IToken[];
    previous: IToken;
    customUserDescription?: string;
  }): string {
    const expected = o.customUserDescription ?? oneOf(firstTokens(o.expectedPathsPerAlt.flat()));
    return this.expectedFound(expected, o.previous, o.actual[0]);
  }

  buildEarlyExitMessage(o: {
    expectedIterationPaths: TokenType[][];
    actual: IToken[];
    previous: IToken;
    customUserDescription?: string;
  }): string {
    const expected = o.customUserDescription ?? oneOf(firstTokens(o.expectedIterationPaths));
    return this.expectedFound(expected, o.previous, o.actual[0]);
  }

  private expectedFound(expected: string, previous: IToken, actual: IToken | undefined): string {
    return `expected ${expected}${after(previous)}, found ${actual === undefined ? "end of file" : describeToken(actual)}`;
  }

  /** A token after the last complete declaration. */
  private strayToken(token: IToken): string {
    return token.tokenType === RCurly
      ? 'unexpected "}" with no matching "{"'
      : `expected "import", "base" or "adapter", found ${describeToken(token)}`;
  }

  /** The innermost "{" still open where `at` stands. */
  private unclosedBrace(at: IToken): IToken | undefined {
    if (Number.isNaN(at.startOffset)) return this.openBefore.at(-1);
    let lo = 0;
    let hi = this.starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if ((this.starts[mid] ?? Infinity) < at.startOffset) lo = mid + 1;
      else hi = mid;
    }
    return this.openBefore[lo];
  }
}
