// The package format: what manifest.json holds, as types, and the check that a parsed manifest is
// one (every field, with an error naming the file and the field), plus the version rule. The plan's
// types live here because the plan is part of the format: the compiler's planner and emitters write
// these types, the runtime reads them. This file imports nothing from compiler/ or grammar/.
import type { DispatchRule, GroupCount, KernelBinding, KernelInterface, KernelParam } from "../gpu/kernel.ts";
import { MiloraError } from "../errors.ts";

/** The milora version this code writes into (and runs) manifests (kept equal to package.json's by a test). */
export const COMPILER_VERSION = "0.1.0";
/**
 * The manifest's layout; bumped when a field changes meaning. 3: the paper's router (selection
 * `renormalize`, `rational` orders, the w_sa pooler's score kernel, the activation after pooling).
 * 4: every kernel's interface (bindings, params, dispatch rule) beside its file; the beam top-k kernel
 * in the plan.
 * 5: the base names no `attentionBias` (its family's architecture table says which modules have biases);
 * bias tensors in the tensor table.
 * 7: DoRA: the LoRA expand kernels bind each slot's DoRA factors (`dora`, and `residual` where the
 * base product fused one); an expert may say `dora: true`.
 * 8: rotary scaling (`ropeScaling` of the base and of the plan's dims; a dynamic rope kernel binds
 * `lengths`), so a runtime without it refuses a scaled package instead of running plain RoPE.
 * 9: per-token Mixture-of-LoRA baselines (`moe` of the adapter and the plan; per_ffn's feed-forward
 * passes as `copy`, `lora`, `moe_route` and `moe_mix` ops; MoE variants of the LoRA shrink kernel);
 * the engine's LoRA kernels write and read t with each row's LoRA info (`rowInfo`), and a linear's
 * LoRA may name a matvec with the LoRA epilogue (`lora.matvec`).
 * 10: the LoRA shrink is a `lora_shrink` op of its own, one per group of modules reading the same input
 * (q/k/v, gate/up: a shrink kernel with `modules`), before their linears; a linear's or `lora` op's
 * LoRA names its region of the engine's t (`lora.t`) and no shrink, and a `lora` op only expands.
 */
export const MANIFEST_FORMAT = 10;
export const MANIFEST_FILE = "manifest.json";

/**
 * Whether a runtime of version `runtime` can run a manifest written by compiler `compiler`: the same
 * major version, and before 1.0 the same minor version too (0.x releases may change the plan).
 */
export function compatibleVersions(compiler: string, runtime: string): boolean {
  const [cMajor, cMinor] = compiler.split(".");
  const [rMajor, rMinor] = runtime.split(".");
  if (cMajor === undefined || cMajor !== rMajor) return false;
  return cMajor !== "0" || cMinor === rMinor;
}

// ---- The plan -------------------------------------------------------------------------------------

export interface PlanDims {
  readonly hidden: number;
  readonly layers: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  /** heads * headDim: width of q and of the attention output. */
  readonly qWidth: number;
  /** kvHeads * headDim: width of k, v and of one cached position. */
  readonly kvWidth: number;
  readonly intermediate: number;
  readonly vocab: number;
  readonly ropeTheta: number;
  /** Absent for plain RoPE. */
  readonly ropeScaling?: RopeScaling;
  readonly rmsNormEps: number;
  /** Positions a sequence may reach: the KV cache's length, at most the base's position limit. */
  readonly ctx: number;
  readonly tiedEmbeddings: boolean;
}

/**
 * Rotary scaling, Hugging Face's `rope_scaling` (transformers' modeling_rope_utils.py). `linear` and
 * `llama3` scale the inverse frequencies once; `dynamic` (NTK) raises the base for sequences longer
 * than `originalMaxPositions`, which is the base's max_positions (Hugging Face scales from
 * max_position_embeddings). docs/language.md, "RoPE scaling", has the formulas.
 */
export type RopeScaling =
  | { readonly type: "linear"; readonly factor: number }
  | { readonly type: "dynamic"; readonly factor: number; readonly originalMaxPositions: number }
  | {
      readonly type: "llama3";
      readonly factor: number;
      readonly lowFreqFactor: number;
      readonly highFreqFactor: number;
      readonly originalMaxPositions: number;
    };
export const ROPE_SCALING_TYPES = ["linear", "dynamic", "llama3"] as const satisfies readonly RopeScaling["type"][];

export const TENSOR_ROLES = ["embedding", "lm_head", "attn_norm", "mlp_norm", "final_norm", "linear", "bias"] as const;
export type TensorRole = (typeof TENSOR_ROLES)[number];

