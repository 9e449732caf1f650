// What an adapter costs: trainable parameters (counted like PEFT's print_trainable_parameters),
// the frozen base's size, LoRA FLOPs per token and the adapter's memory, for MiLoRA, plain LoRA and the
// per-token Mixture-of-LoRA baselines (per_module, per_ffn). docs/language.md explains the counting.
import {
  EXPERT_MODULES,
  FFN_MODULES,
  type Adapter,
  type BaseModel,
  type ExpertModule,
  type ExpertSlot,
  type MoeRouting,
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
  /**
   * The experts a per-token baseline makes of this module (E, num_experts): under per_module the rank
   * splits into E experts of rank / E each; under per_ffn each MLP module holds E experts of the full rank
   * (stored stacked, rank E x rank). Absent for plain LoRA, MiLoRA and per_ffn's attention modules.
   */
  readonly experts?: number;
  /**
   * Sum over layers of r * (in + out): the A and B matrices, plus DoRA's magnitude vector [out]; times
   * E for a per_ffn MLP module (E full-rank experts).
   */
  readonly params: number;
}

export interface LayerBudget {
  readonly layer: number;
  /** Enabled expert modules in this layer. */
  readonly experts: number;
  readonly loraParams: number;
  readonly routerParams: number;
  /** LoRA FLOPs per token with every enabled module active (and, for a per-token baseline, every expert). */
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
  /** per_ffn (MixLoRA) only: the base work its feed-forward passes add, beyond the LoRA FLOPs. */
  readonly ffnPasses?: FfnPasses;
}

/**
 * A per_ffn adapter runs one feed-forward pass per kept expert, each with its own LoRA on the MLP
 * modules. The passes share the MLP input, so gate_proj's and up_proj's base products are computed once;
 * but where gate_proj or up_proj is adapted the experts' intermediate activations differ, and down_proj's
 * base product (intermediate -> hidden) runs once per kept expert instead of once. That base work, not
 * the LoRA FLOPs, is what MixLoRA costs. (With only down_proj adapted the experts share its input and
 * the base product runs once, scaled by the gates' sum.)
 */
export interface FfnPasses {
  /** Layers whose down_proj base product runs once per kept expert. */
  readonly layers: number;
  /** down_proj base products per token in each of those layers: every expert (E), and as routed (top_k K: K; dense: E). The plain model runs 1. */
  readonly downProjRuns: { readonly allEnabled: number; readonly expected: number };
  /** Base FLOPs per token beyond the plain model's: (runs - 1) x 2 x intermediate x hidden in each of those layers. */
  readonly extraBaseFlops: { readonly allEnabled: number; readonly expected: number };
}

export function computeBudget(adapter: Adapter): AdapterBudget {
  const { base, router, moe } = adapter;
  // DoRA's magnitude m [out] is trained and stored beside A and B (PEFT counts it too).
  const slotParams = (s: ExpertSlot) => s.rank * (s.inFeatures + s.outFeatures) + (s.dora ? s.outFeatures : 0);
  // A per_ffn MLP module holds E full-rank experts; everything else is one LoRA of its rank.
  const copies = (s: ExpertSlot) => (moe?.placement === "per_ffn" && FFN_MODULES.includes(s.module) ? moe.experts : 1);

  const layers = adapter.layers.map((layer): LayerBudget => {
    const slots = adapter.experts.filter((s) => s.layer === layer);
    const loraParams = sum(slots.map((s) => copies(s) * slotParams(s)));
    const flopsAll = 2 * loraParams;
    if (moe !== undefined) {
      return {
        layer,
        experts: slots.length,
        loraParams,
        routerParams: moeRouterParams(base.hiddenSize, slots, moe),
        flopsAll,
        flopsExpected: 2 * sum(slots.map((s) => expectedCopies(s, moe) * slotParams(s))),
      };
    }
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
        ...(moe !== undefined && (moe.placement === "per_module" || FFN_MODULES.includes(module)) ? { experts: moe.experts } : {}),
        params: sum(slots.map((s) => copies(s) * slotParams(s))),
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
    ...(moe?.placement === "per_ffn" ? { ffnPasses: ffnPasses(adapter, moe) } : {}),
  };
}

/**
 * A per-token baseline's routers: per_module one W [E, in] per enabled module, reading the module's
 * input; per_ffn one W [E, hidden] per layer with an enabled MLP module, reading the MLP's input.
 * Their own work (2 x E x in FLOPs a router, every token) is not in the FLOPs, as MiLoRA's router's is not.
 */
function moeRouterParams(hidden: number, slots: readonly ExpertSlot[], moe: MoeRouting): number {
  if (moe.placement === "per_module") return sum(slots.map((s) => moe.experts * s.inFeatures));
  return slots.some((s) => FFN_MODULES.includes(s.module)) ? moe.experts * hidden : 0;
}

/**
 * How many of a module's rank-r LoRAs a token runs under a per-token baseline: per_module the kept k of
 * its E slices of rank r / E, so k / E (dense: 1); per_ffn an MLP module's k kept full-rank experts, k
 * (dense: E), and an attention module its one plain LoRA.
 */
function expectedCopies(s: ExpertSlot, moe: MoeRouting): number {
  if (moe.placement === "per_module") return keptExperts(moe) / moe.experts;
  return FFN_MODULES.includes(s.module) ? keptExperts(moe) : 1;
}

/** Experts a per-token router keeps for each token: k of E (top_k), or all E (dense). */
function keptExperts(moe: MoeRouting): number {
  return moe.selection.rule === "top_k" ? Math.min(moe.selection.k, moe.experts) : moe.experts;
}

function ffnPasses(adapter: Adapter, moe: MoeRouting): FfnPasses {
  const { hiddenSize, intermediateSize } = adapter.base;
  // down_proj's input differs between experts where an expert changes gate_proj or up_proj.
  const layers = adapter.layers.filter((layer) =>
    adapter.experts.some((s) => s.layer === layer && (s.module === "gate_proj" || s.module === "up_proj")),
  ).length;
  const extra = (runs: number) => layers * (runs - 1) * 2 * intermediateSize * hiddenSize;
  const runs = { allEnabled: moe.experts, expected: keptExperts(moe) };
  return {
    layers,
    downProjRuns: runs,
    extraBaseFlops: { allEnabled: extra(runs.allEnabled), expected: extra(runs.expected) },
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
 * and plain LoRA run all. (A per-token baseline's share is its experts': k of E, in computeBudget.)
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
