// Generated tokens -> text, a piece at a time: text is released only when it can no longer change,
// that is, not while a multi-byte character is half decoded (the incremental detokenizer holds it)
// and not while the end could still grow into a stop string. A stop string ends the text just before
// it (or just after it, with vLLM's include_stop_str_in_output). Work per token is bounded by the
// detokenizer's window and the longest stop string, not by the length of the output.
import { IncrementalDetokenizer } from "../../text/detokenizer.ts";

export interface TextStreamStep {
  /** New text since the last step. */
  readonly delta: string;
  /** A stop string appeared: generation should end. */
  readonly stopped: boolean;
}

export class TextStream {
  readonly #text: IncrementalDetokenizer;
  readonly #stops: readonly string[];
  readonly #includeStop: boolean;
  /** Decoded text not yet released (it could be the start of a stop string). */
  #held = "";
  #stopped = false;
  /** The stop string that ended the text, if one did. */
  stopString: string | undefined;

  constructor(decode: (ids: readonly number[]) => string, stops: readonly string[], options: { readonly includeStop?: boolean } = {}) {
    this.#text = new IncrementalDetokenizer(decode);
    this.#stops = stops;
    this.#includeStop = options.includeStop ?? false;
  }

  push(token: number): TextStreamStep {
    if (this.#stopped) return { delta: "", stopped: true };
    return this.#take(this.#text.push(token));
  }

  /** The text held back, once generation is over (a partial stop string is ordinary text then). */
  flush(): string {
    if (this.#stopped) return "";
    const step = this.#take(this.#text.flush());
    if (step.stopped) return step.delta;
    const rest = this.#held;
    this.#held = "";
    return step.delta + rest;
  }

  #take(piece: string): TextStreamStep {
    if (piece === "") return { delta: "", stopped: false };
    const held = this.#held + piece;
    let first: number | undefined;
    let which: string | undefined;
    for (const stop of this.#stops) {
      const at = held.indexOf(stop);
      if (at >= 0 && (first === undefined || at < first)) [first, which] = [at, stop];
    }
    if (first !== undefined) {
      this.#stopped = true;
      this.stopString = which;
      this.#held = "";
      return { delta: held.slice(0, this.#includeStop ? first + which!.length : first), stopped: true };
    }
    const keep = stopPrefixAtEnd(held, this.#stops);
    this.#held = held.slice(held.length - keep);
    return { delta: held.slice(0, held.length - keep), stopped: false };
  }
}

/** Length of the longest end of `text` that is the start of some stop string. */
function stopPrefixAtEnd(text: string, stops: readonly string[]): number {
  let longest = 0;
  for (const stop of stops) {
    for (let n = Math.min(stop.length - 1, text.length); n > longest; n--) {
      if (text.endsWith(stop.slice(0, n))) {
        longest = n;
        break;
      }
    }
  }
  return longest;
}
