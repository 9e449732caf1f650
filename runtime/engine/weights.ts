// Uploading a checkpoint to the GPU as the plan's tensor table describes it. Every tensor is checked
// before any is read (all problems reported at once), then streamed: read one tensor as f32, convert it
// to its storage format (weight-storage.ts), copy it into its buffer(s), let it go. A splittable tensor
// (the embedding and every linear weight) larger than the plan's storage binding (or the device's, when
// smaller) is split into row blocks.
import { rowsPerBlock, storageRowWords, type Plan, type PlanTensor, type WeightFormat } from "../package/format.ts";
import type { Checkpoint } from "../formats/checkpoint.ts";
import { assertFinite } from "../formats/finite.ts";
import { createStorage, readBuffer } from "../gpu/kernel-runner.ts";
import { CheckpointError } from "../formats/safetensors.ts";
import { WeightFormatError, packWeights, unpackWeights } from "./weight-storage.ts";

/** Rows firstRow .. firstRow + rows - 1 of a tensor's first dimension, in one buffer. */
export interface WeightBlock {
  readonly buffer: GPUBuffer;
  readonly firstRow: number;
  readonly rows: number;
}

export interface GpuTensor {
  readonly name: string;
  readonly shape: readonly number[];
  /** How its buffers hold it (the plan's gpuDtype). */
  readonly format: WeightFormat;
  /** One block unless the tensor exceeds a storage binding. */
  readonly blocks: readonly WeightBlock[];
}

export class GpuWeights {
  readonly #tensors: ReadonlyMap<string, GpuTensor>;

  constructor(tensors: readonly GpuTensor[]) {
    this.#tensors = new Map(tensors.map((t) => [t.name, t]));
  }

  get(name: string): GpuTensor {
    const t = this.#tensors.get(name);
    if (!t) throw new Error(`weights: no tensor "${name}" was uploaded`);
    return t;
  }

  /** The single buffer of a tensor the plan never splits. */
  buffer(name: string): GPUBuffer {
    return this.get(name).blocks[0]!.buffer;
  }

  /**
   * A tensor's stored values as f32 (a q8 element as d * q), its blocks joined, for merging an adapter
   * into it. Writing them back stores the same words (weight-storage.ts: packing is idempotent).
   */
  async read(device: GPUDevice, name: string): Promise<Float32Array> {
    const t = this.get(name);
    const rowWords = rowWordsOf(t);
    const words = new Uint32Array((t.shape[0] ?? 1) * rowWords);
    for (const b of t.blocks) words.set(new Uint32Array((await readBuffer(device, b.buffer, 0, b.rows * rowWords * 4)).buffer), b.firstRow * rowWords);
    return unpackWeights(t.format, words, t.shape, `tensor "${name}"`);
  }

  /** Overwrites a tensor with `data` (f32 values of its full shape), stored in its format: f16 and q8 round again. */
  write(queue: GPUQueue, name: string, data: Float32Array): void {
    const t = this.get(name);
    const words = packWeights(t.format, data, t.shape, `tensor "${name}"`);
    const rowWords = rowWordsOf(t);
    for (const b of t.blocks) queue.writeBuffer(b.buffer, 0, words, b.firstRow * rowWords, b.rows * rowWords);
  }

