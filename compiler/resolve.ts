// Loading a program: parse the given files, follow their imports (reporting missing files and cycles),
// and work out which bases and adapters each file can see (its own and those of every file it imports,
// directly or not). Name clashes within what one file sees are errors.
import { readFileSync } from "node:fs";
import { dirname, relative, resolve } from "node:path";
import type { AdapterDecl, BaseDecl, Span, SpecFile } from "../grammar/ast.ts";
import type { Diagnostic } from "../grammar/diagnostic.ts";
import { parseSpec } from "../grammar/parse.ts";
import type { Reporter } from "./reporter.ts";
import { importPath, importProblem, importTextProblem } from "./spec-paths.ts";

export interface LoadedFile {
  /** The path as shown in diagnostics: as given for a root, joined onto the importer's path for an import. */
  readonly path: string;
  readonly absPath: string;
  readonly ast: SpecFile;
  /** Files this one imports, in order, without imports that would close a cycle. */
  readonly imports: LoadedFile[];
  /** Declarations with a syntax error in their text: only partly recovered, so not checked further. */
  readonly broken: ReadonlySet<BaseDecl | AdapterDecl>;
}

export interface Declared<D> {
  readonly decl: D;
  readonly file: LoadedFile;
}

/** What one file can refer to by name. */
export interface Scope {
  readonly bases: ReadonlyMap<string, Declared<BaseDecl>>;
  readonly adapters: ReadonlyMap<string, Declared<AdapterDecl>>;
}

export interface LoadedProgram {
  /** Every file once, imports before their importers. */
  readonly files: readonly LoadedFile[];
  readonly scopes: ReadonlyMap<LoadedFile, Scope>;
  /** Source text by display path, for code frames. */
  readonly sources: Map<string, string>;
}

export interface RootFile {
  readonly path: string;
  /** The text, when the caller has it already; otherwise it is read from `path`. */
  readonly text?: string;
}

export function loadProgram(roots: readonly RootFile[], reporter: Reporter): LoadedProgram {
  const files: LoadedFile[] = [];
  const byAbsPath = new Map<string, LoadedFile>();
  const sources = new Map<string, string>();
  const stack: string[] = [];

  const load = (path: string, text: string | undefined, importedAt: Span | undefined): LoadedFile | undefined => {
    const absPath = resolve(path);
    const onStack = stack.indexOf(absPath);
    if (onStack >= 0 && importedAt !== undefined) {
      const cycle = [...stack.slice(onStack), absPath];
      const from = dirname(cycle[0]!);
      reporter.report("MIL302", importedAt, `import cycle: ${cycle.map((p) => relative(from, p)).join(" -> ")}`);
      return undefined;
    }
    const seen = byAbsPath.get(absPath);
    if (seen !== undefined) return seen;

    if (text === undefined) {
      const at = { offset: 0, line: 1, column: 1 };
      const where = importedAt ?? { file: path, start: at, end: at };
      // an import reads only a .milora spec: anything else is named, never shown
      const problem = importedAt === undefined ? undefined : importProblem(path);
      if (problem !== undefined) {
        reporter.report("MIL301", where, problem);
        return undefined;
      }
      try {
        text = readFileSync(absPath, "utf8");
      } catch (err) {
        reporter.report("MIL301", where, `cannot read ${path}: ${readReason(err)}`);
        return undefined;
      }
      const binary = importedAt === undefined ? undefined : importTextProblem(path, text);
      if (binary !== undefined) {
        reporter.report("MIL301", where, binary);
        return undefined;
      }
    }
    sources.set(path, text);
    const { ast, diagnostics } = parseSpec(text, path);
    reporter.diagnostics.push(...diagnostics);

    stack.push(absPath);
    const imports: LoadedFile[] = [];
    for (const decl of ast.imports) {
      const imported = load(importPath(path, decl.path.value), undefined, decl.path.span);
      if (imported !== undefined) imports.push(imported);
    }
    stack.pop();

    const file: LoadedFile = { path, absPath, ast, imports, broken: brokenDecls(ast, diagnostics) };
    byAbsPath.set(absPath, file);
    files.push(file);
    return file;
  };

  for (const root of roots) load(root.path, root.text, undefined);

  const scopes = new Map<LoadedFile, Scope>();
  const clashes = new Set<object>();
  for (const file of files) scopes.set(file, scopeOf(file, reporter, clashes));
  return { files, scopes, sources };
}

function readReason(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === "ENOENT") return "no such file";
  if (code === "EISDIR") return "it is a directory";
  if (code === "EACCES" || code === "EPERM") return "permission denied";
  return code ?? (err as Error).message;
}

/** Files a file sees: everything it imports, directly or not, then itself (so its own clashing names come second). */
function visibleFiles(file: LoadedFile): LoadedFile[] {
  const seen = new Set<LoadedFile>();
  const visit = (f: LoadedFile): void => {
    if (seen.has(f)) return;
    for (const i of f.imports) visit(i);
    seen.add(f);
  };
  visit(file);
  return [...seen];
}

function scopeOf(file: LoadedFile, reporter: Reporter, reported: Set<object>): Scope {
  const bases = new Map<string, Declared<BaseDecl>>();
  const adapters = new Map<string, Declared<AdapterDecl>>();
  const add = <D extends BaseDecl | AdapterDecl>(
    map: Map<string, Declared<D>>,
    entry: Declared<D>,
    what: string,
  ): void => {
    const name = entry.decl.name.name;
    const first = map.get(name);
    if (first === undefined) {
      map.set(name, entry);
      return;
    }
    if (reported.has(entry.decl)) return;
    reported.add(entry.decl);
    const at = first.decl.name.span;
    reporter.report(
      "MIL106",
      entry.decl.name.span,
      `${what} \`${name}\` is already defined at ${at.file}:${at.start.line}:${at.start.column}`,
      `rename one of them`,
    );
  };
  for (const f of visibleFiles(file)) {
    for (const decl of f.ast.bases) add(bases, { decl, file: f }, "base");
    for (const decl of f.ast.adapters) add(adapters, { decl, file: f }, "adapter");
  }
  return { bases, adapters };
}

/**
 * Declarations with a syntax error between their start and the next declaration's: recovery may end
 * a node before the error, so its own span is not enough.
 */
function brokenDecls(ast: SpecFile, diagnostics: readonly Diagnostic[]): Set<BaseDecl | AdapterDecl> {
  const errors = diagnostics
    .filter((d) => d.severity === "error")
    .map((d) => d.span.start.offset)
    .sort((a, b) => a - b);
  const decls = [...ast.imports, ...ast.bases, ...ast.adapters].sort(
    (a, b) => a.span.start.offset - b.span.start.offset,
  );
  const broken = new Set<BaseDecl | AdapterDecl>();
  // both in offset order: one pass over each (linear, however many declarations and errors)
  let e = 0;
  decls.forEach((decl, i) => {
    const end = decls[i + 1]?.span.start.offset ?? Infinity;
    while (e < errors.length && errors[e]! < decl.span.start.offset) e++;
    if (decl.kind !== "ImportDecl" && e < errors.length && errors[e]! < end) broken.add(decl);
  });
  return broken;
}
