// Model families a base can belong to, each with its one architecture table: the Hugging Face tensor and
// module names, every linear module's input and output widths, and the small architectural flags. The
// planner, the checker, the budget, the adapter formats, the emitters and the random checkpoints all read
// the table; adding a family is an entry here plus the kernels that change.
import type { TensorRole } from "../runtime/package/format.ts";
import type { FamilyDefaults } from "./base-keys.ts";
import { EXPERT_MODULES, type BaseModel, type ExpertModule } from "./model.ts";

/** A width a tensor dimension can have, named by what it is in a layer. */
export type Width = "hidden" | "q" | "kv" | "intermediate" | "vocab";

/** A base's widths by name: q is heads * head_dim, kv is kv_heads * head_dim. */
export type Widths = Readonly<Record<Width, number>>;

/** A linear module of a layer in a family. */
export interface ModuleArchitecture {
  /** Its path inside a layer, as in Hugging Face module and tensor names (`self_attn.q_proj`). */
  readonly path: string;
  readonly input: Width;
  readonly output: Width;
  /** Whether the checkpoint holds a `.bias` of [output] beside its `.weight`. */
  readonly bias: boolean;
}

/** Where a family keeps its tensors, in Hugging Face names. */
export interface Architecture {
  /** Layer i's tensors start with `${layers}.${i}.`. */
  readonly layers: string;
  readonly modules: Readonly<Record<ExpertModule, ModuleArchitecture>>;
  /** The RMSNorm weights in a layer, before attention and before the MLP. */
  readonly attentionNorm: string;
  readonly mlpNorm: string;
  readonly finalNorm: string;
  readonly embedding: string;
  /** The output head; absent from a checkpoint whose embeddings are tied. */
  readonly lmHead: string;
  /** The MLP's gated activation: SwiGLU's silu, or GeGLU's tanh-approximated GELU (gemma). */
  readonly activation: "silu" | "gelu_tanh";
  /** RMSNorm scales by `w` (0) or by `1 + w` (1: gemma stores its norm weights offset by one). */
  readonly normOffset: 0 | 1;
  /** Whether the embedding rows are multiplied by sqrt(hidden_size) before the first layer (gemma). */
  readonly scaleEmbeddings: boolean;
}

/**
 * How a family's config.json sets sliding-window attention: `sliding_window` (null for none: mistral),
 * only with `use_sliding_window` true (qwen2, whose per-layer windows milora refuses), or not at all.
 */
export type SlidingWindowKeys = "sliding_window" | "use_sliding_window" | "none";

export interface Family {
  readonly name: string;
  /** `model_type` values of Hugging Face config.json files that load as this family. */
  readonly modelTypes: readonly string[];
  readonly architecture: Architecture;
  readonly slidingWindow: SlidingWindowKeys;
  /** The values config.json's activation keys may have (the first key given is read), with the family's default. */
  readonly activationKeys: { readonly keys: readonly string[]; readonly accepts: readonly string[] };
  /** Values for keys a base leaves out; kv_heads and head_dim are derived from heads and hidden_size instead. */
  readonly defaults: FamilyDefaults;
}

/** The LLaMA block: q/k/v/o in `self_attn`, gate/up/down in `mlp`, no biases. */
const LLAMA_ARCHITECTURE: Architecture = {
  layers: "model.layers",
  modules: {
    q_proj: { path: "self_attn.q_proj", input: "hidden", output: "q", bias: false },
    k_proj: { path: "self_attn.k_proj", input: "hidden", output: "kv", bias: false },
    v_proj: { path: "self_attn.v_proj", input: "hidden", output: "kv", bias: false },
    o_proj: { path: "self_attn.o_proj", input: "q", output: "hidden", bias: false },
    gate_proj: { path: "mlp.gate_proj", input: "hidden", output: "intermediate", bias: false },
    up_proj: { path: "mlp.up_proj", input: "hidden", output: "intermediate", bias: false },
    down_proj: { path: "mlp.down_proj", input: "intermediate", output: "hidden", bias: false },
  },
  attentionNorm: "input_layernorm",
  mlpNorm: "post_attention_layernorm",
  finalNorm: "model.norm.weight",
  embedding: "model.embed_tokens.weight",
  lmHead: "lm_head.weight",
  activation: "silu",
  normOffset: 0,
  scaleEmbeddings: false,
};

/** Qwen2: LLaMA's block with biases on q, k and v (transformers' Qwen2Attention). */
const QWEN2_ARCHITECTURE: Architecture = {
  ...LLAMA_ARCHITECTURE,
  modules: {
    ...LLAMA_ARCHITECTURE.modules,
    q_proj: { ...LLAMA_ARCHITECTURE.modules.q_proj, bias: true },
    k_proj: { ...LLAMA_ARCHITECTURE.modules.k_proj, bias: true },
    v_proj: { ...LLAMA_ARCHITECTURE.modules.v_proj, bias: true },
  },
};

/** Gemma: GeGLU, RMSNorm by (1 + w), embeddings scaled by sqrt(hidden_size) (transformers' GemmaModel). */
const GEMMA_ARCHITECTURE: Architecture = { ...LLAMA_ARCHITECTURE, activation: "gelu_tanh", normOffset: 1, scaleEmbeddings: true };

const SILU = { keys: ["hidden_act"], accepts: ["silu"] };

