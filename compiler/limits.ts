// Sizes milora accepts, checked before any work that grows with them (layer grids, tensor lists, plans,
// kernel text). Each is far above every released model, so no real spec or config.json meets one, while a
// typo or a hostile file (`layers 1e20`, `"head_dim": 100000000`) is refused with a diagnostic at once.
// docs/reliability.md ("Inputs") lists them with the reasons.
import { BASE_KEYS, type BaseField } from "./base-keys.ts";

/**
 * Upper bounds of base hyper-parameters, by BaseModel field. For scale, the largest dense LLaMA-family
 * models published: Llama 3.1 405B has 126 layers, hidden 16384, 128 heads, head size 128, intermediate
 * 53248, vocabulary 128256; the largest vocabularies are about 262144 (Gemma 3); the longest contexts are
 * about 10M positions (Llama 4 Scout).
 */
export const BASE_LIMITS: Partial<Record<BaseField, number>> = {
  layers: 1024,
  hiddenSize: 65536,
  heads: 1024,
  kvHeads: 1024,
  headDim: 1024,
  intermediateSize: 2 ** 18,
  vocabSize: 2 ** 22,
  maxPositions: 2 ** 24,
};

/** The largest head size, also when it is derived as hidden_size / heads. */
export const MAX_HEAD_DIM = BASE_LIMITS.headDim!;

/** The largest base. Layer grids, layer lists and per-layer tensor lists are bounded by it. */
export const MAX_LAYERS = BASE_LIMITS.layers!;

/** How many experts a per_module or per_ffn router may choose among (the MoE kernels' bound). */
export const MAX_MOE_EXPERTS = 64;
/** The largest rank a module's LoRA may have on the GPU once a per_ffn adapter stacks its experts (the planner's maxLoraRank bound). */
export const MAX_STACKED_RANK = 256;

/** The largest LoRA rank: published adapters use 4 to 256, and rank above the hidden size adds nothing. */
export const MAX_RANK = 4096;

/**
 * Items in one layer list (`layers 0, 1, 2`, `at layers ...`): naming every layer of the largest base
 * once takes MAX_LAYERS items, so a longer list only repeats layers.
 */
export const MAX_LAYER_LIST_ITEMS = MAX_LAYERS;

/** The bound a value of `field` breaks, if any. */
export function limitBroken(field: BaseField, value: number): number | undefined {
  const limit = BASE_LIMITS[field];
  return limit !== undefined && value > limit ? limit : undefined;
}

/**
 * Without head_dim the head size is hidden_size / heads; that too must stay within MAX_HEAD_DIM (the
 * attention kernels are generated for it). The problem in words, or undefined.
 */
export function derivedHeadDimProblem(
  settings: { readonly headDim?: number },
  complete: { readonly hiddenSize: number; readonly heads: number; readonly headDim: number },
): string | undefined {
  if (settings.headDim !== undefined || complete.headDim <= MAX_HEAD_DIM) return undefined;
  return `the head size hidden_size / heads = ${complete.hiddenSize} / ${complete.heads} = ${complete.headDim} is above milora's limit of ${MAX_HEAD_DIM}`;
}

/**
 * Every bound a complete base breaks, in words naming the Hugging Face key. For code handed a BaseModel
 * that did not come through the checker or the config reader (a package manifest, a library caller).
 */
export function baseLimitProblems(base: { readonly [F in BaseField]?: number | boolean }): string[] {
  const problems: string[] = [];
  for (const { field, hf } of Object.values(BASE_KEYS)) {
    const value = base[field];
    if (typeof value !== "number") continue;
    const limit = limitBroken(field, value);
    if (limit !== undefined || !Number.isFinite(value)) problems.push(`${hf} ${value} is above milora's limit of ${limit ?? "a finite number"}`);
  }
  return problems;
}
