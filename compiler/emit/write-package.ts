// Writing a package directory atomically: every file goes into a fresh temporary sibling directory,
// which is renamed into place only once complete, so a failed compile never leaves half a package.
// What may be replaced is guarded: a directory is only ever replaced when `milora compile` wrote it
// (it holds PACKAGE_MARKER) or the caller says so, and never when it is the current directory, one
// of its ancestors, or a directory holding a file the caller must keep (the spec).
import { accessSync, constants, lstatSync, mkdirSync, readdirSync, realpathSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { basename, dirname, join, relative, resolve, sep } from "node:path";
import { MiloraError } from "../../runtime/errors.ts";

export interface PackageFile {
  /** Relative to the package root, with `/` separators. */
  readonly path: string;
  readonly contents: string;
  /** Written with mode 0755 (a `bin` script). */
  readonly executable?: boolean;
}

/** Written into every package: the sign that `milora compile --force` may replace the directory. */
export const PACKAGE_MARKER = ".milora-package";
const MARKER_TEXT = "This directory was written by `milora compile`; `milora compile --force` replaces it whole.\n";

/** An output directory that cannot be written as asked (not empty without --force, not a directory, unwritable). */
export class OutputError extends MiloraError {
  override name = "OutputError";
  readonly kind = "file";
}

export interface WriteOptions {
  /** Replace a non-empty `out` that an earlier `milora compile` wrote (it holds PACKAGE_MARKER). */
  readonly force?: boolean;
  /** Replace a non-empty `out` even if milora did not write it (still never one of the protected ones). */
  readonly forceAny?: boolean;
  /** Files that must survive the write (the spec and what it reads): a directory holding one is never replaced. */
  readonly keep?: readonly string[];
}

/**
 * Writes `files` as the directory `out`. Refuses an `out` that holds anything unless `force` (and it is
 * a package milora wrote) or `forceAny`, in which case the old directory is replaced whole (after the
 * new one is complete). Every refusal or failure is an OutputError saying what and why.
 */
export function writePackage(out: string, files: readonly PackageFile[], options: WriteOptions = {}): void {
  let target = resolve(out);
  const existing = nearestExisting(target);
  if (existing === target) {
    let stat;
    try {
      stat = statSync(target);
    } catch (e) {
      throw new OutputError(`cannot write ${out}: ${reason(e)}`);
    }
    if (!stat.isDirectory()) throw new OutputError(`${out} exists and is not a directory`);
    target = realpathSync(target); // a link to a package directory: replace the directory, keep the link
    checkReplaceable(out, target, options);
  } else {
    makeParents(out, existing, dirname(target));
  }
  const parent = dirname(target);
  try {
    accessSync(parent, constants.W_OK);
  } catch (e) {
    throw new OutputError(`cannot write ${out}: ${parent} is not writable (${reason(e)}); choose another --out`);
  }
  removeStaleTemps(parent, basename(target));

  const stamp = `${process.pid}-${Date.now().toString(36)}`;
  const temp = join(parent, `.${basename(target)}.${stamp}.tmp`);
  const old = join(parent, `.${basename(target)}.${stamp}.old.tmp`);
  let replaced = false;
  try {
    try {
      mkdirSync(temp);
      writeFileSync(join(temp, PACKAGE_MARKER), MARKER_TEXT, { mode: 0o644 });
    } catch (e) {
      throw new OutputError(`cannot write ${out}: cannot create a directory in ${parent} (${reason(e)})`);
    }
    for (const f of files) {
      const path = join(temp, ...f.path.split("/"));
      try {
        mkdirSync(dirname(path), { recursive: true });
        writeFileSync(path, f.contents, { mode: f.executable ? 0o755 : 0o644 });
      } catch (e) {
        throw new OutputError(`cannot write ${out}: writing ${f.path} failed (${reason(e)}); nothing was changed`);
      }
    }
    try {
      if (lexists(target)) {
        renameSync(target, old);
        renameSync(temp, target);
        replaced = true;
      } else {
        renameSync(temp, target);
      }
    } catch (e) {
      if (!lexists(target) && lexists(old)) {
        try {
          renameSync(old, target);
        } catch {
          throw new OutputError(`cannot write ${out}: moving the new package into place failed (${reason(e)}); the old one is at ${old}`);
        }
      }
      throw new OutputError(`cannot write ${out}: moving the new package into place failed (${reason(e)}); nothing was changed`);
    }
  } finally {
    rmSync(temp, { recursive: true, force: true });
    if (replaced) rmSync(old, { recursive: true, force: true });
  }
}

/** Throws unless the existing directory `target` (a real path) may be replaced as `options` allow. */
function checkReplaceable(out: string, target: string, options: WriteOptions): void {
  const inside = (path: string) => path === target || path.startsWith(target + sep);
  const cwd = realOrSelf(process.cwd());
  if (inside(cwd)) {
    const what = cwd === target ? "the current directory" : `an ancestor of the current directory (${cwd})`;
    throw new OutputError(`refusing to write ${out}: it is ${what}, and replacing it would delete everything in it; choose a new directory for --out (no flag overrides this)`);
  }
  for (const keep of options.keep ?? []) {
    const kept = realOrSelf(resolve(keep));
    if (inside(kept)) {
      throw new OutputError(`refusing to write ${out}: it holds ${keep}, which this compile reads, and replacing it would delete that; choose another --out (no flag overrides this)`);
    }
  }
  const held = readdirSync(target).sort();
  if (held.length === 0) return;
  const shown = held.slice(0, 3).join(", ") + (held.length > 3 ? ", ..." : "");
  const entries = `${held.length} entr${held.length === 1 ? "y" : "ies"} (${shown})`;
  const ours = held.includes(PACKAGE_MARKER);
  if (options.forceAny || (options.force && ours)) return;
  if (!options.force) {
    throw new OutputError(
      ours
        ? `${out} is not empty (${shown}): choose another --out, or pass --force to replace it`
        : `${out} is not empty (${shown}) and was not written by milora compile (no ${PACKAGE_MARKER}): choose another --out, or pass --force-any to delete what it holds and replace it`,
    );
  }
  throw new OutputError(
    `refusing to replace ${out}: it was not written by milora compile (no ${PACKAGE_MARKER}), and --force would delete its ${entries}; choose another --out, or pass --force-any to replace it anyway`,
  );
}

/** `target` itself if it exists (as a link or not), else its nearest existing ancestor. */
function nearestExisting(target: string): string {
  let p = target;
  while (!lexists(p) && dirname(p) !== p) p = dirname(p);
  return p;
}

/** Creates the missing directories from `existing` (an ancestor that exists) down to `parent`, one at a time. */
function makeParents(out: string, existing: string, parent: string): void {
  let stat;
  try {
    stat = statSync(existing);
  } catch (e) {
    throw new OutputError(`cannot write ${out}: ${existing} cannot be read (${reason(e)})`);
  }
  if (!stat.isDirectory()) throw new OutputError(`cannot write ${out}: ${existing} is a file, not a directory`);
  const missing = relative(existing, parent).split(sep).filter((s) => s !== "");
  let p = existing;
  for (const part of missing) {
    p = join(p, part);
    try {
      mkdirSync(p);
    } catch (e) {
      throw new OutputError(`cannot write ${out}: cannot create the directory ${p} (${reason(e)}); choose another --out`);
    }
  }
}

/** Removes temporary directories left beside `name` by compiles that were killed (their process is gone). */
function removeStaleTemps(parent: string, name: string): void {
  let entries: string[];
  try {
    entries = readdirSync(parent);
  } catch {
    return;
  }
  const prefix = `.${name}.`;
  for (const entry of entries) {
    if (!entry.startsWith(prefix)) continue;
    const m = /^(\d+)-[0-9a-z]+(\.old)?\.tmp$/.exec(entry.slice(prefix.length));
    if (m === null || processAlive(Number(m[1]))) continue;
    // killed between moving the old package aside and the new one in: the old is the only copy left
    if (m[2] !== undefined && !lexists(join(parent, name))) continue;
    rmSync(join(parent, entry), { recursive: true, force: true });
  }
}

function processAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM"; // alive, someone else's
  }
}

function lexists(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

function realOrSelf(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}

function reason(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  switch (code) {
    case "ENOENT":
      return "no such file or directory";
    case "ENOTDIR":
      return "a part of the path is a file, not a directory";
    case "EACCES":
    case "EPERM":
      return "permission denied";
    case "EROFS":
      return "read-only file system";
    case "ENOSPC":
      return "no space left on the device";
    case "EEXIST":
      return "a file of that name exists";
    case "EISDIR":
      return "a directory of that name exists";
    default:
      return code ?? (e instanceof Error ? e.message : String(e));
  }
}
