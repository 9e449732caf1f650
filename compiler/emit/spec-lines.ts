// Spec source lines for generated files: the text of a declaration with its line numbers, and the line
// that set each base hyper-parameter. Paths are shown relative to the compiled spec's folder, so the
// output does not depend on the directory `milora compile` ran in.
import { dirname, relative } from "node:path";
import type { AdapterStatement, Span } from "../../grammar/ast.ts";
import { parseSpec } from "../../grammar/parse.ts";
import { BASE_KEYS, type BaseKeyName } from "../base-keys.ts";
import type { Adapter, BaseModel, CheckedProgram } from "../model.ts";

/** One line of a source file, for a comment: `llama-tiny.milora:3  hidden_size 64`. */
export interface SpecLine {
  readonly file: string;
  readonly line: number;
  readonly text: string;
}

export class SpecLines {
  readonly #sources: ReadonlyMap<string, string>;
  readonly #root: string;

  /** `sources`: text by the path spans name; `specPath`: the spec being compiled. */
  constructor(sources: ReadonlyMap<string, string>, specPath: string) {
    this.#sources = sources;
    this.#root = dirname(specPath);
  }

  /** The path of a span's file as generated files show it. */
  display(file: string): string {
    return relative(this.#root, file).split("\\").join("/");
  }

  /** Every line a span covers. */
  lines(span: Span): SpecLine[] {
    const text = (this.#sources.get(span.file) ?? "").split(/\r?\n/);
    const out: SpecLine[] = [];
    for (let line = span.start.line; line <= span.end.line; line++) {
      out.push({ file: this.display(span.file), line, text: (text[line - 1] ?? "").trimEnd() });
    }
    return out;
  }

  /** The lines of an adapter's declarations (`spans`) that set a LoRA rank: `experts ... { rank N }`. */
  rankLines(spans: readonly Span[]): SpecLine[] {
    const out: SpecLine[] = [];
    for (const s of this.#statements(spans)) {
      if (s.kind !== "ExpertsStmt") continue;
      for (const p of s.properties) if (p.key.name === "rank") out.push(this.head(s.span));
    }
    return out;
  }

  /** Every line of the adapter declarations' (`spans`) `router { ... }` blocks, in order. */
  routerLines(spans: readonly Span[]): SpecLine[] {
    return this.#statements(spans).flatMap((s) => (s.kind === "RouterDecl" ? this.lines(s.span) : []));
  }

  /** The first line of a span (a declaration's head). */
  head(span: Span): SpecLine {
    return this.lines({ ...span, end: span.start })[0]!;
  }

  /** The statements of the adapter declarations at `spans`, layer overrides' bodies inlined. */
  #statements(spans: readonly Span[]): AdapterStatement[] {
    return spans.flatMap((span) => {
      const text = this.#sources.get(span.file);
      if (text === undefined) return [];
      const decl = parseSpec(text, span.file).ast.adapters.find((a) => a.span.start.offset === span.start.offset);
      return (decl?.body ?? []).flatMap((s): AdapterStatement[] => (s.kind === "LayerOverride" ? [...s.body] : [s]));
    });
  }

  /**
   * Where each of a base's hyper-parameters was written: the property line in its `base` block, or
   * nothing when the value came from the family's defaults or the `from` config file.
   */
  baseKeyLines(base: BaseModel): ReadonlyMap<BaseKeyName, SpecLine> {
    const text = this.#sources.get(base.span.file);
    const found = new Map<BaseKeyName, SpecLine>();
    if (text === undefined) return found;
    const decl = parseSpec(text, base.span.file).ast.bases.find((b) => b.name.name === base.name);
    for (const p of decl?.properties ?? []) {
      if (p.key.name in BASE_KEYS) found.set(p.key.name as BaseKeyName, this.head(p.span));
    }
    return found;
  }
}

/** `file:line  text`, the way generated comments cite a spec line. */
export function citeLine(l: SpecLine): string {
  return `${l.file}:${l.line}  ${l.text.trim()}`;
}

/** The declarations an adapter's meaning comes from: its base, the adapters it extends (outermost first), itself. */
export function declarationSpans(adapter: Adapter, program: CheckedProgram): Span[] {
  const chain: Adapter[] = [];
  for (let a: Adapter | undefined = adapter; a !== undefined && !chain.includes(a); ) {
    chain.unshift(a);
    const parent: string | undefined = a.extends;
    a = parent === undefined ? undefined : program.adapters.find((p) => p.name === parent);
  }
  return [adapter.base.span, ...chain.map((a) => a.span)];
}

/** Declarations as numbered source lines, each file named before its first declaration. */
export function numberedLines(lines: SpecLines, spans: readonly Span[]): string[] {
  const width = Math.max(...spans.map((s) => String(s.end.line).length));
  return spans.flatMap((span, i) => [
    ...(i > 0 ? [""] : []),
    ...(span.file !== spans[i - 1]?.file ? [`// ${lines.display(span.file)}`] : []),
    ...lines.lines(span).map((l) => `${String(l.line).padStart(width)} | ${l.text}`.trimEnd()),
  ]);
}