/**
 * How a tensor is stored on the GPU (docs/weights.md has the layouts with a worked example). Every row
 * of a [rows, K] weight is a whole number of 16-byte units, so a row block of a split weight is a plain
 * slice of the rows and a kernel reads a row 4 words at a time:
 * - `f32`: K f32 values (a row of K not a multiple of 4 is the exception: no padding).
 * - `f16`: 4 * ceil(K / 8) words; word j holds elements 2j (bits 0-15) and 2j + 1 (bits 16-31) as IEEE
 *   binary16, widened to f32 in the kernels by bit moves (core WGSL, no shader-f16: weight-rows.ts); +0 past K.
 * - `q8`: in the spirit of ggml's Q8_0, blocks of Q8_BLOCK (32) elements along K, each an f32 scale d
 *   and 32 int8 q in [-127, 127] with value d * q, d = max |x| / 127 over the block (0 for an all-zero
 *   block) and q = round(x / d), ties away from zero; q = 0 past K. A row of nb = ceil(K / 32) blocks
 *   holds first the quants, 8 words a block, element k in byte k % 4 (bits 8(k % 4).., two's
 *   complement) of word k / 4, then the nb scales as f32 bits, padded with zero words to a multiple of
 *   4: 8 nb + 4 ceil(nb / 4) words, 1.125 bytes a weight (ggml's f16 scales: 1.0625). Quants apart from
 *   scales let a kernel read 16 of them as one vec4<u32>.
 * - `q4`: in the spirit of ggml's Q4_0, blocks of Q4_BLOCK (32) elements along K, each an f32 scale
 *   d = max |x| / 7 over the block (0 for an all-zero block) and 32 signed 4-bit q in [-7, 7] with
 *   value d * q, q = round(x / d), ties away from zero; q = 0 past K. Each q is stored as the nibble
 *   q + 8 (so 8 is zero and 0 is unused). A row of nb = ceil(K / 32) blocks holds first the quants,
 *   4 words a block, element k in bits 4(k % 8) to 4(k % 8) + 3 of word k / 8, then the nb scales as
 *   f32 bits, padded with zero words to a multiple of 4: 4 nb + 4 ceil(nb / 4) words, 0.625 bytes a
 *   weight (ggml's f16 scales: 0.5625). A block's quants are one vec4<u32>.
 * Only linear weights and an untied lm_head take `f16`, `q8` or `q4`; the embedding (read by row
 * copies), the norms and so a tied lm_head stay `f32`.
 */
export const WEIGHT_FORMATS = ["f32", "f16", "q8", "q4"] as const;
export type WeightFormat = (typeof WEIGHT_FORMATS)[number];
/** Elements per q8 block: one scale each. */
export const Q8_BLOCK = 32;
/** Elements per q4 block: one scale each, and the 4 words of its quants one 16-byte load. */
export const Q4_BLOCK = 32;

/** The u32 words one row of K elements takes in `format` (f32 elements count as words). */
export function storageRowWords(format: WeightFormat, K: number): number {
  switch (format) {
    case "f32":
      return K;
    case "f16":
      return 4 * Math.ceil(K / 8);
    case "q8": {
      const blocks = Math.ceil(K / Q8_BLOCK);
      return 8 * blocks + 4 * Math.ceil(blocks / 4);
    }
    case "q4": {
      const blocks = Math.ceil(K / Q4_BLOCK);
      return 4 * blocks + 4 * Math.ceil(blocks / 4);
    }
  }
}

/** One tensor of the checkpoint as the runtime holds it. Linear weights are [out, in], as in HF. */
export interface PlanTensor<M extends string = string> {
  readonly name: string;
  readonly shape: readonly number[];
  /** Storage on the GPU (WEIGHT_FORMATS); the checkpoint's F32/F16/BF16 are converted on upload. */
  readonly gpuDtype: WeightFormat;
  readonly role: TensorRole;
  readonly layer?: number;
  readonly module?: M;
  /**
   * Whether the runtime may split it into row blocks when it exceeds one storage binding: the tensors it
   * reads by rows (the embedding) or as a linear weight, whose blocks each compute their own outputs.
   */
  readonly splittable: boolean;
}

export const ACTIVATION_NAMES = ["x", "h", "xn", "q", "k", "v", "attn", "gate", "up", "act", "gateBase", "upBase", "ffn", "out", "outNorm", "logits"] as const;
/** The activation buffers of one forward step, each [rows, width] f32. */
export type ActivationName = (typeof ACTIVATION_NAMES)[number];

export interface PlanActivation {
  readonly name: ActivationName;
  readonly width: number;
}

/**
 * One step of the forward pass. Weight names in layer ops are templates with `{layer}`. Kernels are
 * referenced by key into Plan.kernels; a linear names two, the engine picks by the rows of the step
 * (matvec up to `matvecMaxRows`, matmul above), so prefill and decode share one op list. `M` names a
 * linear's module (the family's expert modules, or `lm_head`).
 */
