// What an adapter costs: trainable parameters (counted like PEFT's print_trainable_parameters),
// the frozen base's size, LoRA FLOPs per token and the adapter's memory. docs/language.md explains the counting.
import {
  EXPERT_MODULES,
  type Adapter,
  type BaseModel,
  type ExpertModule,
  type ExpertSlot,
  type RouterConfig,
} from "./model.ts";
import { moduleShape } from "./modules.ts";

export interface ModuleBudget {
  readonly module: ExpertModule;
  /** Layers where this module is an enabled expert. */
  readonly layers: number;
  /** Smallest and largest rank over those layers (they differ under `at layers` overrides). */
  readonly minRank: number;
  readonly maxRank: number;
  /** Sum over layers of r * (in + out): the A and B matrices. */
  readonly params: number;
}

export interface LayerBudget {
  readonly layer: number;
  /** Enabled expert modules in this layer. */
  readonly experts: number;
  readonly loraParams: number;
  readonly routerParams: number;
  /** LoRA FLOPs per token with every enabled module active. */
  readonly flopsAll: number;
  /** LoRA FLOPs per token expected under routing (see `expectedShare`). */
  readonly flopsExpected: number;
}

export interface AdapterBudget {
  /** Modules enabled in at least one layer, in EXPERT_MODULES order. */
  readonly modules: readonly ModuleBudget[];
  readonly layers: readonly LayerBudget[];
  readonly loraParams: number;
  readonly routerParams: number;
  /** LoRA plus router parameters: everything the adapter trains and stores. */
  readonly trainableParams: number;
  readonly baseParams: number;
  /** trainableParams as a percentage of baseParams. */
  readonly shareOfBasePercent: number;
  readonly flopsPerToken: { readonly allEnabled: number; readonly expected: number };
  /** Adapter weights (LoRA and router) stored as f32 and as f16. */
  readonly bytes: { readonly f32: number; readonly f16: number };
}

export function computeBudget(adapter: Adapter): AdapterBudget {
  const { base, router } = adapter;
  const slotParams = (s: ExpertSlot) => s.rank * (s.inFeatures + s.outFeatures);

  const layers = adapter.layers.map((layer): LayerBudget => {
    const slots = adapter.experts.filter((s) => s.layer === layer);
    const loraParams = sum(slots.map(slotParams));
    const flopsAll = 2 * loraParams;
    return {
      layer,
      experts: slots.length,
      loraParams,
      routerParams:
        router === undefined || slots.length === 0 ? 0 : routerParams(base.hiddenSize, slots.length, router),
      flopsAll,
      flopsExpected: flopsAll * expectedShare(slots.length, router),
    };
  });

  const modules = EXPERT_MODULES.flatMap((module): ModuleBudget[] => {
    const slots = adapter.experts.filter((s) => s.module === module);
    if (slots.length === 0) return [];
    const ranks = slots.map((s) => s.rank);
    return [
      {
        module,
        layers: slots.length,
        minRank: Math.min(...ranks),
        maxRank: Math.max(...ranks),
        params: sum(slots.map(slotParams)),
      },
    ];
  });

  const loraParams = sum(layers.map((l) => l.loraParams));
  const routerTotal = sum(layers.map((l) => l.routerParams));
  const trainableParams = loraParams + routerTotal;
  const baseTotal = baseParams(base);
  return {
    modules,
    layers,
    loraParams,
    routerParams: routerTotal,
    trainableParams,
    baseParams: baseTotal,
    shareOfBasePercent: (100 * trainableParams) / baseTotal,
    flopsPerToken: {
      allEnabled: sum(layers.map((l) => l.flopsAll)),
      expected: sum(layers.map((l) => l.flopsExpected)),
    },
    bytes: { f32: 4 * trainableParams, f16: 2 * trainableParams },
  };
}

/**
 * One layer's router: W_gate [hidden, experts], W_noise of the same shape when noisy gating is on,
 * and for attention pooling a scoring matrix [hidden, hidden] plus its vector [hidden].
 */
function routerParams(hidden: number, experts: number, router: RouterConfig): number {
  const gate = hidden * experts;
  return gate + (router.noise ? gate : 0) + (router.pooling === "attention" ? hidden * hidden + hidden : 0);
}

/**
 * The share of a layer's enabled modules expected to run per token. top_k assumes every module is
 * equally likely to be chosen, so k of n run; dense and plain LoRA run all; threshold has no fixed
 * count, so all is the bound reported.
 */
function expectedShare(experts: number, router: RouterConfig | undefined): number {
  if (router?.selection.rule !== "top_k" || experts === 0) return 1;
  return Math.min(router.selection.k, experts) / experts;
}

/** Parameters of the frozen base: embeddings, per layer 4 attention + 3 MLP matrices and 2 norms, final norm, LM head unless tied. */
export function baseParams(base: BaseModel): number {
  const linear = sum(
    EXPERT_MODULES.map((m) => {
      const { inFeatures, outFeatures } = moduleShape(base, m);
      return inFeatures * outFeatures;
    }),
  );
  const perLayer = linear + 2 * base.hiddenSize;
  const embeddings = base.vocabSize * base.hiddenSize;
  return embeddings + base.layers * perLayer + base.hiddenSize + (base.tieEmbeddings ? 0 : embeddings);
}

function sum(values: readonly number[]): number {
  return values.reduce((a, b) => a + b, 0);
}
