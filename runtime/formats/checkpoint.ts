// A Hugging Face model directory: config.json plus weights in model.safetensors or in shards listed
// by model.safetensors.index.json. Tensors are read one at a time, checked against the shape the
// model expects, so a wrong or partial download fails with a message naming the tensor.
import { existsSync, readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { jsonSyntaxReason } from "../../compiler/json-syntax.ts";
import { CheckpointError, SafetensorsFile, isFloatDtype, type TensorInfo } from "./safetensors.ts";

export const CONFIG_FILE = "config.json";
export const SINGLE_FILE = "model.safetensors";
export const INDEX_FILE = "model.safetensors.index.json";

/** Called after each slice of tensor data is read; the total covers every tensor, each read once. */
export type ProgressFn = (bytesDone: number, bytesTotal: number) => void;

export interface OpenCheckpointOptions {
  readonly onProgress?: ProgressFn;
}

/** A tensor the model needs, by its name in the checkpoint. */
export interface ExpectedTensor {
  readonly name: string;
  readonly shape: readonly number[];
}

export class Checkpoint {
  private bytesDone = 0;
  /** Bytes of all tensor data in the checkpoint: the denominator of progress reports. */
  readonly totalBytes: number;

  /** Use openCheckpoint. */
  constructor(
    readonly dir: string,
    /** The parsed config.json. */
    readonly config: Readonly<Record<string, unknown>>,
    private readonly files: ReadonlyMap<string, SafetensorsFile>,
    /** Tensor name -> the file (name relative to dir) that holds it. */
    private readonly location: ReadonlyMap<string, string>,
    private readonly onProgress: ProgressFn | undefined,
  ) {
    let total = 0;
    for (const [name, file] of location) total += files.get(file)!.tensors.get(name)!.byteLength;
    this.totalBytes = total;
  }

  /** Names of every tensor in the checkpoint. */
  names(): string[] {
    return [...this.location.keys()];
  }

  has(name: string): boolean {
    return this.location.has(name);
  }

  /** Where and how a tensor is stored, or undefined if the checkpoint lacks it. */
  tensorInfo(name: string): (TensorInfo & { readonly file: string }) | undefined {
    const file = this.location.get(name);
    return file === undefined ? undefined : { ...this.files.get(file)!.tensors.get(name)!, file };
  }

  /** The tensor as f32; throws CheckpointError if it is missing, not a float dtype, or not `expectedShape`. */
  readF32(name: string, expectedShape: readonly number[]): Float32Array {
    const info = this.tensorInfo(name);
    if (!info) throw new CheckpointError(`missing tensor "${name}" in ${this.dir} (looked in ${this.fileList()})`);
    if (!sameShape(info.shape, expectedShape)) {
      throw new CheckpointError(
        `${join(this.dir, info.file)}: tensor "${name}" has shape [${info.shape.join(", ")}], expected [${expectedShape.join(", ")}]`,
      );
    }
    return this.files.get(info.file)!.readF32(name, (n) => {
      this.bytesDone += n;
      this.onProgress?.(this.bytesDone, this.totalBytes);
    });
  }

  /** Every problem between this checkpoint and the tensors a model expects (empty when it fits). */
  mismatches(expected: readonly ExpectedTensor[]): string[] {
    const problems: string[] = [];
    for (const { name, shape } of expected) {
      const info = this.tensorInfo(name);
      if (!info) problems.push(`missing tensor "${name}"`);
      else if (!sameShape(info.shape, shape)) {
        problems.push(`tensor "${name}" has shape [${info.shape.join(", ")}], expected [${shape.join(", ")}]`);
      } else if (!isFloatDtype(info.dtype)) {
        problems.push(`tensor "${name}" has dtype ${info.dtype}; weights must be F32, F16 or BF16`);
      }
    }
    return problems;
  }

  /** Throws one CheckpointError listing every mismatch against `expected`. */
  validate(expected: readonly ExpectedTensor[]): void {
    const problems = this.mismatches(expected);
    if (problems.length > 0) {
      const shown = problems.slice(0, 20).map((p) => `  ${p}`);
      if (problems.length > 20) shown.push(`  ... and ${problems.length - 20} more`);
      throw new CheckpointError(`${this.dir} does not fit the model (${problems.length} problems):\n${shown.join("\n")}`);
    }
  }

  private fileList(): string {
    return [...this.files.keys()].join(", ");
  }

  close(): void {
    for (const f of this.files.values()) f.close();
  }
}

/** Opens a HF model directory, checking config.json, the index and every shard header. */
export function openCheckpoint(dir: string, options: OpenCheckpointOptions = {}): Checkpoint {
  const config = readJsonObject(dir, CONFIG_FILE);
  const files = new Map<string, SafetensorsFile>();
  const location = new Map<string, string>();
  try {
    if (existsSync(join(dir, INDEX_FILE))) {
      for (const [tensor, file] of readWeightMap(dir)) {
        if (!files.has(file)) files.set(file, SafetensorsFile.open(join(dir, file)));
        if (!files.get(file)!.tensors.has(tensor)) {
          throw new CheckpointError(`${join(dir, INDEX_FILE)}: tensor "${tensor}" is mapped to ${file}, which does not hold it`);
        }
        location.set(tensor, file);
      }
    } else if (existsSync(join(dir, SINGLE_FILE))) {
      const file = SafetensorsFile.open(join(dir, SINGLE_FILE));
      files.set(SINGLE_FILE, file);
      for (const name of file.tensors.keys()) location.set(name, SINGLE_FILE);
    } else {
      throw new CheckpointError(`${dir}: no weights (looked for ${SINGLE_FILE} and ${INDEX_FILE})`);
    }
  } catch (e) {
    for (const f of files.values()) f.close();
    throw e;
  }
  return new Checkpoint(dir, config, files, location, options.onProgress);
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function readJsonObject(dir: string, file: string): Record<string, unknown> {
  const path = join(dir, file);
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new CheckpointError(
      code === "ENOENT" ? `${dir}: no ${file}` : code === "EISDIR" ? `${path}: is a directory, not a JSON file` : `${path}: cannot read (${code ?? String(e)})`,
    );
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new CheckpointError(`${path}: not valid JSON (${jsonSyntaxReason(e, text)})`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new CheckpointError(`${path}: not a JSON object`);
  }
  return value as Record<string, unknown>;
}

function readWeightMap(dir: string): Map<string, string> {
  const path = join(dir, INDEX_FILE);
  const map = readJsonObject(dir, INDEX_FILE).weight_map;
  if (typeof map !== "object" || map === null || Array.isArray(map)) {
    throw new CheckpointError(`${path}: "weight_map" is not an object of tensor name -> shard file`);
  }
  const result = new Map<string, string>();
  for (const [tensor, file] of Object.entries(map)) {
    // Shards live beside the index; a path elsewhere is refused rather than followed.
    if (typeof file !== "string" || basename(file) !== file || file === "." || file === "..") {
      throw new CheckpointError(`${path}: tensor "${tensor}" maps to ${JSON.stringify(file)}, not a shard file name`);
    }
    if (!existsSync(join(dir, file))) {
      throw new CheckpointError(`${path}: tensor "${tensor}" maps to shard ${file}, which is missing from ${dir}`);
    }
    result.set(tensor, file);
  }
  return result;
}