export type PlanOp<M extends string = string> =
  | {
      readonly op: "rmsnorm";
      readonly kernel: string;
      readonly input: ActivationName;
      readonly weight: string;
      readonly output: ActivationName;
    }
  | {
      readonly op: "linear";
      readonly module: M | "lm_head";
      readonly matmul: string;
      readonly matvec: string;
      readonly input: ActivationName;
      readonly weight: string;
      readonly output: ActivationName;
      /** Added to the product (the residual stream); must differ from output. */
      readonly residual?: ActivationName;
      /** The module's LoRA, when the plan serves adapters: its expand runs after the product, reading what a `lora_shrink` op before it wrote. */
      readonly lora?: PlanLora;
      /**
       * When the weight exceeds the plan's storage binding: its kernels for each row-block height. Each
       * block writes its outputs (and adds its residual) in place in the full-width output; LoRA then
       * runs once on the whole output.
       */
      readonly blocks?: readonly PlanBlockKernels[];
    }
  | { readonly op: "rope"; readonly kernel: string; readonly q: ActivationName; readonly k: ActivationName }
  | { readonly op: "kv_write"; readonly kernel: string; readonly k: ActivationName; readonly v: ActivationName }
  | { readonly op: "attention"; readonly kernel: string; readonly q: ActivationName; readonly output: ActivationName }
  | {
      /** The gated MLP activation: silu(gate) * up, or with gemma's tanh GELU. */
      readonly op: "swiglu" | "geglu";
      readonly kernel: string;
      readonly gate: ActivationName;
      readonly up: ActivationName;
      readonly output: ActivationName;
    }
  /** A linear module's bias (`weight`: its tensor template) added to `output` in place. */
  | { readonly op: "bias"; readonly kernel: string; readonly weight: string; readonly output: ActivationName }
  /** `to` = `from` (same width): a per_ffn pass starts from the base products computed once. */
  | { readonly op: "copy"; readonly from: ActivationName; readonly to: ActivationName }
  /**
   * The LoRA shrink t = A x of a group of modules that read `input` (q/k/v, gate/up; one module where
   * nothing is shared, and for the MoE variants), one dispatch for all: module i writes region i of the
   * engine's t, its gate column `gateColumn` + i (a group's modules are consecutive in gate order). It
   * runs when any of its modules has a row that needs its LoRA; the linear and `lora` ops of those
   * modules after it read their region (`lora.t`). `pass`: per_ffn's feed-forward pass, whose expert
   * choice the shrink keeps.
   */
  | { readonly op: "lora_shrink"; readonly kernel: string; readonly input: ActivationName; readonly modules: readonly M[]; readonly gateColumn: number; readonly pass?: number }
  /** A module's LoRA update alone (its expand), added to `output` (its base product is already there). */
  | { readonly op: "lora"; readonly module: M; readonly output: ActivationName; readonly lora: PlanLora }
  /** per_ffn: each row's expert choices for the layer's feed-forward passes, routed on `input`. */
  | { readonly op: "moe_route"; readonly kernel: string; readonly input: ActivationName }
  /** per_ffn: `output` = (pass 0 ? `residual` : `output`) + the row's pass weight * `input`. */
  | { readonly op: "moe_mix"; readonly kernel: string; readonly pass: number; readonly input: ActivationName; readonly residual: ActivationName; readonly output: ActivationName }
  | { readonly op: "sample"; readonly kernel: string; readonly logits: ActivationName };

/**
 * Where a linear module's LoRA update comes from: the expand kernel's key, the column of the step's
 * gates buffer ([rows, layers * modules]) this module reads in layer 0 (add layer * modules), and the
 * region of the engine's t the `lora_shrink` op before it wrote (the module's index in that op's group).
 */
export interface PlanLora {
  readonly expand: string;
  readonly gateColumn: number;
  readonly t: number;
  /**
   * The module's matvec with the LoRA epilogue (a whole weight only): a step of up to matvecMaxRows rows
   * that needs this LoRA runs this, after the shrink, in place of the plain matvec and the expand.
   */
  readonly matvec?: string;
}

/** A linear kernel pair specialised for a row block of `rows` output features of a split weight. */
export interface PlanBlockKernels {
  readonly rows: number;
  readonly matmul: string;
  readonly matvec: string;
}

/**
 * The router of one routed layer, run on the layer's input before its first op: kernel keys into
 * Plan.kernels. Prompt routing pools each prompt (`score` first for attention pooling) and gates the
 * pooled row; token routing gates every row and has neither `score` nor `pool`.
 */
export interface PlanRouterLayer<M extends string = string> {
  readonly layer: number;
  /** The layer's enabled modules, in gate order. */
  readonly experts: readonly M[];
  readonly score?: string;
  readonly pool?: string;
  readonly gate: string;
}

export const KERNEL_FAMILIES = [
  "rmsnorm",
  "matmul",
  "matvec",
  "rope",
  "kv_write",
  "attention",
  "swiglu",
  "geglu",
  "scale",
  "bias",
  "sampling",
  "lora_shrink",
  "lora_expand",
  "router_score",
  "router_pool",
  "router_gate",
  "beam_topk",
  "logit_adjust",
  "chosen_logprob",
  "moe_route",
  "moe_mix",
] as const;
export type KernelFamily = (typeof KERNEL_FAMILIES)[number];

/** A kernel of the plan's set: the generator family and the constants it was made with (opaque here). */
export interface PlanKernel {
  readonly key: string;
  readonly family: KernelFamily;
  readonly constants: object;
}

