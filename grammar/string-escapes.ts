// The one definition of .milora string escapes (`\"`, `\\`, `\n`), used both ways:
// the lexer unescapes what users wrote, the formatter escapes values back.

const ESCAPES: ReadonlyMap<string, string> = new Map([
  ['"', '"'],
  ["\\", "\\"],
  ["n", "\n"],
]);

export interface Unescaped {
  readonly value: string;
  /** Offsets (into the raw text) of backslashes that start an unknown escape. */
  readonly badEscapes: readonly number[];
}

/** Unescapes the text between the quotes; an unknown escape `\x` is kept as written and reported. */
export function unescapeString(raw: string): Unescaped {
  let value = "";
  const badEscapes: number[] = [];
  for (let i = 0; i < raw.length; i++) {
    const ch = raw[i] ?? "";
    if (ch !== "\\") {
      value += ch;
      continue;
    }
    const next = raw[i + 1];
    const replacement = next === undefined ? undefined : ESCAPES.get(next);
    if (replacement === undefined) {
      badEscapes.push(i);
      value += ch + (next ?? "");
    } else {
      value += replacement;
    }
    i++;
  }
  return { value, badEscapes };
}

/** A double-quoted literal that unescapes to `value`. */
export function quoteString(value: string): string {
  return `"${value.replace(/[\\"\n]/g, (ch) => (ch === "\n" ? "\\n" : `\\${ch}`))}"`;
}
