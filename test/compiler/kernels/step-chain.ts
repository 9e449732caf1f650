// Shared by the kernel tests that run kernels in the order runtime/training/graph.ts does (the MoE
// training kernels: moe-train.test.ts, moe-ffn-train.test.ts): several dispatches over one set of
// buffers as one submission, and the f32 bits that exact checks compare.
import type { KernelSource } from "../../../compiler/kernels/kernel.ts";
import { createStorage, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import type { Gpu } from "./gpu-check.ts";

/** One dispatch: the kernel, the buffer each binding reads (by the binding's own name when not given), its params. */
export type Step = readonly [KernelSource, Record<string, string>, Record<string, number>];

/** Runs `steps` in order as one submission over buffers made from `data`; returns the named buffers' final contents. */
export async function runSteps(gpu: Gpu, data: Record<string, Float32Array | Uint32Array>, steps: readonly Step[], read: readonly string[]): Promise<Record<string, Float32Array>> {
  const device = gpu.device;
  device.pushErrorScope("validation");
  const buffers = Object.fromEntries(Object.entries(data).map(([name, v]) => [name, createStorage(device, v, name)]));
  for (const [k, bind, params] of steps) {
    const bound = Object.fromEntries(k.bindings.filter((b) => b.access !== "uniform").map((b) => [b.name, buffers[bind[b.name] ?? b.name]!]));
    gpu.step.dispatch(k, bound, params);
  }
  gpu.step.submit();
  const out: Record<string, Float32Array> = {};
  for (const name of read) out[name] = await readBuffer(device, buffers[name]!);
  const error = await device.popErrorScope();
  if (error) throw new Error(error.message);
  for (const b of Object.values(buffers)) b.destroy();
  return out;
}

/** The bits of `v` as an f32. */
export const bitsOf = (v: number): number => new Uint32Array(Float32Array.of(v).buffer)[0]!;
