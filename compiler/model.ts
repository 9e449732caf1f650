// The checked model: what a spec means once names are resolved, defaults applied, patterns expanded
// and every rule checked. The plan (compiler/plan.ts) and the budget are computed from this alone.
import type { Span } from "../grammar/ast.ts";
import type { RationalOrders } from "./rational.ts";
import type { RopeScaling, WeightFormat } from "../runtime/package/format.ts";

/** The seven LoRA-capable linear modules of a LLaMA-family block: MiLoRA's experts. */
export const EXPERT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] as const;
export type ExpertModule = (typeof EXPERT_MODULES)[number];

/** Concrete hyper-parameters of a base model, in milora's names (HF names in comments). */
export interface BaseModel {
  readonly name: string;
  /** A name of compiler/families.ts: its architecture table names the tensors and their shapes. */
  readonly family: string;
  readonly hiddenSize: number; // hidden_size
  readonly layers: number; // num_hidden_layers
  readonly heads: number; // num_attention_heads
  readonly kvHeads: number; // num_key_value_heads
  readonly headDim: number; // head_dim (hidden_size / heads unless given)
  readonly intermediateSize: number; // intermediate_size
  readonly vocabSize: number; // vocab_size
  readonly ropeTheta: number; // rope_theta
  /** rope_scaling; absent for plain RoPE. */
  readonly ropeScaling?: RopeScaling;
  readonly rmsNormEps: number; // rms_norm_eps
  readonly maxPositions: number; // max_position_embeddings
  readonly tieEmbeddings: boolean; // tie_word_embeddings
  /** sliding_window (mistral): a position attends to itself and the window - 1 before it; absent: all before it. */
  readonly slidingWindow?: number;
  /**
   * The spec's `weights` key: how the linear weights are stored on the GPU (a command's `--weights`
   * overrides it). Absent: f16 for an F16/BF16 checkpoint, f32 otherwise (docs/weights.md).
   */
  readonly weights?: WeightFormat;
  /** Absolute path of the HF config.json this base was read from, if any. */
  readonly configPath?: string;
  readonly span: Span;
}

/** LoRA options of one expert module in one layer. */
export interface LoraOptions {
  readonly rank: number;
  readonly alpha: number;
  readonly dropout: number;
  readonly rslora: boolean;
  /**
   * DoRA (Liu et al. 2024, PEFT's use_dora): a learned magnitude m per output row rescales the module,
   * m * (W + scaling * B A) / ||W + scaling * B A||_row. Absent for plain LoRA.
   */
  readonly dora?: true;
  /** alpha / rank, or alpha / sqrt(rank) with rsLoRA. */
  readonly scaling: number;
}

/** One LoRA module in one layer: an expert in MiLoRA's sense. */
export interface ExpertSlot extends LoraOptions {
  readonly layer: number;
  readonly module: ExpertModule;
  readonly inFeatures: number;
  readonly outFeatures: number;
}

/** `attention` is the paper's self-attention pooler (appendix C, eq. 8): one learned vector w_sa. */
export type Pooling = "last" | "mean" | "max" | "attention";
/** Applied to the pooled router input (eq. 3); `rational` is the learned rational unit (eq. 6). */
export type Activation = "none" | "gelu" | "relu" | "rational";
/** `prompt`: MiLoRA's route-once at prefill; `token`: the per-token MoE-LoRA baseline. */
export type RoutingTime = "prompt" | "token";
/**
 * Which experts a router keeps, and their gates. With `renormalize` false (the paper's eq. 3, the
 * default) a kept expert's gate is its softmax probability over all of the layer's experts, so the
 * gates need not sum to 1; with `renormalize` true (the authors' code) the kept probabilities are
 * divided by their sum. `dense` keeps every expert: its gates are the softmax and sum to 1.
 */
export type Selection =
  | { readonly rule: "top_k"; readonly k: number; readonly renormalize: boolean }
  | { readonly rule: "threshold"; readonly threshold: number; readonly renormalize: boolean }
  | { readonly rule: "dense" };

export interface RouterConfig {
  /** Only `per_layer` today (one router in front of each Transformer layer). */
  readonly placement: "per_layer";
  /** Which hidden states the router reads: the layer's input. */
  readonly input: "layer_input";
  readonly pooling: Pooling;
  readonly selection: Selection;
  readonly activation: Activation;
  /** The rational activation's orders: present exactly when `activation` is `rational`. */
  readonly rational?: RationalOrders;
  readonly when: RoutingTime;
  readonly noise: boolean;
  readonly balance: number;
}

/**
 * Where a Mixture-of-LoRA baseline routes every token inside the layer (the methods MiLoRA is compared
 * against): `per_module` (MoLoRA, MOELoRA) gives each adapted module its own router over E experts that
 * split the module's rank-r LoRA into rank r/E slices; `per_ffn` (MixLoRA) gives each layer one router
 * over E experts, each a full rank-r LoRA on every adapted MLP module, run as E separate feed-forward
 * passes of which the top k are mixed; its attention modules are plain LoRA.
 */
export type MoePlacement = "per_module" | "per_ffn";

/** A per-token Mixture-of-LoRA router (`router { placement per_module | per_ffn ... }`). */
export interface MoeRouting {
  readonly placement: MoePlacement;
  /** E: experts per module (per_module) or per feed-forward block (per_ffn). */
  readonly experts: number;
  /** Top-k of E (renormalised or the plain softmax probabilities), or dense (every expert, the softmax). */
  readonly selection: Extract<Selection, { rule: "top_k" | "dense" }>;
  /** The load-balancing loss's coefficient (Switch/Mixtral form, docs/language.md). */
  readonly balance: number;
}

/** The MLP modules a per_ffn router's experts live in. */
export const FFN_MODULES: readonly ExpertModule[] = ["gate_proj", "up_proj", "down_proj"];

/**
 * The rank a module's LoRA has in its weights: per_ffn stacks its E experts of rank r into one rank-E*r
 * LoRA on each MLP module (expert e owns ranks e*r .. (e+1)*r - 1); otherwise the spec's rank.
 */
export function storedRank(adapter: Pick<Adapter, "moe">, slot: Pick<ExpertSlot, "module" | "rank">): number {
  return adapter.moe?.placement === "per_ffn" && FFN_MODULES.includes(slot.module) ? adapter.moe.experts * slot.rank : slot.rank;
}

/** A fully resolved adapter. */
export interface Adapter {
  readonly name: string;
  readonly base: BaseModel;
  /** Name of the adapter this one extends, if it is a variant. */
  readonly extends?: string;
  /** Layers that carry experts and (when routed) a router, ascending. */
  readonly layers: readonly number[];
  /** Enabled expert modules, by layer then module order of EXPERT_MODULES. */
  readonly experts: readonly ExpertSlot[];
  /** MiLoRA's per-layer router; `undefined` for plain LoRA (`router off`) and for a per-token `moe` adapter. */
  readonly router?: RouterConfig;
  /**
   * A per-token Mixture-of-LoRA baseline's routing (then `router` is absent and every enabled module
   * has gate 1: the routing happens inside the modules).
   */
  readonly moe?: MoeRouting;
  readonly span: Span;
}

/** The result of checking one or more files: every base and adapter in scope. */
export interface CheckedProgram {
  readonly bases: readonly BaseModel[];
  readonly adapters: readonly Adapter[];
}
