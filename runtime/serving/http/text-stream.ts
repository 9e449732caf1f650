// Generated tokens -> text, a piece at a time: text is released only when it can no longer change,
// that is, not while a multi-byte character is half decoded (U+FFFD at the end) and not while the end
// could still grow into a stop string. A stop string ends the text just before it.

export interface TextStreamStep {
  /** New text since the last step. */
  readonly delta: string;
  /** A stop string appeared: generation should end. */
  readonly stopped: boolean;
}

export class TextStream {
  readonly #tokens: number[] = [];
  #emitted = 0;
  #stopped = false;

  constructor(
    private readonly decode: (ids: readonly number[]) => string,
    private readonly stops: readonly string[],
  ) {}

  push(token: number): TextStreamStep {
    if (this.#stopped) return { delta: "", stopped: true };
    this.#tokens.push(token);
    const text = this.decode(this.#tokens);
    const hit = this.#firstStop(text);
    if (hit !== undefined) {
      this.#stopped = true;
      return { delta: this.#release(text, hit), stopped: true };
    }
    let safe = text.endsWith("\uFFFD") ? text.length - 1 : text.length;
    safe -= this.#stopPrefixAtEnd(text.slice(0, safe));
    return { delta: this.#release(text, safe), stopped: false };
  }

  /** The text held back, once generation is over (a partial stop string is ordinary text then). */
  flush(): string {
    return this.#stopped ? "" : this.#release(this.decode(this.#tokens), Infinity);
  }

  #release(text: string, upTo: number): string {
    const end = Math.min(upTo, text.length);
    if (end <= this.#emitted) return "";
    const delta = text.slice(this.#emitted, end);
    this.#emitted = end;
    return delta;
  }

  #firstStop(text: string): number | undefined {
    let first: number | undefined;
    for (const stop of this.stops) {
      // A stop can only start in text not yet released, or straddle its edge.
      const at = text.indexOf(stop, Math.max(0, this.#emitted - stop.length + 1));
      if (at >= 0 && (first === undefined || at < first)) first = at;
    }
    return first;
  }

  /** Length of the longest end of `text` that is the start of some stop string. */
  #stopPrefixAtEnd(text: string): number {
    let longest = 0;
    for (const stop of this.stops) {
      for (let n = Math.min(stop.length - 1, text.length); n > longest; n--) {
        if (text.endsWith(stop.slice(0, n))) {
          longest = n;
          break;
        }
      }
    }
    return longest;
  }
}
