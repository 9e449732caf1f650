// The one way milora times kernels by themselves (bench/lora.ts, bench/linear-rows.ts and the
// crossover of `milora bench --calibrate`): dispatches recorded into one step, submitted at once and
// waited for, best of several submits, since other jobs share the machine.
import type { StepEncoder } from "../../runtime/gpu/kernel-runner.ts";

export interface TimingOptions {
  /** Submits measured; the best counts. */
  readonly repeats: number;
  /** Times `record` runs in one submit; the figure is per run. */
  readonly rounds: number;
}

/** Best microseconds per run of `record` (which records dispatches into `step`), over `repeats` submits. */
export async function bestMicros(step: StepEncoder, device: GPUDevice, record: () => void, o: TimingOptions): Promise<number> {
  let best = Infinity;
  for (let r = 0; r < o.repeats; r++) {
    for (let i = 0; i < o.rounds; i++) record();
    const start = performance.now();
    step.submit();
    await device.queue.onSubmittedWorkDone();
    best = Math.min(best, ((performance.now() - start) * 1000) / o.rounds);
  }
  return best;
}
