// What a spec may read besides itself, so that a path naming the wrong file never gets that file's
// contents printed as code frames or in a message:
// - `import "PATH"` names a .milora spec: the path (and, through links, the file) ends in `.milora`,
//   is a regular text file of at most MAX_SPEC_BYTES. A relative path is relative to the importing
//   file; an absolute one is used as it is.
// - `from "PATH"` names a Hugging Face config: a `.json` file, or a model directory holding
//   config.json. Its JSON errors give a place, never the text (compiler/json-syntax.ts).
import { realpathSync, statSync } from "node:fs";
import { dirname, isAbsolute, join, resolve } from "node:path";

export const SPEC_EXTENSION = ".milora";
export const CONFIG_FILE = "config.json";
const MAX_SPEC_BYTES = 8 * 1024 * 1024;

/** The path an import names, as diagnostics show it: joined onto the importer's directory unless absolute. */
export function importPath(importer: string, value: string): string {
  return isAbsolute(value) ? value : join(dirname(importer), value);
}

/** Why the file an import names cannot be read as a spec, checked before it is read; undefined when it may be. */
export function importProblem(path: string): string | undefined {
  if (!path.endsWith(SPEC_EXTENSION)) return `${path} is not a .milora spec: an import must name a .milora file`;
  let stat;
  try {
    stat = statSync(path);
  } catch {
    return undefined; // reading it says why (no such file, permission denied)
  }
  if (stat.isDirectory()) return `${path} is a directory, not a .milora spec`;
  if (!stat.isFile()) return `${path} is not a regular file, so not a .milora spec`;
  const real = realpathSync(path);
  if (!real.endsWith(SPEC_EXTENSION)) return `${path} is a link to ${real}, which is not a .milora spec`;
  if (stat.size > MAX_SPEC_BYTES) return `${path} is ${stat.size} bytes, too large for a .milora spec (at most ${MAX_SPEC_BYTES})`;
  return undefined;
}

/** Why the text read for an import is not a spec (binary data), or undefined. */
export function importTextProblem(path: string, text: string): string | undefined {
  if (text.includes("\0") || text.includes("\uFFFD")) return `${path} is not a .milora spec: it holds binary data, not text`;
  return undefined;
}

/** The config.json a `from` names, relative to the spec's directory, or why it cannot be one. */
export function fromConfigPath(specPath: string, value: string): { path: string } | { problem: string } {
  const named = resolve(dirname(specPath), value);
  let stat;
  try {
    stat = statSync(named);
  } catch {
    stat = undefined; // missing: reported when it is read, if it looks like a config
  }
  const path = stat?.isDirectory() ? join(named, CONFIG_FILE) : named;
  const problem = `${named} is not a Hugging Face config: \`from\` names a .json file or a model directory holding ${CONFIG_FILE}`;
  if (!path.endsWith(".json")) return { problem };
  try {
    const file = statSync(path);
    if (!file.isFile()) return { problem: `${path} is not a regular file, so not a Hugging Face config` };
    if (!realpathSync(path).endsWith(".json")) return { problem: `${path} is a link to ${realpathSync(path)}, which is not a .json config` };
  } catch {
    // missing or unreadable: reading it says which
  }
  return { path };
}
