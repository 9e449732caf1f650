// The keys of a `base` block: milora's name, the BaseModel field it fills and the Hugging Face
// config.json name it corresponds to (read by hf-config.ts, and offered as a hint when a spec uses it).
import type { BaseModel } from "./model.ts";

/** The numeric and boolean hyper-parameters of a base, by BaseModel field. */
export type BaseField =
  | "hiddenSize"
  | "layers"
  | "heads"
  | "kvHeads"
  | "headDim"
  | "intermediateSize"
  | "vocabSize"
  | "ropeTheta"
  | "rmsNormEps"
  | "maxPositions"
  | "tieEmbeddings"
  | "slidingWindow";

/** Values of base keys collected from a family, a config.json and a spec, layered in that order. */
export type BaseSettings = { -readonly [F in BaseField]?: BaseModel[F] };

/** What a family fills in: everything but the derived kv_heads and head_dim, and the optional sliding window. */
export type FamilyDefaults = Required<Omit<BaseSettings, "kvHeads" | "headDim" | "slidingWindow">>;

/** `count`: a positive integer; `positive`: any number > 0; `boolean`: true or false. */
export type BaseKeyKind = "count" | "positive" | "boolean";

export interface BaseKey {
  readonly field: BaseField;
  readonly hf: string;
  readonly kind: BaseKeyKind;
}

export const BASE_KEYS = {
  hidden_size: { field: "hiddenSize", hf: "hidden_size", kind: "count" },
  layers: { field: "layers", hf: "num_hidden_layers", kind: "count" },
  heads: { field: "heads", hf: "num_attention_heads", kind: "count" },
  kv_heads: { field: "kvHeads", hf: "num_key_value_heads", kind: "count" },
  head_dim: { field: "headDim", hf: "head_dim", kind: "count" },
  intermediate_size: { field: "intermediateSize", hf: "intermediate_size", kind: "count" },
  vocab_size: { field: "vocabSize", hf: "vocab_size", kind: "count" },
  rope_theta: { field: "ropeTheta", hf: "rope_theta", kind: "positive" },
  rms_norm_eps: { field: "rmsNormEps", hf: "rms_norm_eps", kind: "positive" },
  max_positions: { field: "maxPositions", hf: "max_position_embeddings", kind: "count" },
  tie_embeddings: { field: "tieEmbeddings", hf: "tie_word_embeddings", kind: "boolean" },
  sliding_window: { field: "slidingWindow", hf: "sliding_window", kind: "count" },
} as const satisfies Record<string, BaseKey>;

export type BaseKeyName = keyof typeof BASE_KEYS;
export const BASE_KEY_NAMES = Object.keys(BASE_KEYS) as BaseKeyName[];

/** The milora key for a Hugging Face config name (`num_attention_heads` -> `heads`), if it differs. */
export function miloraNameOfHf(hfName: string): BaseKeyName | undefined {
  return BASE_KEY_NAMES.find((k) => BASE_KEYS[k].hf === hfName && k !== hfName);
}

/** A base's settings with every field filled: kv_heads defaults to heads, head_dim to hidden_size / heads. */
export function completeSettings(settings: BaseSettings, defaults: FamilyDefaults) {
  const s = { ...defaults, ...settings };
  return { ...s, kvHeads: s.kvHeads ?? s.heads, headDim: s.headDim ?? s.hiddenSize / s.heads };
}

export interface ShapeProblem {
  readonly code: "MIL206" | "MIL207";
  /** The key the problem is best reported at. */
  readonly key: BaseKeyName;
  readonly message: string;
}

/** Attention shapes that cannot work: a fractional head size, or query heads not shared evenly by kv heads. */
export function shapeProblems(settings: BaseSettings, complete: ReturnType<typeof completeSettings>): ShapeProblem[] {
  const problems: ShapeProblem[] = [];
  const { hiddenSize, heads, kvHeads } = complete;
  if (settings.headDim === undefined && hiddenSize % heads !== 0) {
    problems.push({
      code: "MIL206",
      key: "hidden_size",
      message: `hidden_size ${hiddenSize} is not divisible by heads ${heads}, so there is no whole head size`,
    });
  }
  if (heads % kvHeads !== 0) {
    problems.push({
      code: "MIL207",
      key: "kv_heads",
      message: `heads ${heads} is not divisible by kv_heads ${kvHeads}: each kv head must serve the same number of query heads`,
    });
  }
  return problems;
}
