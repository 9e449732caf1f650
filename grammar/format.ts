// The canonical text of a spec. The AST is laid out as lines; each comment is then attached to
// a line by where it stood: after code on its line (trailing), or on a line of its own (leading
// the next line, or closing its block or the file).
import type {
  AdapterDecl,
  AdapterStatement,
  BaseDecl,
  Comment,
  ExpertsStmt,
  ImportDecl,
  LayerOverride,
  Property,
  RouterDecl,
  SelectClause,
  Span,
  SpecFile,
  Value,
} from "./ast.ts";
import { quoteString } from "./string-escapes.ts";

const INDENT = "  ";

interface Line {
  readonly indent: number;
  readonly text: string;
  /** Offset of the first source token this line prints. */
  readonly from: number;
  /** End of the source text a one-line node covers; equals `from` for a block's opening line. */
  readonly to: number;
  /** A block's closing `}`: comments just before it end the block. */
  readonly closing: boolean;
  /** First line of a top-level declaration that follows another. */
  readonly blankBefore: boolean;
  readonly leading: Comment[];
  readonly trailing: Comment[];
}

/** Canonical text of an AST from a file without syntax errors; comments are kept. */
export function formatSpec(ast: SpecFile): string {
  const lines = layout(ast);
  const endOfFile: Comment[] = [];
  const byOffset = [...lines].sort((a, b) => a.from - b.from);
  const code = codeOffsets(ast);
  for (const comment of ast.comments) {
    const before = lastBefore(code, comment.span.start.offset);
    if (before !== undefined && before.line === comment.span.start.line) {
      lastLineAt(byOffset, before.offset)?.trailing.push(comment);
    } else {
      const owner = ownerOf(byOffset, comment.span.start.offset);
      (owner?.leading ?? endOfFile).push(comment);
    }
  }
  return render(lines, endOfFile);
}

function render(lines: readonly Line[], endOfFile: readonly Comment[]): string {
  const out: string[] = [];
  let carried: Comment[] = [];
  for (const line of lines) {
    if (line.blankBefore) out.push("");
    const commentIndent = INDENT.repeat(line.closing ? line.indent + 1 : line.indent);
    for (const comment of [...carried, ...line.leading]) out.push(commentIndent + commentText(comment));
    let text = INDENT.repeat(line.indent) + line.text;
    carried = [];
    let lineEnded = false;
    for (const comment of line.trailing) {
      // after a line comment, or a block comment that ends on a later line, code is no longer
      // on this line: later comments lead the next line instead
      if (lineEnded) carried.push(comment);
      else text += ` ${commentText(comment)}`;
      lineEnded ||= comment.text.startsWith("//") || /[\r\n]/.test(comment.text);
    }
    out.push(text);
  }
  const tail = [...carried, ...endOfFile];
  if (tail.length > 0 && out.length > 0) out.push("");
  for (const comment of tail) out.push(commentText(comment));
  return out.length === 0 ? "" : `${out.join("\n")}\n`;
}

/** Output lines end in "\n", inside block comments too. */
function commentText(comment: Comment): string {
  return comment.text.replace(/\r\n?/g, "\n");
}

function layout(ast: SpecFile): Line[] {
  const lines: Line[] = [];
  const emit = (indent: number, text: string, span: Span, kind: "one" | "open" | "close"): void => {
    const from = kind === "close" ? span.end.offset - 1 : span.start.offset;
    lines.push({
      indent,
      text,
      from,
      to: kind === "one" ? span.end.offset : from,
      closing: kind === "close",
      blankBefore: false,
      leading: [],
      trailing: [],
    });
  };
  const block = (indent: number, header: string, span: Span, body: () => void): void => {
    emit(indent, `${header} {`, span, "open");
    body();
    emit(indent, "}", span, "close");
  };

  const declarations = [...ast.bases, ...ast.adapters].sort((a, b) => a.span.start.offset - b.span.start.offset);
  for (const [i, decl] of [...ast.imports, ...declarations].entries()) {
    const firstLine = lines.length;
    if (decl.kind === "ImportDecl") importLine(decl, emit);
    else if (decl.kind === "BaseDecl") baseLines(decl, emit, block);
    else adapterLines(decl, emit, block);
    // imports stay together; every other declaration is set apart by a blank line
    const first = lines[firstLine];
    if (first && i > 0 && decl.kind !== "ImportDecl") lines[firstLine] = { ...first, blankBefore: true };
  }
  return lines;
}

type Emit = (indent: number, text: string, span: Span, kind: "one" | "open" | "close") => void;
type Block = (indent: number, header: string, span: Span, body: () => void) => void;

function importLine(decl: ImportDecl, emit: Emit): void {
  emit(0, `import ${quoteString(decl.path.value)}`, decl.span, "one");
}

