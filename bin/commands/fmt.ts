// `milora fmt`: canonical formatting of .milora files. Prints one file, rewrites files in place
// (--write, atomically), or lists the files that are not formatted (--check).
import { chmodSync, readFileSync, realpathSync, renameSync, statSync, unlinkSync, writeFileSync } from "node:fs";
import { renderDiagnostic } from "../../grammar/code-frame.ts";
import { formatSpec } from "../../grammar/format.ts";
import { parseSpec } from "../../grammar/parse.ts";
import { ERROR_KINDS, reportError, userError, type ErrorKind } from "../../runtime/errors.ts";

/** What happened to one file: its formatted text, or the exit code of why there is none. */
type Outcome = { readonly text: string; readonly formatted: string } | { readonly exitCode: number };

export async function fmtCommand(files: string[], opts: { write?: boolean; check?: boolean }): Promise<number> {
  if (opts.write && opts.check) return usage("--write and --check do not go together");
  if (files.length > 1 && !opts.write && !opts.check) return usage("give one file to print, or use --write or --check");
  let exitCode = 0;
  const unformatted: string[] = [];
  for (const file of files) {
    const outcome = formatFile(file);
    if ("exitCode" in outcome) {
      exitCode = Math.max(exitCode, outcome.exitCode);
    } else if (opts.check) {
      if (outcome.formatted !== outcome.text) unformatted.push(file);
    } else if (opts.write) {
      if (outcome.formatted !== outcome.text) exitCode = Math.max(exitCode, writeFormatted(file, outcome.formatted));
    } else {
      process.stdout.write(outcome.formatted);
    }
  }
  if (unformatted.length > 0) {
    process.stderr.write(`${unformatted.length} file(s) not formatted (run \`milora fmt --write\`):\n`);
    for (const file of unformatted) process.stdout.write(`${file}\n`);
    // exit 1, as `milora check` for a spec with errors: the check failed
    exitCode = Math.max(exitCode, ERROR_KINDS.spec.exit);
  }
  return exitCode;
}

function formatFile(file: string): Outcome {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    return { exitCode: fail("usage", `cannot read ${file}: ${reason(err)}`) };
  }
  const { ast, diagnostics } = parseSpec(text, file);
  const errors = diagnostics.filter((d) => d.severity === "error");
  if (errors.length > 0) {
    const color = process.stderr.isTTY === true && !process.env["NO_COLOR"];
    for (const d of errors) process.stderr.write(`${renderDiagnostic(d, text, { color })}\n`);
    return { exitCode: fail("spec", `${file} has syntax errors; not formatted`) };
  }
  return { text, formatted: formatSpec(ast) };
}

/**
 * Readers of `file` see the old text or the new, never half of it: write a temp file, then rename.
 * A symbolic link stays a link: the temp file goes beside its target, which the rename replaces.
 */
function writeFormatted(file: string, text: string): number {
  let target: string;
  try {
    target = realpathSync(file);
  } catch (err) {
    return fail("file", `cannot write ${file}: ${reason(err)}`);
  }
  const temp = `${target}.${process.pid}.tmp`;
  try {
    writeFileSync(temp, text, { flag: "wx" });
    chmodSync(temp, statSync(target).mode);
    renameSync(temp, target);
  } catch (err) {
    const code = fail("file", `cannot write ${file}: ${reason(err)}`);
    try {
      unlinkSync(temp);
    } catch {
      // the temp file was never created
    }
    return code;
  }
  process.stdout.write(`formatted ${file}\n`);
  return 0;
}

function reason(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === "ENOENT") return "no such file";
  if (code === "EISDIR") return "it is a directory";
  if (code === "EACCES" || code === "EPERM") return "permission denied";
  if (code === "EROFS") return "read-only file system";
  if (code === "EEXIST") return "a temporary file of the same name is in the way";
  return err instanceof Error ? err.message : String(err);
}

function usage(message: string): number {
  return fail("usage", message);
}

/** One file's problem, printed as every CLI prints a user error; fmt goes on with the next file. */
function fail(kind: ErrorKind, message: string): number {
  return reportError(userError(kind, message), { program: "milora fmt" });
}