/**
 * The binding names of each kernel family ("params", the uniform, last; `?`: not every variant has it). The engine
 * dispatches a family's kernels with exactly these names, so a kernel file whose interface differs
 * is refused at load rather than failing mid-step.
 */
export const FAMILY_BINDINGS = {
  rmsnorm: ["x", "weight", "out", "params"],
  matmul: ["x", "w", "residual?", "y", "params"],
  matvec: ["x", "w", "residual?", "t?", "b?", "dora?", "y", "params"],
  rope: ["q", "k", "positions", "lengths?", "params"],
  kv_write: ["k", "v", "kCache", "vCache", "rowSlot", "positions", "params"],
  attention: ["q", "kCache", "vCache", "rowSlot", "positions", "out", "params"],
  swiglu: ["gate", "up", "out", "params"],
  geglu: ["gate", "up", "out", "params"],
  scale: ["x", "params"],
  bias: ["bias", "y", "params"],
  sampling: ["logits", "settings", "tokens", "params"],
  lora_shrink: ["x", "a", "slots", "rowAdapter", "gates", "router?", "routed?", "choice?", "t", "params"],
  lora_expand: ["t", "b", "slots", "rowAdapter", "gates", "dora", "residual?", "y", "params"],
  router_score: ["h", "pooler", "scores", "params"],
  router_pool: ["h", "ranges", "scores?", "pooled", "params"],
  router_gate: ["x", "items", "weight", "rational?", "table", "params"],
  beam_topk: ["logits", "candidates", "params"],
  logit_adjust: ["logits", "info", "entries", "work", "params"],
  chosen_logprob: ["logits", "tokens", "out", "params"],
  moe_route: ["x", "weight", "routed", "rowAdapter", "choice", "params"],
  moe_mix: ["x", "residual", "choice", "y", "params"],
} as const satisfies Record<KernelFamily, readonly string[]>;

/** A family's binding names, `?` (optional bindings) stripped. */
export type FamilyBinding<F extends KernelFamily> = (typeof FAMILY_BINDINGS)[F][number] extends infer N
  ? N extends `${infer Name}?`
    ? Name
    : N & string
  : never;

/** The plan: everything the runtime needs to run a base model, as plain data (see compiler/plan.ts). */
export interface Plan<M extends string = string> {
  readonly base: string;
  readonly family: string;
  readonly dims: PlanDims;
  readonly tensors: readonly PlanTensor<M>[];
  readonly activations: readonly PlanActivation[];
  /**
   * Before the layers the engine writes the embedding rows of the step's tokens into `input`; the
   * layer ops run once per layer and leave the residual stream in `input` again; the engine then
   * gathers the rows that need logits into `headInput`, and the head ops run on those rows only.
   */
  readonly input: ActivationName;
  readonly embedding: string;
  /** A `scale` kernel the engine runs on `input` after writing the embedding rows (gemma's sqrt(hidden)). */
  readonly embeddingScale?: string;
  readonly layer: readonly PlanOp<M>[];
  readonly headInput: ActivationName;
  readonly head: readonly PlanOp<M>[];
  /** Steps of up to this many rows use the matvec kernels (decode batches), larger ones matmul (prefill). */
  readonly matvecMaxRows: number;
  /** Largest LoRA rank an adapter slot holds; 0 when the plan serves no adapters. */
  readonly maxLoraRank: number;
  /**
   * The storage binding size the plan assumes: splittable tensors larger than this are uploaded in row
   * blocks of at most this many bytes, with the kernels of their linear op's `blocks`.
   */
  readonly maxBindingBytes: number;
  /** The routers of the adapter the plan was made for (empty for plain LoRA or the base alone). */
  readonly routers: readonly PlanRouterLayer<M>[];
  /** The router configuration `routers` was made for (absent when there are none). */
  readonly router?: ManifestRouter;
  /** The per-token Mixture-of-LoRA routing the plan's MoE kernels were made for (absent for others). */
  readonly moe?: ManifestMoe;
  /** Beam search's log-softmax top-k over the logits (key into kernels). */
  readonly beamTopK: string;
  /**
   * The server's logit processing before sampling (penalties, logit_bias, min_p) and the sampled token's
   * log-probability (keys into kernels). Absent in plans made before they existed: those serve neither.
   */
  readonly logitAdjust?: string;
  readonly chosenLogprob?: string;
  readonly kernels: readonly PlanKernel[];
}

// ---- The manifest ---------------------------------------------------------------------------------

/** A base model's hyper-parameters, as the manifest records them (compiler/model.ts BaseModel, less its span). */
export interface ManifestBase {
  readonly name: string;
  readonly family: string;
  readonly hiddenSize: number;
  readonly layers: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly intermediateSize: number;
  readonly vocabSize: number;
  readonly ropeTheta: number;
  readonly ropeScaling?: RopeScaling;
  readonly rmsNormEps: number;
  readonly maxPositions: number;
  readonly tieEmbeddings: boolean;
  /** The spec's `weights` key, when it has one (the plan's tensors say how each is stored). */
  readonly weights?: WeightFormat;
}

