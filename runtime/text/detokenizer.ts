// Token ids -> text, one token at a time, in time linear in the output: each step decodes only a
// window of recent tokens, never the whole output again. The window starts a few tokens back (the
// "prefix"), so that what a tokenizer does at the start of a text (SentencePiece drops the space of
// a leading "▁word") does not reach the text released: the new text is decode(prefix + new) less
// decode(prefix). A token that ends inside a multi-byte character (byte-fallback or byte-level BPE:
// "☕" is three byte tokens) decodes to U+FFFD at the end; nothing is released until the character is
// whole. The server, `milora run` and the typed API all stream text through this one class.

/** After this many tokens still ending in U+FFFD the text is released as it is: the bytes are not UTF-8. */
const MAX_HELD_TOKENS = 8;

export class IncrementalDetokenizer {
  readonly #decode: (ids: readonly number[]) => string;
  readonly #tokens: number[] = [];
  /** Where the window's prefix starts, and where the tokens not yet released start. */
  #prefix = 0;
  #read = 0;
  #text = "";

  constructor(decode: (ids: readonly number[]) => string) {
    this.#decode = (ids) => (ids.length === 0 ? "" : decode(ids));
  }

  /** Every token pushed so far. */
  get tokens(): readonly number[] {
    return this.#tokens;
  }

  /** All text released so far. */
  get text(): string {
    return this.#text;
  }

  /** Takes one token; returns the text it completes ("" while a character is still partial). */
  push(token: number): string {
    this.#tokens.push(token);
    const prefixText = this.#decode(this.#tokens.slice(this.#prefix, this.#read));
    const full = this.#decode(this.#tokens.slice(this.#prefix));
    const held = this.#tokens.length - this.#read;
    if (full.length <= prefixText.length || (full.endsWith("\uFFFD") && held < MAX_HELD_TOKENS)) return "";
    const delta = full.startsWith(prefixText) ? full.slice(prefixText.length) : full.slice(commonPrefix(full, prefixText));
    this.#prefix = this.#read;
    this.#read = this.#tokens.length;
    this.#text += delta;
    return delta;
  }

  /** The text still held back (a trailing partial character), released once no more tokens come. */
  flush(): string {
    if (this.#read === this.#tokens.length) return "";
    const prefixText = this.#decode(this.#tokens.slice(this.#prefix, this.#read));
    const full = this.#decode(this.#tokens.slice(this.#prefix));
    const delta = full.slice(commonPrefix(full, prefixText));
    this.#prefix = this.#read;
    this.#read = this.#tokens.length;
    this.#text += delta;
    return delta;
  }
}

/** The whole text of `ids` as the incremental decoder releases it (held text flushed). */
export function detokenize(decode: (ids: readonly number[]) => string, ids: readonly number[]): string {
  const d = new IncrementalDetokenizer(decode);
  for (const id of ids) d.push(id);
  d.flush();
  return d.text;
}

function commonPrefix(a: string, b: string): number {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i;
}