function baseLines(decl: BaseDecl, emit: Emit, block: Block): void {
  const source = decl.from ? ` from ${quoteString(decl.from.value)}` : `: ${decl.family?.name ?? ""}`;
  const header = `base ${decl.name.name}${source}`;
  if (decl.properties.length === 0) emit(0, header, decl.span, "one");
  else block(0, header, decl.span, () => decl.properties.forEach((p) => emit(1, property(p), p.span, "one")));
}

function adapterLines(decl: AdapterDecl, emit: Emit, block: Block): void {
  const parent = decl.extends ? `extends ${decl.extends.name}` : `on ${decl.on?.name ?? ""}`;
  block(0, `adapter ${decl.name.name} ${parent}`, decl.span, () => {
    for (const statement of decl.body) statementLines(statement, emit, block);
  });
}

function statementLines(statement: AdapterStatement, emit: Emit, block: Block): void {
  switch (statement.kind) {
    case "ExpertsStmt":
      return emit(1, experts(statement), statement.span, "one");
    case "Property":
      return emit(1, property(statement), statement.span, "one");
    case "LayerOverride":
      return layerOverrideLines(statement, emit, block);
    case "RouterDecl":
      return routerLines(statement, emit, block);
  }
}

function layerOverrideLines(override: LayerOverride, emit: Emit, block: Block): void {
  block(1, `at layers ${override.layers.map(value).join(", ")}`, override.span, () => {
    for (const statement of override.body) emit(2, experts(statement), statement.span, "one");
  });
}

function routerLines(router: RouterDecl, emit: Emit, block: Block): void {
  if (router.off) return emit(1, "router off", router.span, "one");
  const entries: (Property | SelectClause)[] = [...router.properties, ...(router.select ? [router.select] : [])];
  entries.sort((a, b) => a.span.start.offset - b.span.start.offset);
  block(1, "router", router.span, () => {
    for (const entry of entries) emit(2, entry.kind === "Property" ? property(entry) : select(entry), entry.span, "one");
  });
}

function experts(statement: ExpertsStmt): string {
  const patterns = statement.patterns.map((p) => (p.wildcard ? `${p.name}.*` : p.name)).join(", ");
  if (statement.off) return `experts ${patterns} off`;
  if (statement.properties.length === 0) return `experts ${patterns}`;
  return `experts ${patterns} { ${statement.properties.map(property).join(" ")} }`;
}

function select(clause: SelectClause): string {
  return `select ${clause.rule.name}${clause.argument ? ` ${clause.argument.text}` : ""}${clause.modifier ? ` ${clause.modifier.name}` : ""}`;
}

function property(p: Property): string {
  const options = p.options === undefined ? "" : p.options.length === 0 ? " { }" : ` { ${p.options.map(property).join(" ")} }`;
  return `${p.key.name} ${p.values.map(value).join(", ")}${options}`;
}

function value(v: Value): string {
  switch (v.kind) {
    case "Number":
      return v.text;
    case "String":
      return quoteString(v.value);
    case "Boolean":
      return String(v.value);
    case "Ident":
      return v.name;
    case "Range":
      return `${v.from.text}..${v.to.text}`;
  }
}

interface CodeOffset {
  /** An offset inside a token of code. */
  readonly offset: number;
  readonly line: number;
}

/** Where every node's first and last token lie, sorted: enough to tell if code precedes a comment on its line. */
function codeOffsets(ast: SpecFile): CodeOffset[] {
  const offsets: CodeOffset[] = [];
  const visit = (node: unknown): void => {
    if (Array.isArray(node)) return node.forEach(visit);
    if (typeof node !== "object" || node === null) return;
    const { span, kind } = node as { span?: Span; kind?: string };
    if (span && kind !== "Comment" && kind !== "SpecFile") {
      offsets.push({ offset: span.start.offset, line: span.start.line });
      offsets.push({ offset: span.end.offset - 1, line: span.end.line });
    }
    if (kind === "Comment") return;
    for (const [key, child] of Object.entries(node)) if (key !== "span") visit(child);
  };
  visit(ast);
  return offsets.sort((a, b) => a.offset - b.offset);
}

function lastBefore(code: readonly CodeOffset[], offset: number): CodeOffset | undefined {
  let found: CodeOffset | undefined;
  for (const c of code) {
    if (c.offset >= offset) break;
    found = c;
  }
  return found;
}

/** The line that prints the token at `offset`. */
function lastLineAt(byOffset: readonly Line[], offset: number): Line | undefined {
  let found: Line | undefined;
  for (const line of byOffset) {
    if (line.from > offset) break;
    found = line;
  }
  return found;
}

/** The line a comment on its own line belongs before: the one-line node around it, else the next line. */
function ownerOf(byOffset: readonly Line[], offset: number): Line | undefined {
  return byOffset.find((line) => line.from < offset && offset < line.to) ?? byOffset.find((line) => line.from > offset);
}