export interface ManifestExpert {
  readonly layer: number;
  readonly module: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly rank: number;
  readonly alpha: number;
  readonly dropout: number;
  readonly rslora: boolean;
  /** DoRA (present only when true). */
  readonly dora?: true;
  readonly scaling: number;
}

export type ManifestSelection =
  | { readonly rule: "top_k"; readonly k: number; readonly renormalize: boolean }
  | { readonly rule: "threshold"; readonly threshold: number; readonly renormalize: boolean }
  | { readonly rule: "dense" };

export interface ManifestRouter {
  readonly placement: "per_layer";
  readonly input: "layer_input";
  readonly pooling: "last" | "mean" | "max" | "attention";
  readonly selection: ManifestSelection;
  readonly activation: "none" | "gelu" | "relu" | "rational";
  readonly rational?: { readonly numerator: number; readonly denominator: number };
  readonly when: "prompt" | "token";
  readonly noise: boolean;
  readonly balance: number;
}

/** A per-token Mixture-of-LoRA baseline's routing (compiler/model.ts MoeRouting). */
export interface ManifestMoe {
  readonly placement: "per_module" | "per_ffn";
  readonly experts: number;
  readonly selection: Extract<ManifestSelection, { rule: "top_k" | "dense" }>;
  readonly balance: number;
}

export interface ManifestAdapter {
  readonly name: string;
  readonly extends?: string;
  readonly layers: readonly number[];
  readonly experts: readonly ManifestExpert[];
  /** Absent for plain LoRA (`router off`) and for a per-token baseline. */
  readonly router?: ManifestRouter;
  readonly moe?: ManifestMoe;
}

/** A kernel of the package: its key in the plan, its WGSL file, and the interface it is run with. */
export interface ManifestKernel extends KernelInterface {
  /** Path of its WGSL file inside the package. */
  readonly file: string;
}

export interface Manifest<M extends string = string> {
  readonly format: number;
  readonly compiler: { readonly name: "milora"; readonly version: string };
  readonly package: { readonly name: string; readonly version: string };
  /** The spec file (relative to itself: its base name) and the SHA-256 of every source it read. */
  readonly spec: { readonly file: string; readonly sha256: string };
  readonly base: ManifestBase;
  readonly adapter: ManifestAdapter;
  readonly plan: Plan<M>;
  /** The adapter's parameter budget (compiler/budget.ts), for the package's README and API. */
  readonly budget: object;
  readonly kernels: readonly ManifestKernel[];
}

/** A package that cannot be used: missing or unreadable files, or a manifest that is not one this runtime runs. */
export class PackageError extends MiloraError {
  override name = "PackageError";
  readonly kind = "package";
}

// ---- Validation -----------------------------------------------------------------------------------

/** One field's check: returns a problem in words, or undefined. `at` is the field's path. */
type Check = (v: unknown, at: string) => void;

class FieldError extends Error {}

const fail = (at: string, what: string, v: unknown): never => {
  const got = v === undefined ? "it is missing" : `got ${JSON.stringify(v)?.slice(0, 60) ?? String(v)}`;
  throw new FieldError(`field ${at} must be ${what} (${got})`);
};
const str: Check = (v, at) => void (typeof v === "string" || fail(at, "a string", v));
const num: Check = (v, at) => void ((typeof v === "number" && Number.isFinite(v)) || fail(at, "a number", v));
const int: Check = (v, at) => void ((typeof v === "number" && Number.isInteger(v) && v >= 0) || fail(at, "a whole number >= 0", v));
const bool: Check = (v, at) => void (typeof v === "boolean" || fail(at, "true or false", v));
const oneOf =
  (values: readonly unknown[]): Check =>
  (v, at) =>
    void (values.includes(v) || fail(at, `one of ${values.map((x) => JSON.stringify(x)).join(", ")}`, v));
const arr =
  (item: Check): Check =>
  (v, at) => {
    if (!Array.isArray(v)) fail(at, "an array", v);
    (v as unknown[]).forEach((x, i) => item(x, `${at}[${i}]`));
  };
const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
const anyObject: Check = (v, at) => void (isObject(v) || fail(at, "an object", v));
/** An object with these fields; a key ending in `?` may be absent. */
const obj =
  (fields: Readonly<Record<string, Check>>): Check =>
  (v, at) => {
    if (!isObject(v)) fail(at, "an object", v);
    const o = v as Record<string, unknown>;
    for (const [key, check] of Object.entries(fields)) {
      const optional = key.endsWith("?");
      const name = optional ? key.slice(0, -1) : key;
      if (optional && o[name] === undefined) continue;
      check(o[name], at === "" ? name : `${at}.${name}`);
    }
  };
/** A union discriminated by `tag`. */
const tagged =
  (tag: string, cases: Readonly<Record<string, Readonly<Record<string, Check>>>>): Check =>
  (v, at) => {
    if (!isObject(v)) fail(at, "an object", v);
    const which = (v as Record<string, unknown>)[tag];
    const fields = typeof which === "string" ? cases[which] : undefined;
    if (fields === undefined) fail(`${at}.${tag}`, `one of ${Object.keys(cases).join(", ")}`, which);
    obj({ [tag]: str, ...fields })(v, at);
  };