  get bytes(): number {
    let total = 0;
    for (const t of this.#tensors.values()) for (const b of t.blocks) total += b.buffer.size;
    return total;
  }

  destroy(): void {
    for (const t of this.#tensors.values()) for (const b of t.blocks) b.buffer.destroy();
  }
}

const MIB = 1024 * 1024;

/**
 * The storage format a checkpoint gets when nothing asks for one: f16 when its matrices are all F16 or
 * BF16, f32 otherwise, so that the default never rounds an F32 checkpoint. (BF16's 8-bit significand
 * fits f16's 11 bits: values in f16's normal range convert exactly, smaller ones round, and one beyond
 * f16's range is refused at upload, naming the tensor.)
 */
export function defaultWeightFormat(checkpoint: Checkpoint): WeightFormat {
  const matrices = checkpoint.names().map((n) => checkpoint.tensorInfo(n)!).filter((t) => t.shape.length === 2);
  return matrices.length > 0 && matrices.every((t) => t.dtype === "F16" || t.dtype === "BF16") ? "f16" : "f32";
}

/** Every reason the checkpoint cannot be uploaded for this plan on a device with this binding limit. */
export function uploadProblems(checkpoint: Checkpoint, plan: Plan, maxBindingBytes: number): string[] {
  const problems = checkpoint.mismatches(plan.tensors);
  for (const t of plan.tensors) {
    const bytes = (t.shape[0] ?? 1) * rowWordsOf({ shape: t.shape, format: t.gpuDtype }) * 4;
    if (bytes > maxBindingBytes && !t.splittable) {
      problems.push(
        `tensor "${t.name}" [${t.shape.join(", ")}] takes ${(bytes / MIB).toFixed(1)} MiB as ${t.gpuDtype}, more than the device's ` +
          `largest storage binding (${(maxBindingBytes / MIB).toFixed(1)} MiB)`,
      );
    }
  }
  return problems;
}

/**
 * Checks the checkpoint against the plan and uploads every tensor. Throws one CheckpointError listing
 * every problem before anything is read.
 */
export async function uploadWeights(device: GPUDevice, checkpoint: Checkpoint, plan: Plan, maxBindingBytes: number): Promise<GpuWeights> {
  const problems = uploadProblems(checkpoint, plan, maxBindingBytes);
  if (problems.length > 0) {
    const shown = problems.slice(0, 20).map((p) => `  ${p}`);
    if (problems.length > 20) shown.push(`  ... and ${problems.length - 20} more`);
    throw new CheckpointError(`${checkpoint.dir} does not fit base ${plan.base} (${problems.length} problem${problems.length > 1 ? "s" : ""}):\n${shown.join("\n")}`);
  }
  const uploaded: GpuTensor[] = [];
  try {
    for (const t of plan.tensors) {
      uploaded.push(uploadTensor(device, checkpoint, t, Math.min(maxBindingBytes, plan.maxBindingBytes)));
      // Lets a progress bar redraw and the previous tensor's memory go between reads.
      await new Promise((resolve) => setImmediate(resolve));
    }
  } catch (e) {
    new GpuWeights(uploaded).destroy();
    throw e;
  }
  return new GpuWeights(uploaded);
}

/** Uploads one tensor; a splittable one in blocks of at most `splitBytes` (the others fit the device). */
function uploadTensor(device: GPUDevice, checkpoint: Checkpoint, t: PlanTensor, splitBytes: number): GpuTensor {
  const data = checkpoint.readF32(t.name, t.shape);
  assertFinite(data, checkpoint.dir, t.name, t.shape);
  const format = t.gpuDtype;
  let words: Uint32Array;
  try {
    words = packWeights(format, data, t.shape, `tensor "${t.name}"`);
  } catch (e) {
    if (e instanceof WeightFormatError) throw new CheckpointError(`${checkpoint.dir}: ${e.message}`);
    throw e;
  }
  const rows = t.shape[0] ?? 1;
  const perBlock = t.splittable ? rowsPerBlock(t.shape, splitBytes, format) : rows;
  const rowWords = words.length / rows;
  const blocks: WeightBlock[] = [];
  for (let firstRow = 0; firstRow < rows; firstRow += perBlock) {
    const count = Math.min(perBlock, rows - firstRow);
    const label = blocks.length === 0 && count === rows ? t.name : `${t.name} rows ${firstRow}..${firstRow + count - 1}`;
    blocks.push({ buffer: createStorage(device, words.subarray(firstRow * rowWords, (firstRow + count) * rowWords), label), firstRow, rows: count });
  }
  return { name: t.name, shape: t.shape, format, blocks };
}

/** The u32 words of one row (first dimension) of a tensor in its format. */
function rowWordsOf(t: { readonly shape: readonly number[]; readonly format: WeightFormat }): number {
  return storageRowWords(t.format, t.shape.slice(1).reduce((a, b) => a * b, 1));
}