export const FAMILIES: Readonly<Record<string, Family>> = {
  // LLaMA-2-7B sizes
  llama: {
    name: "llama",
    modelTypes: ["llama"],
    architecture: LLAMA_ARCHITECTURE,
    slidingWindow: "none",
    activationKeys: SILU,
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
  // Mistral-7B-v0.1 sizes (its 8 kv heads and 4096-token window come from its config)
  mistral: {
    name: "mistral",
    modelTypes: ["mistral"],
    architecture: LLAMA_ARCHITECTURE,
    slidingWindow: "sliding_window",
    activationKeys: SILU,
    defaults: {
      hiddenSize: 4096,
      layers: 32,
      heads: 32,
      intermediateSize: 14336,
      vocabSize: 32000,
      ropeTheta: 10000,
      rmsNormEps: 1e-5,
      maxPositions: 32768,
      tieEmbeddings: false,
    },
  },
  // Qwen2.5-0.5B sizes (its 2 kv heads come from its config)
  qwen2: {
    name: "qwen2",
    modelTypes: ["qwen2"],
    architecture: QWEN2_ARCHITECTURE,
    slidingWindow: "use_sliding_window",
    activationKeys: SILU,
    defaults: {
      hiddenSize: 896,
      layers: 24,
      heads: 14,
      intermediateSize: 4864,
      vocabSize: 151936,
      ropeTheta: 1000000,
      rmsNormEps: 1e-6,
      maxPositions: 32768,
      tieEmbeddings: true,
    },
  },
  // Gemma-2B sizes (its 1 kv head and head_dim 256 come from its config)
  gemma: {
    name: "gemma",
    modelTypes: ["gemma"],
    architecture: GEMMA_ARCHITECTURE,
    slidingWindow: "none",
    // GemmaConfig reads hidden_activation; transformers runs the tanh GELU whatever an older hidden_act says.
    activationKeys: { keys: ["hidden_activation"], accepts: ["gelu_pytorch_tanh"] },
    defaults: {
      hiddenSize: 2048,
      layers: 18,
      heads: 8,
      intermediateSize: 16384,
      vocabSize: 256000,
      ropeTheta: 10000,
      rmsNormEps: 1e-6,
      maxPositions: 8192,
      tieEmbeddings: true,
    },
  },
};

export const FAMILY_NAMES = Object.keys(FAMILIES);

export function familyNamed(name: string): Family | undefined {
  return Object.hasOwn(FAMILIES, name) ? FAMILIES[name] : undefined;
}

/** The family of a checked base (its name was checked against FAMILIES). */
export function familyOf(base: Pick<BaseModel, "family" | "name">): Family {
  const family = familyNamed(base.family);
  if (family === undefined) throw new Error(`base ${base.name}: unknown family "${base.family}"`);
  return family;
}

export function familyForModelType(modelType: string): Family | undefined {
  return Object.values(FAMILIES).find((f) => f.modelTypes.includes(modelType));
}

/** Every `model_type` some family accepts, for error messages. */
export function supportedModelTypes(): string[] {
  return Object.values(FAMILIES).flatMap((f) => f.modelTypes);
}

export function widthsOf(base: BaseModel): Widths {
  return {
    hidden: base.hiddenSize,
    q: base.heads * base.headDim,
    kv: base.kvHeads * base.headDim,
    intermediate: base.intermediateSize,
    vocab: base.vocabSize,
  };
}

/** A linear module's [in, out] features in a base (weights are stored [out, in]). */
export function moduleShape(base: BaseModel, module: ExpertModule): { inFeatures: number; outFeatures: number } {
  const m = familyOf(base).architecture.modules[module];
  const w = widthsOf(base);
  return { inFeatures: w[m.input], outFeatures: w[m.output] };
}

/** The name template of a layer tensor (`model.layers.{layer}.self_attn.q_proj.weight`): layerTensor fills it. */
export function layerTemplate(a: Architecture, path: string): string {
  return `${a.layers}.{layer}.${path}`;
}

/** A module's name in layer `layer`, the string PEFT matches target patterns against (`model.layers.3.self_attn.q_proj`). */
export function modulePath(base: Pick<BaseModel, "family" | "name">, layer: number, module: ExpertModule): string {
  const a = familyOf(base).architecture;
  return `${a.layers}.${layer}.${a.modules[module].path}`;
}

/** One tensor a base checkpoint must hold. */
export interface CheckpointTensor {
  readonly name: string;
  readonly shape: readonly number[];
  readonly role: TensorRole;
  readonly layer?: number;
  readonly module?: ExpertModule;
}

/** Every tensor of a base's checkpoint in checkpoint order, named and shaped by its family's table. */
export function checkpointTensors(base: BaseModel): CheckpointTensor[] {
  const a = familyOf(base).architecture;
  const w = widthsOf(base);
  const out: CheckpointTensor[] = [{ name: a.embedding, shape: [w.vocab, w.hidden], role: "embedding" }];
  for (let layer = 0; layer < base.layers; layer++) {
    const prefix = `${a.layers}.${layer}`;
    out.push({ name: `${prefix}.${a.attentionNorm}.weight`, shape: [w.hidden], role: "attn_norm", layer });
    for (const module of EXPERT_MODULES) {
      const m = a.modules[module];
      if (module === "gate_proj") out.push({ name: `${prefix}.${a.mlpNorm}.weight`, shape: [w.hidden], role: "mlp_norm", layer });
      out.push({ name: `${prefix}.${m.path}.weight`, shape: [w[m.output], w[m.input]], role: "linear", layer, module });
      if (m.bias) out.push({ name: `${prefix}.${m.path}.bias`, shape: [w[m.output]], role: "bias", layer, module });
    }
  }
  out.push({ name: a.finalNorm, shape: [w.hidden], role: "final_norm" });
  if (!base.tieEmbeddings) out.push({ name: a.lmHead, shape: [w.vocab, w.hidden], role: "lm_head" });
  return out;
}
