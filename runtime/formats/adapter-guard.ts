// Guards around reading adapter directories a client names at run time: the directory must lie inside
// the operator's adapter root once every symlink is resolved, and the two files the reader parses are
// checked first with messages of our own, so that no error quotes a file's bytes (JSON.parse's
// messages echo their input, and a safetensors header length is the file's first 8 bytes).
import { closeSync, fstatSync, openSync, readSync, realpathSync, statSync } from "node:fs";
import { isAbsolute, join, relative, resolve } from "node:path";
import { ADAPTER_CONFIG_FILE } from "./adapter-config.ts";
import { ADAPTER_WEIGHTS_FILE } from "./adapter.ts";
import { CheckpointError, DTYPE_BYTES } from "./safetensors.ts";

/** adapter_config.json is a few hundred bytes; anything much larger is not one. */
export const MAX_ADAPTER_CONFIG_BYTES = 1024 * 1024;
/** safetensors.ts's own bound on a header. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;

/** Whether `path` is `root` or below it; both must be absolute and normalised. */
export function isInside(root: string, path: string): boolean {
  const rel = relative(root, path);
  return rel === "" || (!rel.startsWith("..") && !isAbsolute(rel));
}

/**
 * The real path of the adapter directory `requested` names (relative to `root`, or absolute), or
 * undefined when it is not an existing directory inside `root` (a real path). The caller answers every
 * undefined alike, so the answer says nothing about what exists outside the root.
 */
export function confinedAdapterDir(root: string, requested: string): string | undefined {
  if (requested.includes("\0")) return undefined;
  const lexical = resolve(root, requested);
  // Outside before any symlink is followed: refused without touching the filesystem.
  if (!isInside(root, lexical)) return undefined;
  try {
    const real = realpathSync(lexical);
    return isInside(root, real) && statSync(real).isDirectory() ? real : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Checks `dir`'s adapter_config.json and adapter_model.safetensors before the reader parses them: each
 * a regular file (inside `root` after resolving symlinks, when given), the config JSON, the weights a
 * well-formed safetensors header. Throws CheckpointError with a message naming the file, never its bytes.
 */
export function checkAdapterFiles(dir: string, root?: string): void {
  const configPath = regularFile(dir, ADAPTER_CONFIG_FILE, root);
  const size = statSync(configPath).size;
  if (size > MAX_ADAPTER_CONFIG_BYTES) throw new CheckpointError(`${ADAPTER_CONFIG_FILE} is over ${MAX_ADAPTER_CONFIG_BYTES} bytes: not an adapter config`);
  const config = parseJson(readPrefix(configPath, size), ADAPTER_CONFIG_FILE);
  if (!isObject(config)) throw new CheckpointError(`${ADAPTER_CONFIG_FILE} is not a JSON object`);
  checkSafetensorsHeader(regularFile(dir, ADAPTER_WEIGHTS_FILE, root));
}

function regularFile(dir: string, file: string, root: string | undefined): string {
  const path = join(dir, file);
  const refuse = () => new CheckpointError(root === undefined ? `${file} is missing or not a regular file` : `${file} is missing or not a regular file inside the adapter root`);
  let real: string;
  try {
    real = realpathSync(path);
    if (!statSync(real).isFile()) throw refuse();
  } catch {
    throw refuse();
  }
  if (root !== undefined && !isInside(root, real)) throw refuse();
  return real;
}

function checkSafetensorsHeader(path: string): void {
  const bad = (why: string) => new CheckpointError(`${ADAPTER_WEIGHTS_FILE} is not a safetensors file: ${why}`);
  const fd = openSync(path, "r");
  try {
    const fileSize = fstatSync(fd).size;
    if (fileSize < 8) throw bad("too short for the 8-byte header length");
    const head = Buffer.alloc(8);
    readSync(fd, head, 0, 8, 0);
    const length = head.readBigUInt64LE(0);
    // The length is the file's first bytes: say that it is wrong, never what it is.
    if (length > BigInt(fileSize - 8) || length > BigInt(MAX_HEADER_BYTES)) throw bad("its header length does not fit the file");
    const header = Buffer.alloc(Number(length));
    if (readSync(fd, header, 0, header.length, 8) !== header.length) throw bad("the file ended inside its header");
    const json = parseJson(header, ADAPTER_WEIGHTS_FILE);
    if (!isObject(json)) throw bad("its header is not a JSON object");
    for (const [name, entry] of Object.entries(json)) {
      if (name === "__metadata__") {
        if (!isObject(entry) || !Object.values(entry).every((v) => typeof v === "string")) throw bad("its __metadata__ is not an object of strings");
        continue;
      }
      const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
      const counts = (v: unknown, n?: number) => Array.isArray(v) && (n === undefined || v.length === n) && v.every((x) => Number.isSafeInteger(x) && (x as number) >= 0);
      if (!isObject(entry) || typeof e.dtype !== "string" || !Object.hasOwn(DTYPE_BYTES, e.dtype) || !counts(e.shape) || !counts(e.data_offsets, 2)) {
        throw bad("a tensor entry of its header is malformed");
      }
    }
  } finally {
    closeSync(fd);
  }
}

function readPrefix(path: string, size: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const buf = Buffer.alloc(size);
    const n = readSync(fd, buf, 0, size, 0);
    return buf.subarray(0, n);
  } finally {
    closeSync(fd);
  }
}

/** JSON.parse without its message, which quotes the text around the error. */
function parseJson(bytes: Buffer, file: string): unknown {
  try {
    return JSON.parse(bytes.toString("utf8"));
  } catch {
    throw new CheckpointError(`${file} is not valid JSON`);
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
