// Shared by the kernel tests: seeded inputs, the relative-error measure, and one-call kernel runs with
// every output poisoned (NaN) beforehand so an unwritten element cannot pass for a right one.
import type { KernelSource } from "../../../compiler/kernels/kernel.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { mulberry32 } from "../../../examples/random-checkpoint.ts";

export interface Gpu {
  readonly context: GpuContext;
  readonly device: GPUDevice;
  readonly cache: PipelineCache;
  readonly step: StepEncoder;
}

export async function openGpu(): Promise<Gpu> {
  const context = await acquireDevice();
  const cache = new PipelineCache(context.device);
  return { context, device: context.device, cache, step: new StepEncoder(context.device, cache) };
}

/** The project's seeded generator (mulberry32), so a failing case can be replayed. */
export const seeded = mulberry32;

/** n values uniform in [-scale, scale). */
export function randomFloats(random: () => number, n: number, scale = 1): Float32Array {
  return Float32Array.from({ length: n }, () => (random() * 2 - 1) * scale);
}

/** ||got - want|| / ||want||; Infinity when `got` holds a NaN or the lengths differ. */
export function relativeError(got: ArrayLike<number>, want: ArrayLike<number>): number {
  if (got.length !== want.length) return Infinity;
  let diff = 0;
  let norm = 0;
  for (let i = 0; i < want.length; i++) {
    const d = got[i]! - want[i]!;
    if (Number.isNaN(d)) return Infinity;
    diff += d * d;
    norm += want[i]! * want[i]!;
  }
  return Math.sqrt(diff) / Math.sqrt(norm);
}

export function nanFilled(n: number): Float32Array {
  return new Float32Array(n).fill(NaN);
}

/**
 * Uploads `buffers` (inputs, and outputs as their initial contents), runs `k` once, and returns the
 * final contents of the buffers named in `read` as f32 (reinterpret with `new Uint32Array(x.buffer)`).
 */
export async function runOnce(
  gpu: Gpu,
  k: KernelSource,
  buffers: Record<string, Float32Array | Uint32Array>,
  params: Record<string, number>,
  read: readonly string[],
): Promise<Record<string, Float32Array>> {
  const device = gpu.device;
  device.pushErrorScope("validation");
  const gpuBuffers = Object.fromEntries(Object.entries(buffers).map(([name, data]) => [name, createStorage(device, data, name)]));
  gpu.step.dispatch(k, gpuBuffers, params);
  gpu.step.submit();
  const out: Record<string, Float32Array> = {};
  for (const name of read) out[name] = await readBuffer(device, gpuBuffers[name]!, 0, buffers[name]!.byteLength);
  const error = await device.popErrorScope();
  if (error) throw new Error(`${k.key}: ${error.message}`);
  for (const b of Object.values(gpuBuffers)) b.destroy();
  return out;
}
