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
import { moduleShape } from "./families.ts";

export interface ModuleBudget {
  readonly module: ExpertModule;
  /** Layers where this module is an enabled expert. */
  readonly layers: number;
  /** Smallest and largest rank over those layers (they differ under `at layers` overrides). */
  readonly minRank: number;
  readonly maxRank: number;
  /** Sum over layers of r * (in + out): the A and B matrices, plus DoRA's magnitude vector [out]. */
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
  // DoRA's magnitude m [out] is trained and stored beside A and B (PEFT counts it too).
  const slotParams = (s: ExpertSlot) => s.rank * (s.inFeatures + s.outFeatures) + (s.dora ? s.outFeatures : 0);

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
 * the self-attention pooler's w_sa [hidden] for attention pooling, and the rational activation's
 * m + 1 + n coefficients.
 */
function routerParams(hidden: number, experts: number, router: RouterConfig): number {
  const gate = hidden * experts;
  const rational = router.activation === "rational" && router.rational ? router.rational.numerator + 1 + router.rational.denominator : 0;
  return gate + (router.noise ? gate : 0) + (router.pooling === "attention" ? hidden : 0) + rational;
}

/**
 * The share of a layer's enabled modules expected to run per token, assuming every module is equally
 * likely to be chosen. top_k: k of n. threshold T: at most floor(1/T) experts can have a probability
 * >= T (the probabilities sum to 1), and at least the most probable one runs, so min(n, floor(1/T))
 * of n is the bound reported. The gates' form (as they are, or renormalised) changes no count. dense
 * and plain LoRA run all.
 */
function expectedShare(experts: number, router: RouterConfig | undefined): number {
  if (router === undefined || experts === 0) return 1;
  const s = router.selection;
  if (s.rule === "top_k") return Math.min(s.k, experts) / experts;
  if (s.rule === "threshold") return Math.min(experts, Math.max(1, Math.floor(1 / s.threshold))) / experts;
  return 1;
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
