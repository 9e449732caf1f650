// The floor a decode step's weights set: milliseconds per pass of the decode-shaped (1 row) matvec
// over every linear weight of a plan, stored as the plan says, and nothing else (bench/decode.ts,
// bench/weights.ts).
import { kernelSources, layerTensor, type Plan } from "../compiler/plan.ts";
import { openCheckpoint } from "../runtime/formats/checkpoint.ts";
import type { GpuContext } from "../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage } from "../runtime/gpu/kernel-runner.ts";
import { uploadWeights } from "../runtime/engine/weights.ts";
import { bestMicros } from "../bin/measure/kernel-timing.ts";

/** Milliseconds per step of the decode-shaped (1 row) matvec over every linear weight, nothing else: the best of `repeats` submits. */
export async function streamOnceMs(gpu: GpuContext, plan: Plan, dir: string, repeats = 10): Promise<number> {
  const { device } = gpu;
  const checkpoint = openCheckpoint(dir);
  const weights = await uploadWeights(device, checkpoint, plan, gpu.report.limits.maxStorageBufferBindingSize ?? 2 ** 27);
  checkpoint.close();
  const sources = kernelSources(plan);
  const pipelines = new PipelineCache(device);
  const step = new StepEncoder(device, pipelines);
  const widest = Math.max(...plan.activations.map((a) => a.width));
  const [x, y, residual] = [0, 1, 2].map((i) => createStorage(device, widest * 4, `stream ${i}`));
  // Every layer's linear ops, then the head's (the lm_head): what one decode step reads.
  const linears = [
    ...Array.from({ length: plan.dims.layers }, (_, layer) => plan.layer.map((op) => ({ op, layer }))).flat(),
    ...plan.head.map((op) => ({ op, layer: 0 })),
  ].flatMap(({ op, layer }) => (op.op === "linear" ? [{ op, weight: weights.get(layerTensor(op.weight, layer)) }] : []));
  const record = () => {
    for (const { op, weight } of linears) {
      for (const block of weight.blocks) {
        step.dispatch(sources.get(op.matvec)!, { x: x!, w: block.buffer, y: y!, ...(op.residual ? { residual: residual! } : {}) }, { rows: 1 });
      }
    }
  };
  await bestMicros(step, device, record, { repeats: 1, rounds: 1 }); // compiles every pipeline
  // the best pass: other jobs share the machine
  const ms = (await bestMicros(step, device, record, { repeats, rounds: 1 })) / 1000;
  step.destroy();
  weights.destroy();
  for (const b of [x, y, residual]) b!.destroy();
  return ms;
}

