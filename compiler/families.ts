// Model families a base can belong to. Adding one (mistral, qwen2) is one entry in FAMILIES:
// its default sizes, the Hugging Face `model_type`s that map to it and its small architectural flags.
import type { BaseSettings } from "./base-keys.ts";

export interface Family {
  readonly name: string;
  /** `model_type` values of Hugging Face config.json files that load as this family. */
  readonly modelTypes: readonly string[];
  /** Whether q/k/v projections carry a bias. */
  readonly attentionBias: boolean;
  /** Values for keys a base leaves out; kv_heads and head_dim are derived from heads and hidden_size instead. */
  readonly defaults: Required<Omit<BaseSettings, "kvHeads" | "headDim">>;
}

export const FAMILIES: Readonly<Record<string, Family>> = {
  // LLaMA-2-7B sizes
  llama: {
    name: "llama",
    modelTypes: ["llama"],
    attentionBias: false,
    defaults: {
      hiddenSize: 4096,
      layers: 32,
      heads: 32,
      intermediateSize: 11008,
      vocabSize: 32000,
      ropeTheta: 10000,
      rmsNormEps: 1e-6,
      maxPositions: 4096,
      tieEmbeddings: false,
    },
  },
};

export const FAMILY_NAMES = Object.keys(FAMILIES);

export function familyNamed(name: string): Family | undefined {
  return Object.hasOwn(FAMILIES, name) ? FAMILIES[name] : undefined;
}

export function familyForModelType(modelType: string): Family | undefined {
  return Object.values(FAMILIES).find((f) => f.modelTypes.includes(modelType));
}

/** Every `model_type` some family accepts, for error messages. */
export function supportedModelTypes(): string[] {
  return Object.values(FAMILIES).flatMap((f) => f.modelTypes);
}
