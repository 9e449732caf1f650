// The profile of one engine step: every dispatch and copy it records (StepEncoder's record calls,
// wrapped while a recording is open), replayed alone on the engine's own buffers and timed. Replaying
// alone takes the figures apart (which kernel costs what) at the price of the overlap a real step may
// have between neighbouring dispatches; the sum is a bound to compare with the measured step.
import type { Engine } from "../../runtime/engine/engine.ts";
import type { GenerateRequest } from "../../runtime/engine/requests.ts";
import { PipelineCache, StepEncoder } from "../../runtime/gpu/kernel-runner.ts";
import type { KernelSource } from "../../runtime/gpu/kernel.ts";
import { bestMicros } from "./kernel-timing.ts";

/** One thing a step recorded: a dispatch with its bindings and params, or a buffer copy. */
export type Recorded =
  | { readonly kind: "dispatch"; readonly kernel: KernelSource; readonly buffers: object; readonly params: Readonly<Record<string, number>> }
  | { readonly kind: "copy"; readonly args: Parameters<StepEncoder["copy"]> };

let recording: Recorded[] | undefined;
let wrapped = 0;
const dispatch = StepEncoder.prototype.dispatch;
const copy = StepEncoder.prototype.copy;

/** Wraps StepEncoder's record calls until the returned function is called (nesting allowed). */
export function installRecorder(): () => void {
  if (wrapped++ === 0) {
    StepEncoder.prototype.dispatch = function (this: StepEncoder, k, buffers, params = {}) {
      recording?.push({ kind: "dispatch", kernel: k as KernelSource, buffers, params });
      return dispatch.call(this, k, buffers, params);
    };
    StepEncoder.prototype.copy = function (this: StepEncoder, ...args) {
      recording?.push({ kind: "copy", args });
      return copy.apply(this, args);
    };
  }
  return () => {
    if (--wrapped === 0) {
      StepEncoder.prototype.dispatch = dispatch;
      StepEncoder.prototype.copy = copy;
    }
  };
}

/**
 * The records of the last decode step of `requests(maxTokens)`'s batch: the difference between a
 * 4-token generation and a 3-token one (the engine's kernels are compiled by a first run).
 */
export async function recordDecodeStep(engine: Engine, requests: (maxTokens: number) => GenerateRequest[]): Promise<Recorded[]> {
  const uninstall = installRecorder();
  try {
    await engine.generateBatch(requests(3));
    const run = async (maxTokens: number) => {
      recording = [];
      await engine.generateBatch(requests(maxTokens));
      const r = recording;
      recording = undefined;
      return r;
    };
    const [short, long] = [await run(3), await run(4)];
    return long.slice(short.length);
  } finally {
    uninstall();
  }
}

/** The linear modules of each weight shape "KxN" of a model (e.g. "512x512" -> "q, o, lm_head"). */
export function linearShapes(base: { readonly hiddenSize: number; readonly intermediateSize: number; readonly vocabSize: number; readonly heads: number; readonly kvHeads: number; readonly headDim?: number }): Map<string, string> {
  const headDim = base.headDim ?? base.hiddenSize / base.heads;
  const [h, q, kv] = [base.hiddenSize, base.heads * headDim, base.kvHeads * headDim];
  const modules: [string, number, number][] = [["q", h, q], ["k", h, kv], ["v", h, kv], ["o", q, h], ["gate", h, base.intermediateSize], ["up", h, base.intermediateSize], ["down", base.intermediateSize, h], ["lm_head", h, base.vocabSize]];
  const shapes = new Map<string, string>();
  for (const [name, K, N] of modules) shapes.set(`${K}x${N}`, shapes.has(`${K}x${N}`) ? `${shapes.get(`${K}x${N}`)}, ${name}` : name);
  return shapes;
}

/** A dispatch's kernel as a profile row names it: the family, the constants that set its cost, and for a linear its modules (`shapes`: linearShapes). */
export function kernelVariant(k: KernelSource, shapes: ReadonlyMap<string, string>): string {
  const constants = Object.fromEntries([...k.key.slice(k.name.length + 1, -1).matchAll(/(\w+)=([^,]*)/g)].map((m) => [m[1], m[2]]));
  switch (k.name) {
    case "lora_shrink":
      return `lora_shrink${constants.moe ? ` (${constants.moe === "route" ? "routes the row" : "one pass's expert"})` : ""} in ${constants.inFeatures}${constants.modules && constants.modules !== "1" ? ` (${constants.modules} modules)` : ""}`;
    case "lora_expand":
      return `lora_expand out ${constants.outFeatures}`;
    case "matvec":
    case "matmul": {
      const shape = `${constants.K}x${constants.N}`;
      return `${k.name} ${shape}${shapes.has(shape) ? ` (${shapes.get(shape)})` : ""}${constants.loraRank ? " + LoRA epilogue" : ""}`;
    }
    default:
      return k.name;
  }
}

export const COPY_VARIANT = "copy (buffer to buffer)";

/**
 * Best microseconds of each record of each step, replayed alone (`timed(s, i)` false: not timed,
 * Infinity). Variant by variant, in `rounds` rounds over every step that runs it, so that a kernel's
 * figures in two steps are taken seconds apart under the same load from other jobs. A dispatch that
 * reads the LoRA shrink's t (the matvec's LoRA epilogue, an expand) finds there the row info of the
 * last shrink that ran: its own shrink is replayed first, untimed.
 */
export async function timeSteps(
  device: GPUDevice,
  steps: readonly (readonly Recorded[])[],
  variantOf: (k: KernelSource) => string,
  options: { readonly rounds: number; readonly timed?: (step: number, index: number) => boolean },
): Promise<number[][]> {
  const timer = new StepEncoder(device, new PipelineCache(device));
  try {
    const variants = steps.map((step) => step.map((r) => (r.kind === "copy" ? COPY_VARIANT : variantOf(r.kernel))));
    const best = steps.map((step) => step.map(() => Infinity));
    const producer = steps.map((step) => step.map((r, i) => (r.kind === "dispatch" && r.kernel.name !== "lora_shrink" && "t" in r.buffers ? step.slice(0, i).findLastIndex((p) => p.kind === "dispatch" && p.kernel.name === "lora_shrink") : -1)));
    const replay = (r: Recorded) => (r.kind === "copy" ? timer.copy(...r.args) : timer.dispatch(r.kernel, r.buffers as never, r.params));
    const timed = options.timed ?? (() => true);
    for (const v of new Set(variants.flat())) {
      const cells = steps.flatMap((step, s) => step.flatMap((r, i) => (timed(s, i) && variants[s]![i] === v ? [{ s, i, r }] : [])));
      for (let round = 0; round < options.rounds; round++) {
        for (const { s, i, r } of cells) {
          const shrink = producer[s]![i]! >= 0 ? steps[s]![producer[s]![i]!] : undefined;
          if (shrink) await bestMicros(timer, device, () => replay(shrink), { repeats: 1, rounds: 1 });
          const record = () => replay(r);
          if (round === 0) await bestMicros(timer, device, record, { repeats: 1, rounds: 1 }); // the timer's own pipelines
          best[s]![i] = Math.min(best[s]![i]!, await bestMicros(timer, device, record, { repeats: 1, rounds: 4 }));
        }
      }
    }
    return best;
  } finally {
    timer.destroy();
  }
}
