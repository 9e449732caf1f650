// Learning-rate schedules with Hugging Face transformers' meaning (get_scheduler): a linear warm-up
// from 0 over `warmup` steps, then linear decay to 0, a half cosine to 0, or constant. `step` counts
// optimizer steps from 0; the rate returned is the one that step uses.
export type ScheduleKind = "linear" | "cosine" | "constant";

export interface Schedule {
  readonly kind: ScheduleKind;
  readonly lr: number;
  readonly warmup: number;
  readonly total: number;
}

/** Warm-up steps from a ratio of the total (HF: ceil(total * ratio)) or a step count (an integer >= 1). */
export function warmupSteps(warmup: number, total: number): number {
  if (!(warmup >= 0)) throw new RangeError(`warm-up must be a ratio in [0, 1) or a step count, got ${warmup}`);
  if (warmup < 1) return Math.ceil(total * warmup);
  if (!Number.isInteger(warmup)) throw new RangeError(`warm-up of ${warmup}: a ratio is below 1, a step count an integer`);
  return warmup;
}

export function learningRate(s: Schedule, step: number): number {
  if (step < s.warmup) return (s.lr * step) / Math.max(1, s.warmup);
  switch (s.kind) {
    case "constant":
      return s.lr;
    case "linear":
      return s.lr * Math.max(0, (s.total - step) / Math.max(1, s.total - s.warmup));
    case "cosine": {
      const progress = (step - s.warmup) / Math.max(1, s.total - s.warmup);
      return s.lr * Math.max(0, 0.5 * (1 + Math.cos(Math.PI * progress)));
    }
  }
}