const act = oneOf(ACTIVATION_NAMES);
/** A scaling factor: a finite number >= 1 (Hugging Face's rule for every rope_scaling factor). */
const factor: Check = (v, at) => void ((typeof v === "number" && Number.isFinite(v) && v >= 1) || fail(at, "a number >= 1", v));
const positiveInt: Check = (v, at) => void ((typeof v === "number" && Number.isInteger(v) && v >= 1) || fail(at, "a whole number >= 1", v));
const ropeScaling: Check = (v, at) => {
  tagged("type", {
    linear: { factor },
    dynamic: { factor, originalMaxPositions: positiveInt },
    llama3: { factor, lowFreqFactor: num, highFreqFactor: num, originalMaxPositions: positiveInt },
  })(v, at);
  const s = v as { type: string; lowFreqFactor: number; highFreqFactor: number };
  if (s.type === "llama3" && !(s.highFreqFactor > s.lowFreqFactor)) fail(`${at}.highFreqFactor`, `above lowFreqFactor ${s.lowFreqFactor}`, s.highFreqFactor);
};
const groupCount: Check = (v, at) => (typeof v === "number" ? int(v, at) : obj({ param: str, "times?": int, "per?": int })(v, at));
const dispatchRule: Check = (v, at) => {
  if (isObject(v) && "groups" in v) {
    obj({ groups: arr(groupCount), "emptyWhenZero?": str })(v, at);
    if ((v.groups as unknown[]).length !== 3) fail(`${at}.groups`, "three counts", v.groups);
  } else obj({ grid: groupCount, "emptyWhenZero?": str })(v, at);
};
const binding: Check = obj({ name: str, access: oneOf(["read", "read_write", "uniform"]) });
const param: Check = obj({ name: str, type: oneOf(["u32", "i32", "f32"]) });

const planOp = tagged("op", {
  rmsnorm: { kernel: str, input: act, weight: str, output: act },
  linear: {
    module: str,
    matmul: str,
    matvec: str,
    input: act,
    weight: str,
    output: act,
    "residual?": act,
    "lora?": obj({ expand: str, gateColumn: int, t: int, "matvec?": str }),
    "blocks?": arr(obj({ rows: int, matmul: str, matvec: str })),
  },
  rope: { kernel: str, q: act, k: act },
  kv_write: { kernel: str, k: act, v: act },
  attention: { kernel: str, q: act, output: act },
  swiglu: { kernel: str, gate: act, up: act, output: act },
  geglu: { kernel: str, gate: act, up: act, output: act },
  bias: { kernel: str, weight: str, output: act },
  sample: { kernel: str, logits: act },
  copy: { from: act, to: act },
  lora_shrink: { kernel: str, input: act, modules: arr(str), gateColumn: int, "pass?": int },
  lora: { module: str, output: act, lora: obj({ expand: str, gateColumn: int, t: int }) },
  moe_route: { kernel: str, input: act },
  moe_mix: { kernel: str, pass: int, input: act, residual: act, output: act },
});

/** A router configuration: the adapter's, and the one the plan's router kernels were made for. */
const router: Check = obj({
  placement: oneOf(["per_layer"]),
  input: oneOf(["layer_input"]),
  pooling: oneOf(["last", "mean", "max", "attention"]),
  selection: tagged("rule", { top_k: { k: int, renormalize: bool }, threshold: { threshold: num, renormalize: bool }, dense: {} }),
  activation: oneOf(["none", "gelu", "relu", "rational"]),
  "rational?": obj({ numerator: int, denominator: int }),
  when: oneOf(["prompt", "token"]),
  noise: bool,
  balance: num,
});

const moe: Check = obj({
  placement: oneOf(["per_module", "per_ffn"]),
  experts: int,
  selection: tagged("rule", { top_k: { k: int, renormalize: bool }, dense: {} }),
  balance: num,
});

const plan: Check = obj({
  base: str,
  family: str,
  dims: obj({
    hidden: int,
    layers: int,
    heads: int,
    kvHeads: int,
    headDim: int,
    qWidth: int,
    kvWidth: int,
    intermediate: int,
    vocab: int,
    ropeTheta: num,
    "ropeScaling?": ropeScaling,
    rmsNormEps: num,
    ctx: int,
    tiedEmbeddings: bool,
  }),
  tensors: arr(
    obj({ name: str, shape: arr(int), gpuDtype: oneOf(WEIGHT_FORMATS), role: oneOf(TENSOR_ROLES), "layer?": int, "module?": str, splittable: bool }),
  ),
  activations: arr(obj({ name: act, width: int })),
  input: act,
  embedding: str,
  "embeddingScale?": str,
  layer: arr(planOp),
  headInput: act,
  head: arr(planOp),
  matvecMaxRows: int,
  maxLoraRank: int,
  maxBindingBytes: int,
  routers: arr(obj({ layer: int, experts: arr(str), "score?": str, "pool?": str, gate: str })),
  "router?": router,
  "moe?": moe,
  beamTopK: str,
  "logitAdjust?": str,
  "chosenLogprob?": str,
  kernels: arr(obj({ key: str, family: oneOf(KERNEL_FAMILIES), constants: anyObject })),
});

