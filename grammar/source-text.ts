// Maps offsets in a file's text to 1-based line/column positions and spans.
// Lexer, parser and code frame all use this one table so their notions of "line" agree.
import type { Position, Span } from "./ast.ts";

/** `\r\n`, `\r` and `\n` each end a line. */
const LINE_BREAK = /\r\n?|\n/g;

export class SourceText {
  readonly text: string;
  readonly file: string;
  /** Offset at which each line starts; lineStarts[0] is 0. */
  private readonly lineStarts: number[];

  constructor(text: string, file: string) {
    this.text = text;
    this.file = file;
    this.lineStarts = [0];
    for (const m of text.matchAll(LINE_BREAK)) this.lineStarts.push(m.index + m[0].length);
  }

  /** Position of an offset, clamped into [0, text.length]. */
  position(offset: number): Position {
    const at = Math.max(0, Math.min(offset, this.text.length));
    let lo = 0;
    let hi = this.lineStarts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if ((this.lineStarts[mid] ?? 0) <= at) lo = mid;
      else hi = mid - 1;
    }
    return { offset: at, line: lo + 1, column: at - (this.lineStarts[lo] ?? 0) + 1 };
  }

  /** The span of the half-open range [start, end). */
  span(start: number, end: number): Span {
    return { file: this.file, start: this.position(start), end: this.position(Math.max(start, end)) };
  }

  /** The text of a 1-based line, without its line break. */
  line(line: number): string {
    const start = this.lineStarts[line - 1];
    if (start === undefined) return "";
    const next = this.lineStarts[line];
    const raw = this.text.slice(start, next ?? this.text.length);
    return raw.replace(/\r\n?$|\n$/, "");
  }
}
