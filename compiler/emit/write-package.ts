// Writing a package directory atomically: every file goes into a fresh temporary sibling directory,
// which is renamed into place only once complete, so a failed compile never leaves half a package.
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";

export interface PackageFile {
  /** Relative to the package root, with `/` separators. */
  readonly path: string;
  readonly contents: string;
  /** Written with mode 0755 (a `bin` script). */
  readonly executable?: boolean;
}

/** An output directory that cannot be written as asked (not empty without --force, not a directory). */
export class OutputError extends Error {
  override name = "OutputError";
}

/**
 * Writes `files` as the directory `out`. Refuses an `out` that holds anything unless `force`, in which
 * case the old directory is replaced whole (after the new one is complete).
 */
export function writePackage(out: string, files: readonly PackageFile[], options: { force?: boolean } = {}): void {
  const target = resolve(out);
  if (existsSync(target)) {
    if (!statSync(target).isDirectory()) throw new OutputError(`${out} exists and is not a directory`);
    const held = readdirSync(target);
    if (held.length > 0 && !options.force) {
      const shown = held.sort().slice(0, 3).join(", ") + (held.length > 3 ? ", ..." : "");
      throw new OutputError(`${out} is not empty (${shown}): choose another --out, or pass --force to replace it`);
    }
  }
  const parent = dirname(target);
  mkdirSync(parent, { recursive: true });
  const stamp = `${process.pid}-${Date.now().toString(36)}`;
  const temp = join(parent, `.${basename(target)}.${stamp}.tmp`);
  try {
    for (const f of files) {
      const path = join(temp, ...f.path.split("/"));
      mkdirSync(dirname(path), { recursive: true });
      writeFileSync(path, f.contents, { mode: f.executable ? 0o755 : 0o644 });
    }
    if (existsSync(target)) {
      const old = join(parent, `.${basename(target)}.${stamp}.old.tmp`);
      renameSync(target, old);
      renameSync(temp, target);
      rmSync(old, { recursive: true, force: true });
    } else {
      renameSync(temp, target);
    }
  } finally {
    rmSync(temp, { recursive: true, force: true });
  }
}
