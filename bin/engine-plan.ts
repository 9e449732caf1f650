// Planning for the engine, in the CLI layer: `milora run SPEC` and `milora serve` plan here and hand the
// runtime a plan with its kernels, as a compiled package does with its manifest and kernel files. The
// resolver makes the kernels a plan cannot hold in advance (routers of adapters registered at run time
// under another router, row blocks of a device's smaller binding), with the compiler's generators.
import { storedRank, type Adapter, type BaseModel, type MoeRouting } from "../compiler/model.ts";
import { positionLimit } from "../compiler/rope-scaling.ts";
import { kernelSources, planBase, plannedKernelSource, routerKernelRequests, type KernelRequest, type Plan } from "../compiler/plan.ts";
import type { EngineOptions } from "../runtime/engine/engine.ts";
import type { KernelResolver } from "../runtime/engine/kernels.ts";
import { defaultWeightFormat } from "../runtime/engine/weights.ts";
import { adapterSpecFromPeft } from "../runtime/formats/adapter.ts";
import { openCheckpoint } from "../runtime/formats/checkpoint.ts";
import { WEIGHT_FORMATS, type WeightFormat } from "../runtime/package/format.ts";
import { userError } from "../runtime/errors.ts";
import { calibratedMatvecRows, type Calibration } from "./measure/calibration.ts";

/** Positions per sequence when none is asked for: the base's (compiler/rope-scaling.ts positionLimit), capped here. */
export const DEFAULT_CTX_CAP = 2048;
/** Largest LoRA rank an engine reserves when nothing says otherwise. */
export const DEFAULT_MAX_LORA_RANK = 16;

/** What the plan is made for: the cache length, the largest rank, the binding size and the adapter served. */
export interface PlanRequest {
  readonly base: BaseModel;
  /** KV cache positions per sequence (default: the base's position limit, max_positions unless rope scaling is dynamic, capped at 2048). */
  readonly ctx?: number;
  /** Largest LoRA rank an adapter may have (default 16; 0 when maxAdapters is 0). */
  readonly maxLoraRank?: number;
  /** Adapters resident at once (default 4; 0 plans the base alone). */
  readonly maxAdapters?: number;
  /** Storage binding size the plan assumes (default WebGPU's 128 MiB). */
  readonly maxBindingBytes?: number;
  /** The adapter spec served: its routers' kernels join the plan. */
  readonly adapter?: Adapter;
  /** How the linear weights are stored (`--weights`; default: weightsFor's choice). */
  readonly weights?: WeightFormat;
  /** The checkpoint the engine will load, whose dtypes set the default storage format. */
  readonly checkpointDir?: string;
  /** The device's calibration (`milora bench --calibrate`): its matvec row limit for the storage format, when measured. */
  readonly calibration?: Pick<Calibration, "formats">;
}

/** The plan, its kernels as generated, and a resolver for the rest: what the engine takes from the CLI. */
export type EnginePlan = Pick<EngineOptions, "plan" | "kernels" | "resolver">;

export function enginePlan(request: PlanRequest): EnginePlan {
  const { base } = request;
  const ctx = request.ctx ?? Math.min(positionLimit(base), DEFAULT_CTX_CAP);
  const maxLoraRank = (request.maxAdapters ?? 4) === 0 ? 0 : (request.maxLoraRank ?? DEFAULT_MAX_LORA_RANK);
  const weights = request.weights ?? weightsFor(base, request.checkpointDir);
  const matvecMaxRows = calibratedMatvecRows(request.calibration, weights);
  const plan = planBase(base, {
    ctx,
    maxLoraRank,
    weights,
    ...(matvecMaxRows === undefined ? {} : { matvecMaxRows }),
    ...(request.maxBindingBytes === undefined ? {} : { maxBindingBytes: request.maxBindingBytes }),
    ...(request.adapter === undefined ? {} : { adapter: request.adapter }),
  });
  return { plan, kernels: kernelSources(plan), resolver: generatingResolver };
}

/** The value of `--weights` (f32, f16, q8 or q4), or undefined when not given. */
export function weightsFlag(text: string | undefined): WeightFormat | undefined {
  if (text === undefined) return undefined;
  if (!(WEIGHT_FORMATS as readonly string[]).includes(text)) throw userError("usage", `--weights must be one of ${WEIGHT_FORMATS.join(", ")}, got "${text}"`);
  return text as WeightFormat;
}

/**
 * The storage format when no `--weights` is given: the spec's `weights`, else f16 for an F16/BF16
 * checkpoint and f32 otherwise (runtime/engine/weights.ts defaultWeightFormat); f32 without a checkpoint.
 */
export function weightsFor(base: BaseModel, checkpointDir: string | undefined): WeightFormat {
  if (base.weights !== undefined) return base.weights;
  if (checkpointDir === undefined) return "f32";
  const checkpoint = openCheckpoint(checkpointDir);
  try {
    return defaultWeightFormat(checkpoint);
  } finally {
    checkpoint.close();
  }
}

