// Model families a base can belong to, each with its one architecture table: the Hugging Face tensor and
// module names, every linear module's input and output widths, and the small architectural flags. The
// planner, the checker, the budget, the adapter formats, the emitters and the random checkpoints all read
// the table; adding a family is an entry here plus the kernels that change.
import type { TensorRole } from "../runtime/package/format.ts";
import type { BaseSettings } from "./base-keys.ts";
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
}

export interface Family {
  readonly name: string;
  /** `model_type` values of Hugging Face config.json files that load as this family. */
  readonly modelTypes: readonly string[];
  readonly architecture: Architecture;
  /** Values for keys a base leaves out; kv_heads and head_dim are derived from heads and hidden_size instead. */
  readonly defaults: Required<Omit<BaseSettings, "kvHeads" | "headDim">>;
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
};

export const FAMILIES: Readonly<Record<string, Family>> = {
  // LLaMA-2-7B sizes
  llama: {
    name: "llama",
    modelTypes: ["llama"],
    architecture: LLAMA_ARCHITECTURE,
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
