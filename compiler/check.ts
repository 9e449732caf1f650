// The checker's entry points: files in, every diagnostic and the checked program out. Phases run in a
// fixed order: load and parse (following imports), scopes, bases, adapters.
import type { BaseDecl } from "../grammar/ast.ts";
import type { Diagnostic } from "../grammar/diagnostic.ts";
import { AdapterChecker } from "./check-adapter.ts";
import { checkBase } from "./check-base.ts";
import type { Adapter, BaseModel, CheckedProgram } from "./model.ts";
import { Reporter } from "./reporter.ts";
import { loadProgram, type RootFile } from "./resolve.ts";

export interface CheckResult {
  /** The bases and adapters that checked without errors, in file order (imports first). */
  program: CheckedProgram;
  diagnostics: Diagnostic[];
  /** Source text by the path diagnostics name, for code frames. */
  sources: Map<string, string>;
}

/** Reads the files and the files they import, and checks them all. Never throws on user input. */
export function checkFiles(paths: string[]): CheckResult {
  return checkRoots(paths.map((path) => ({ path })));
}

/** Checks text as if it were the file `file`; its imports are read relative to that file's folder. */
export function checkSource(text: string, file: string): CheckResult {
  return checkRoots([{ path: file, text }]);
}

function checkRoots(roots: RootFile[]): CheckResult {
  const r = new Reporter();
  const { files, scopes, sources } = loadProgram(roots, r);

  const bases = new Map<BaseDecl, BaseModel | undefined>();
  for (const file of files) {
    for (const decl of file.ast.bases) {
      bases.set(decl, file.broken.has(decl) ? undefined : checkBase(decl, file.path, r));
    }
  }
  const adapterChecker = new AdapterChecker(scopes, bases, r);
  const adapters: Adapter[] = [];
  for (const file of files) {
    for (const decl of file.ast.adapters) {
      const adapter = adapterChecker.check({ decl, file });
      if (adapter !== undefined) adapters.push(adapter);
    }
  }
  const program: CheckedProgram = {
    bases: [...bases.values()].filter((b): b is BaseModel => b !== undefined),
    adapters,
  };
  return { program, diagnostics: inReadingOrder(r.diagnostics, [...sources.keys()]), sources };
}

/** Diagnostics by file (in load order), then by position, so output reads top to bottom. */
function inReadingOrder(diagnostics: readonly Diagnostic[], files: readonly string[]): Diagnostic[] {
  const rank = (d: Diagnostic) => files.indexOf(d.span.file);
  return [...diagnostics].sort((a, b) => rank(a) - rank(b) || a.span.start.offset - b.span.start.offset);
}