const manifest: Check = obj({
  format: int,
  compiler: obj({ name: oneOf(["milora"]), version: str }),
  package: obj({ name: str, version: str }),
  spec: obj({ file: str, sha256: str }),
  base: obj({
    name: str,
    family: str,
    hiddenSize: int,
    layers: int,
    heads: int,
    kvHeads: int,
    headDim: int,
    intermediateSize: int,
    vocabSize: int,
    ropeTheta: num,
    "ropeScaling?": ropeScaling,
    rmsNormEps: num,
    maxPositions: int,
    tieEmbeddings: bool,
    "weights?": oneOf(WEIGHT_FORMATS),
  }),
  adapter: obj({
    name: str,
    "extends?": str,
    layers: arr(int),
    experts: arr(obj({ layer: int, module: str, inFeatures: int, outFeatures: int, rank: int, alpha: num, dropout: num, rslora: bool, "dora?": oneOf([true]), scaling: num })),
    "router?": router,
    "moe?": moe,
  }),
  plan,
  budget: anyObject,
  kernels: arr(obj({ key: str, file: str, name: str, entryPoint: str, bindings: arr(binding), params: arr(param), dispatch: dispatchRule })),
});

/**
 * Checks that `json` (manifest.json as parsed, read from `path`) is a manifest this runtime runs: the
 * format and version first (a manifest of another version is refused as such, not field by field),
 * then every field, then that the kernels and the plan agree. Throws PackageError naming `path`.
 */
export function validateManifest(json: unknown, path: string): Manifest {
  const m = isObject(json) ? json : undefined;
  const version = isObject(m?.compiler) ? m.compiler.version : undefined;
  if (typeof version !== "string" || typeof m?.format !== "number") {
    throw new PackageError(`${path}: not a milora manifest (no format or compiler version)`);
  }
  if (!compatibleVersions(version, COMPILER_VERSION) || m.format !== MANIFEST_FORMAT) {
    throw new PackageError(
      `${path} was written by milora ${version} (manifest format ${m.format}); this runtime is milora ${COMPILER_VERSION} ` +
        `(format ${MANIFEST_FORMAT}) and cannot run it: recompile the spec with this milora, or install a runtime compatible with ${version}`,
    );
  }
  try {
    manifest(m, "");
  } catch (e) {
    if (e instanceof FieldError) throw new PackageError(`${path}: ${e.message}`);
    throw e;
  }
  const checked = m as unknown as Manifest;
  const planned = new Map(checked.plan.kernels.map((k) => [k.key, k]));
  for (const [i, k] of checked.kernels.entries()) {
    const p = planned.get(k.key);
    if (p === undefined) throw new PackageError(`${path}: kernel ${k.key} is not in the plan`);
    const problem = interfaceProblem(p.family, k);
    if (problem !== undefined) throw new PackageError(`${path}: field kernels[${i}] (${k.key}): ${problem}`);
  }
  const filed = new Set(checked.kernels.map((k) => k.key));
  const unfiled = checked.plan.kernels.filter((k) => !filed.has(k.key)).map((k) => k.key);
  if (unfiled.length > 0) throw new PackageError(`${path}: no kernel file is listed for ${unfiled.join(", ")}`);
  const referenced = planKernelKeys(checked.plan).filter((key) => !planned.has(key));
  if (referenced.length > 0) throw new PackageError(`${path}: the plan's ops name kernels its kernel set lacks: ${[...new Set(referenced)].join(", ")}`);
  const lora = loraPlanProblem(checked.plan);
  if (lora !== undefined) throw new PackageError(`${path}: ${lora}`);
  return checked;
}

/**
 * The groups of modules whose LoRA shrink is one dispatch, as the plan's `lora_shrink` ops name them:
 * each module in exactly one group (modules no op names, groups of one), in `modules` order by the
 * group's first module. The adapter store lays a group's A and slots out module-major by it. Throws
 * Error when two ops group a module differently (validateManifest refuses such a plan first).
 */
export function loraGroups<M extends string>(plan: Plan<M>, modules: readonly M[]): readonly (readonly M[])[] {
  const groupOf = new Map<M, readonly M[]>();
  for (const op of plan.layer) {
    if (op.op !== "lora_shrink") continue;
    for (const m of op.modules) {
      const known = groupOf.get(m);
      if (known !== undefined && known.join() !== op.modules.join()) throw new Error(`the plan's LoRA shrinks group ${m} as ${known.join("/")} and as ${op.modules.join("/")}`);
      groupOf.set(m, op.modules);
    }
  }
  const groups: (readonly M[])[] = [];
  for (const m of modules) {
    const group = groupOf.get(m) ?? [m];
    if (group[0] === m) groups.push(group);
  }
  return groups;
}

