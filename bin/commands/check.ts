// `milora check FILES`: every diagnostic with its code frame and a summary, then (when there are no
// errors) a budget table per adapter; or all of it as one JSON object with --json.
import { statSync } from "node:fs";
import { renderDiagnostics } from "../../grammar/code-frame.ts";
import type { Diagnostic } from "../../grammar/diagnostic.ts";
import { computeBudget } from "../../compiler/budget.ts";
import { renderBudgetTable } from "../../compiler/budget-table.ts";
import { checkFiles } from "../../compiler/check.ts";
import { ERROR_KINDS, userError } from "../../runtime/errors.ts";

function isFile(path: string): boolean {
  try {
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function diagnosticJson(d: Diagnostic) {
  const { span } = d;
  return {
    file: span.file,
    line: span.start.line,
    column: span.start.column,
    endLine: span.end.line,
    endColumn: span.end.column,
    code: d.code,
    severity: d.severity,
    message: d.message,
    hint: d.hint ?? null,
  };
}

/** Checks; exit 1 when a spec has errors (ERROR_KINDS.spec), an unreadable file thrown as a usage MiloraError. */
export async function checkCommand(files: string[], opts: { json?: boolean; color: boolean }): Promise<number> {
  const unreadable = files.filter((f) => !isFile(f));
  if (unreadable.length > 0) throw userError("usage", `cannot read ${unreadable.join(", ")}: no such file`);
  const { program, diagnostics, sources } = checkFiles(files);
  const errors = diagnostics.filter((d) => d.severity === "error").length;
  const warnings = diagnostics.length - errors;
  const adapters = errors > 0 ? [] : program.adapters.map((adapter) => ({ adapter, budget: computeBudget(adapter) }));

  if (opts.json) {
    const report = {
      files: [...sources.keys()],
      diagnostics: diagnostics.map(diagnosticJson),
      adapters: adapters.map(({ adapter, budget }) => ({ name: adapter.name, base: adapter.base.name, budget })),
    };
    process.stdout.write(JSON.stringify(report, null, 2) + "\n");
    return errors > 0 ? ERROR_KINDS.spec.exit : 0;
  }

  const color = opts.color && process.stdout.isTTY === true;
  // at most MAX_SHOWN_DIAGNOSTICS frames, then a count: a file with a million mistakes prints a screenful
  const out: string[] = renderDiagnostics(diagnostics, (file) => sources.get(file) ?? "", { color });
  const problems =
    diagnostics.length === 0 ? "no problems" : `${plural(errors, "error")}, ${plural(warnings, "warning")}`;
  out.push(`${problems} in ${plural(sources.size, "file")}`);
  for (const { adapter, budget } of adapters) out.push("", renderBudgetTable(adapter, budget, { color }));
  process.stdout.write(out.join("\n") + "\n");
  return errors > 0 ? ERROR_KINDS.spec.exit : 0;
}