/**
 * Engine options planned here from the plan request's fields (ctx, maxLoraRank, adapter), the rest
 * passed through: `Engine.load(plannedEngine({ base, checkpointDir, ctx: 64 }))`.
 */
export function plannedEngine<O extends PlanRequest & Omit<EngineOptions, "plan" | "kernels" | "resolver" | "base">>(
  options: O,
): EngineOptions & Omit<O, "ctx" | "maxLoraRank" | "adapter" | "weights" | "calibration"> {
  const { ctx: _ctx, maxLoraRank: _rank, adapter: _adapter, weights: _weights, calibration: _calibration, ...rest } = options;
  return { ...rest, ...enginePlan(options) };
}

/** Kernels outside a plan, generated by the compiler's kernel generators. */
export const generatingResolver: KernelResolver = {
  router(config, hidden, experts) {
    const { score, pool, gate } = routerKernelRequests(config, hidden, experts);
    return {
      ...(score ? { score: plannedKernelSource(score) } : {}),
      ...(pool ? { pool: plannedKernelSource(pool) } : {}),
      gate: plannedKernelSource(gate),
    };
  },
  block(kernel, rows) {
    const k = kernel as Plan["kernels"][number];
    if (k.family !== "matmul" && k.family !== "matvec") throw new Error(`${k.key} is not a linear kernel`);
    return plannedKernelSource({ family: k.family, constants: { ...k.constants, N: rows, stride: k.constants.N } } satisfies KernelRequest);
  },
};

/**
 * The spec whose per-token routing an engine must be planned for (its MoE kernels are the plan's, and
 * serve one routing): the one per_module or per_ffn routing among `specs`, or none. Refuses two.
 */
export function moeSpecOf(specs: readonly Adapter[]): Adapter | undefined {
  const routed = specs.filter((s) => s.moe !== undefined);
  const [first] = routed;
  const other = first && routed.find((s) => !sameMoe(s.moe!, first.moe!));
  if (other) {
    throw userError("usage", `adapters ${first!.name} (${describeMoe(first!.moe!)}) and ${other.name} (${describeMoe(other.moe!)}) route tokens differently: one engine runs one per-token routing, so run them separately`);
  }
  return first;
}

/** The largest rank the adapters' LoRA has on the GPU (a per_ffn MLP module's experts stacked); undefined for none. */
export function largestStoredRank(specs: readonly Adapter[]): number | undefined {
  const ranks = specs.flatMap((a) => a.experts.map((e) => storedRank(a, e)));
  return ranks.length > 0 ? Math.max(...ranks) : undefined;
}

function sameMoe(a: MoeRouting, b: MoeRouting): boolean {
  return describeMoe(a) === describeMoe(b);
}

function describeMoe(m: MoeRouting): string {
  const s = m.selection;
  return `${m.placement}, ${m.experts} experts, ${s.rule === "dense" ? "dense" : `top_k ${s.k}${s.renormalize ? " renormalize" : ""}`}`;
}

/**
 * The plan `milora serve` runs when no package fixes one: LoRA up to `maxLoraRank` (default the largest
 * rank of the adapters given at start, checked against `adapterSpec` or their own configs; 16 when none is).
 */
export function servingPlan(setup: {
  readonly base: BaseModel;
  readonly ctx?: number;
  readonly maxLoraRank?: number;
  readonly maxResidentAdapters: number;
  readonly adapters?: readonly (readonly [string, string])[];
  readonly adapterSpec?: (name: string) => Adapter | undefined;
  /** A per-token baseline's spec the engine serves (its MoE kernels join the plan), when the source has one. */
  readonly moeSpec?: Adapter;
  /** `--weights`; and the checkpoint served, whose dtypes set the default (weightsFor). */
  readonly weights?: WeightFormat;
  readonly checkpointDir?: string;
  readonly calibration?: Pick<Calibration, "formats">;
}): EnginePlan {
  const specs = (setup.adapters ?? []).map(([name, dir]) => setup.adapterSpec?.(name) ?? adapterSpecFromPeft(dir, setup.base, name));
  const moe = moeSpecOf([...(setup.moeSpec ? [setup.moeSpec] : []), ...specs]);
  const largest = largestStoredRank([...(moe ? [moe] : []), ...specs]) ?? DEFAULT_MAX_LORA_RANK;
  return enginePlan({
    base: setup.base,
    ...(moe === undefined ? {} : { adapter: moe }),
    maxAdapters: setup.maxResidentAdapters,
    maxLoraRank: setup.maxLoraRank ?? largest,
    ...(setup.ctx === undefined ? {} : { ctx: setup.ctx }),
    ...(setup.weights === undefined ? {} : { weights: setup.weights }),
    ...(setup.checkpointDir === undefined ? {} : { checkpointDir: setup.checkpointDir }),
    ...(setup.calibration === undefined ? {} : { calibration: setup.calibration }),
  });
}