/**
 * Why the plan's LoRA ops cannot run as the engine runs them, or undefined: every `lora_shrink` op's
 * kernel is a lora_shrink for as many modules as it names, no module twice; every LoRA of a linear or
 * `lora` op reads the region that the last shrink before it in the layer wrote for its module (same
 * gate column; a linear's the same input); no module is grouped two ways.
 */
export function loraPlanProblem(plan: Plan): string | undefined {
  const kernels = new Map(plan.kernels.map((k) => [k.key, k]));
  const last = new Map<string, Extract<PlanOp, { op: "lora_shrink" }>>();
  for (const [i, op] of plan.layer.entries()) {
    const at = `plan.layer[${i}]`;
    if (op.op === "lora_shrink") {
      const k = kernels.get(op.kernel);
      const count = ((k?.constants as { modules?: unknown } | undefined)?.modules ?? 1) as unknown;
      if (k?.family !== "lora_shrink" || count !== op.modules.length || new Set(op.modules).size !== op.modules.length || op.modules.length === 0)
        return `${at}: a lora_shrink op names ${op.modules.length} distinct module(s) and a lora_shrink kernel made for as many, got ${op.modules.join(", ") || "none"} and ${op.kernel}`;
      for (const m of op.modules) last.set(m, op);
    } else if ((op.op === "linear" || op.op === "lora") && op.lora) {
      const shrink = last.get(op.module);
      const input = op.op === "linear" ? op.input : shrink?.input;
      if (shrink === undefined || shrink.modules[op.lora.t] !== op.module || shrink.gateColumn + op.lora.t !== op.lora.gateColumn || shrink.input !== input)
        return `${at}: ${op.module}'s LoRA reads region ${op.lora.t} of t, but no lora_shrink op before it in the layer wrote that region for ${op.module} from its input with gate column ${op.lora.gateColumn}`;
    }
  }
  try {
    loraGroups(plan, [...new Set(plan.layer.flatMap((op) => (op.op === "lora_shrink" ? op.modules : [])))]);
  } catch (e) {
    return (e as Error).message;
  }
  return undefined;
}

/** Why `k` cannot serve as a kernel of `family` (its binding names or their order differ), or undefined. */
export function interfaceProblem(family: KernelFamily, k: Pick<KernelInterface, "bindings" | "params">): string | undefined {
  const expected: readonly string[] = FAMILY_BINDINGS[family];
  const names = k.bindings.map((b) => b.name);
  const required = expected.filter((n) => !n.endsWith("?"));
  const allowed = new Set(expected.map((n) => n.replace(/\?$/, "")));
  const missing = required.filter((n) => !names.includes(n) && !(n === "params" && k.params.length === 0));
  const unknown = names.filter((n) => !allowed.has(n));
  if (missing.length === 0 && unknown.length === 0) return undefined;
  return `a ${family} kernel binds ${expected.join(", ")}; this one binds ${names.join(", ") || "nothing"}`;
}

/** Every kernel key the plan's ops, routers and beam search name. */
export function planKernelKeys(plan: Plan): string[] {
  const ops = [...plan.layer, ...plan.head].flatMap((op) =>
    op.op === "linear"
      ? [op.matmul, op.matvec, ...(op.lora ? [op.lora.expand, ...(op.lora.matvec ? [op.lora.matvec] : [])] : []), ...(op.blocks ?? []).flatMap((b) => [b.matmul, b.matvec])]
      : op.op === "lora"
        ? [op.lora.expand]
        : op.op === "copy"
          ? []
          : [op.kernel],
  );
  const routers = plan.routers.flatMap((r) => [r.score, r.pool, r.gate].filter((k): k is string => k !== undefined));
  return [...ops, ...routers, plan.beamTopK, ...[plan.logitAdjust, plan.chosenLogprob, plan.embeddingScale].filter((k): k is string => k !== undefined)];
}

/** Rows per block so that one block of a tensor stored as `format` fits `maxBindingBytes` (the whole tensor when it fits). */
export function rowsPerBlock(shape: readonly number[], maxBindingBytes: number, format: WeightFormat): number {
  const rows = shape[0] ?? 1;
  const rowBytes = storageRowWords(format, shape.slice(1).reduce((a, b) => a * b, 1)) * 4;
  return Math.min(rows, Math.max(1, Math.floor(maxBindingBytes / rowBytes)));
}

/** A layer op's weight name for one layer. */
export function layerTensor(template: string, layer: number): string {
  return template.replace("{layer}", String(layer));
}

/** A kernel file split into its header (comment lines ended by one blank line) and the WGSL after it. */
export function splitKernelFile(text: string): { header: string; wgsl: string } {
  const end = text.indexOf("\n\n");
  if (!text.startsWith("//") || end < 0) return { header: "", wgsl: text };
  return { header: text.slice(0, end + 1), wgsl: text.slice(end + 2) };
}

export type { DispatchRule, GroupCount, KernelBinding, KernelInterface, KernelParam };
