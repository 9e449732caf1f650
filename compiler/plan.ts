// The plan: everything the runtime needs to run a base model, as plain data. Concrete dimensions, the
// tensor table (what the checkpoint must hold and how it sits on the GPU), the op sequence of one
// Transformer layer and of the output head, and the kernel set those ops dispatch, each kernel named
// by its family and the constants it is specialised by: the routers' kernels of the adapter it serves and
// the row-block variants of weights too big for one storage binding included, so the runtime generates
// none of them. The plan holds no GPU objects and no functions,
// so it serialises as JSON (manifest.json); kernelSources() turns its kernel set into WGSL.
import { isDeepStrictEqual } from "node:util";
import { attentionKernel, type AttentionConstants } from "./kernels/attention.ts";
import { biasKernel, gegluKernel, scaleKernel, swigluKernel } from "./kernels/elementwise.ts";
import type { KernelSource } from "./kernels/kernel.ts";
import { kvWriteKernel, type KvWriteConstants } from "./kernels/kv-write.ts";
import { loraExpandKernel, loraShrinkKernel, type LoraExpandConstants, type LoraShrinkConstants } from "./kernels/lora.ts";
import { matmulKernel, type MatmulConstants } from "./kernels/matmul.ts";
import { matvecKernel, type MatvecConstants } from "./kernels/matvec.ts";
import { rmsNormKernel, type RmsNormConstants } from "./kernels/rmsnorm.ts";
import { ropeConstants, ropeKernel, type RopeConstants } from "./kernels/rope.ts";
import { positionLimit } from "./rope-scaling.ts";
import {
  routerGateKernel,
  routerPoolKernel,
  routerScoreKernel,
  type RouterGateConstants,
  type RouterPoolConstants,
  type RouterScoreConstants,
} from "./kernels/router.ts";
import { samplingKernel } from "./kernels/sampling.ts";
import { moeMixKernel, moeRouteKernel, type MoeSelection } from "./kernels/moe.ts";
import { beamTopKKernel } from "./kernels/beam-topk.ts";
import { chosenLogprobKernel, logitAdjustKernel } from "./kernels/logit-adjust.ts";
import { layerTensor, rowsPerBlock } from "../runtime/package/format.ts";
import type {
  ActivationName,
  Plan as FormatPlan,
  PlanDims,
  PlanLora,
  PlanOp as FormatPlanOp,
  PlanRouterLayer as FormatPlanRouterLayer,
  PlanTensor as FormatPlanTensor,
  WeightFormat,
} from "../runtime/package/format.ts";
import { checkpointTensors, familyNamed, layerTemplate, widthsOf } from "./families.ts";
import { EXPERT_MODULES, storedRank, type Adapter, type BaseModel, type ExpertModule, type MoeRouting, type RouterConfig } from "./model.ts";
import { MiloraError } from "../runtime/errors.ts";
import { MAX_STACKED_RANK } from "./limits.ts";

/** A base model the planner cannot lower, with the reason in words. */
export class PlanError extends MiloraError {
  override name = "PlanError";
  readonly kind = "unsupported";
}

export { layerTensor, rowsPerBlock } from "../runtime/package/format.ts";
export type {
  ActivationName,
  PlanActivation,
  PlanBlockKernels,
  PlanDims,
  PlanLora,
  TensorRole,
} from "../runtime/package/format.ts";
/** A linear module's place: one of the LoRA-capable experts, or the output head. */
export type LinearModule = ExpertModule | "lm_head";
export type PlanTensor = FormatPlanTensor<ExpertModule>;
export type PlanOp = FormatPlanOp<ExpertModule>;
export type PlanRouterLayer = FormatPlanRouterLayer<ExpertModule>;

/** A kernel of the set: the generator family and the constants it is called with. */
export type PlannedKernel =
  | { readonly key: string; readonly family: "rmsnorm"; readonly constants: RmsNormConstants }
  | { readonly key: string; readonly family: "matmul"; readonly constants: MatmulConstants }
  | { readonly key: string; readonly family: "matvec"; readonly constants: MatvecConstants }
  | { readonly key: string; readonly family: "rope"; readonly constants: RopeConstants }
  | { readonly key: string; readonly family: "kv_write"; readonly constants: KvWriteConstants }
  | { readonly key: string; readonly family: "attention"; readonly constants: AttentionConstants }
  | { readonly key: string; readonly family: "swiglu" | "geglu"; readonly constants: Record<string, never> }
  | { readonly key: string; readonly family: "scale"; readonly constants: { readonly factor: number } }
  | { readonly key: string; readonly family: "bias"; readonly constants: { readonly width: number } }
  | { readonly key: string; readonly family: "sampling"; readonly constants: { readonly vocab: number } }
  | { readonly key: string; readonly family: "lora_shrink"; readonly constants: LoraShrinkConstants }
  | { readonly key: string; readonly family: "lora_expand"; readonly constants: LoraExpandConstants }
  | { readonly key: string; readonly family: "router_score"; readonly constants: RouterScoreConstants }
  | { readonly key: string; readonly family: "router_pool"; readonly constants: RouterPoolConstants }
  | { readonly key: string; readonly family: "router_gate"; readonly constants: RouterGateConstants }
  | { readonly key: string; readonly family: "beam_topk"; readonly constants: { readonly vocab: number } }
  | { readonly key: string; readonly family: "logit_adjust" | "chosen_logprob"; readonly constants: { readonly vocab: number } }
  | { readonly key: string; readonly family: "moe_route"; readonly constants: MoeSelection & { readonly inFeatures: number } }
  | { readonly key: string; readonly family: "moe_mix"; readonly constants: { readonly width: number; readonly topK: number } };

/** A kernel of the set before its key is known. */
export type KernelRequest = PlannedKernel extends infer K ? (K extends PlannedKernel ? Omit<K, "key"> : never) : never;

/** The plan as the planner makes it: the format's plan (runtime/package/format.ts), its kernels typed by family. */
export interface Plan extends FormatPlan<ExpertModule> {
  readonly kernels: readonly PlannedKernel[];
}

export interface PlanOptions {
  /** KV cache length per sequence (default: the base's max_positions). */
  readonly ctx?: number;
  /** Serve LoRA adapters up to this rank on every expert module (default: the adapter's largest, else 0). */
  readonly maxLoraRank?: number;
  /** The adapter spec served (on this base): its routed layers' router kernels join the kernel set. */
  readonly adapter?: Adapter;
  /** Storage binding size to assume (default DEFAULT_BINDING_BYTES); bigger splittable tensors are split. */
  readonly maxBindingBytes?: number;
  /**
   * How the linear weights and an untied lm_head are stored on the GPU (default: the base's `weights`,
   * else f32); the embedding and the norms stay f32 (runtime/package/format.ts WEIGHT_FORMATS).
   */
  readonly weights?: WeightFormat;
  /**
   * Steps of up to this many rows run the matvec kernels, larger ones the matmul (default
   * MATVEC_MAX_ROWS): the device's crossover, as `milora bench --calibrate` measures it.
   */
  readonly matvecMaxRows?: number;
  /**
   * One LoRA shrink for the modules that read the same input (q/k/v, gate/up), the default; false
   * gives every module a shrink of its own (the plan before grouping, which bench/lora-fusion.ts
   * measures against). The MoE variants always run groups of one.
   */
  readonly groupLoraShrinks?: boolean;
}

/**
 * 128 MiB: WebGPU's default maxStorageBufferBindingSize, which every device offers (llvmpipe offers no
 * more), so a plan split by it runs everywhere.
 */
export const DEFAULT_BINDING_BYTES = 128 * 1024 * 1024;

/**
 * Steps of up to this many rows run the matvec kernels, larger ones the 64-row matmul tile, unless the
 * plan is given a device's own crossover (PlanOptions.matvecMaxRows, from `milora bench --calibrate`).
 * Measured with bench/linear-rows.ts on llvmpipe at hidden 512 (docs/performance.md, "Decode batches"):
 * matvec costs 0.77x the matmul at 24 rows and 1.00-1.03x at 32, so the crossover is near 28.
 */
export const MATVEC_MAX_ROWS = 28;

/** Plans a LLaMA-family base model. Throws PlanError for what the kernels do not implement. */
export function planBase(base: BaseModel, options: PlanOptions = {}): Plan {
  const family = familyNamed(base.family);
  if (family === undefined) throw new PlanError(`base ${base.name}: family "${base.family}" has no planner`);
  const arch = family.architecture;
  // max_positions, or factor * max_positions with dynamic rope scaling
  const limit = positionLimit(base);
  const ctx = options.ctx ?? limit;
  const { adapter } = options;
  if (adapter !== undefined && adapter.base.name !== base.name)
    throw new PlanError(`adapter ${adapter.name} is on base ${adapter.base.name}, not ${base.name}`);
  const maxLoraRank = options.maxLoraRank ?? Math.max(0, ...(adapter?.experts ?? []).map((e) => storedRank(adapter!, e)));
  const maxBindingBytes = options.maxBindingBytes ?? DEFAULT_BINDING_BYTES;
  if (!Number.isInteger(maxBindingBytes) || maxBindingBytes < 4)
    throw new PlanError(`base ${base.name}: the storage binding size must be a whole number of bytes, at least 4, got ${maxBindingBytes}`);
  const matvecMaxRows = options.matvecMaxRows ?? MATVEC_MAX_ROWS;
  if (!Number.isInteger(matvecMaxRows) || matvecMaxRows < 1)
    throw new PlanError(`base ${base.name}: the matvec row limit must be a whole number of rows, at least 1, got ${matvecMaxRows}`);
  if (!Number.isInteger(maxLoraRank) || maxLoraRank < 0 || maxLoraRank > MAX_STACKED_RANK)
    throw new PlanError(`base ${base.name}: the largest LoRA rank must be an integer from 0 to ${MAX_STACKED_RANK}, got ${maxLoraRank}`);
  if (!Number.isInteger(ctx) || ctx < 1 || ctx > limit) {
    const what = limit === base.maxPositions ? `max_positions ${limit}` : `${limit} (dynamic rope scaling: factor x max_positions)`;
    throw new PlanError(`base ${base.name}: context ${ctx} must be an integer from 1 to ${what}`);
  }
  if (base.headDim % 2 !== 0)
    throw new PlanError(`base ${base.name}: rotary embedding needs an even head_dim, got ${base.headDim}`);
  const dims: PlanDims = {
    hidden: base.hiddenSize,
    layers: base.layers,
    heads: base.heads,
    kvHeads: base.kvHeads,
    headDim: base.headDim,
    qWidth: base.heads * base.headDim,
    kvWidth: base.kvHeads * base.headDim,
    intermediate: base.intermediateSize,
    vocab: base.vocabSize,
    ropeTheta: base.ropeTheta,
    ...(base.ropeScaling === undefined ? {} : { ropeScaling: base.ropeScaling }),
    rmsNormEps: base.rmsNormEps,
    ctx,
    tiedEmbeddings: base.tieEmbeddings,
  };

  const kernels = new Map<string, PlannedKernel>();
  const use = (request: KernelRequest): string => {
    const key = plannedKernelSource(request).key;
    if (!kernels.has(key)) kernels.set(key, { ...request, key } as PlannedKernel);
    return key;
  };
  const tensors = tensorTable(base, options.weights ?? base.weights ?? "f32");
  const linearWeight = (module: ExpertModule) => layerTemplate(arch, `${arch.modules[module].path}.weight`);
  const moe = adapter?.moe;
  const selection: MoeSelection | undefined = moe && moeSelection(moe);
  type LinearIo = { input: ActivationName; output: ActivationName; residual?: ActivationName };
  /** A linear's LoRA: off (no adapters, or a per_ffn base product computed once), or its region `t` of the shrink before it. */
  type LoraUse = "off" | { readonly t: number };
  const linearOf = (module: ExpertModule, io: LinearIo, loraUse: LoraUse) => {
    const m = arch.modules[module];
    const product = linear(module, widths[m.input], widths[m.output], io, linearWeight(module), loraUse);
    if (!m.bias) return [product];
    const bias = use({ family: "bias", constants: { width: widths[m.output] } });
    return [product, { op: "bias" as const, kernel: bias, weight: layerTemplate(arch, `${m.path}.bias`), output: io.output }];
  };
  // per_module's shrinks route each module with its own router: groups of one (per_ffn's attention groups)
  const groupShrinks = (options.groupLoraShrinks ?? true) && moe?.placement !== "per_module";
  /**
   * The LoRA shrink of `modules` (all reading `input`, consecutive in gate order): one dispatch writing
   * each module's region of the engine's t. `pass`: per_ffn's feed-forward pass whose expert it keeps.
   */
  const shrinkOp = (modules: readonly ExpertModule[], input: ActivationName, pass?: number): PlanOp => {
    const [first] = modules;
    const gateColumn = EXPERT_MODULES.indexOf(first!);
    modules.forEach((m, i) => {
      if (EXPERT_MODULES.indexOf(m) !== gateColumn + i || widths[arch.modules[m].input] !== widths[arch.modules[first!].input])
        throw new Error(`a LoRA shrink group's modules must read one input and be consecutive in gate order, got ${modules.join(", ")}`);
    });
    // per_module routes each module with its own router; per_ffn's passes keep one expert's ranks
    const routed =
      moe?.placement === "per_module"
        ? { moe: "route" as const, ...selection! }
        : pass !== undefined
          ? { moe: "pass" as const, experts: selection!.experts, topK: selection!.topK }
          : {};
    const constants = { inFeatures: widths[arch.modules[first!].input], maxRank: maxLoraRank, rowInfo: true, ...routed, ...(modules.length > 1 ? { modules: modules.length } : {}) };
    // (outFeatures, which the shrink does not read, is the first module's, as the expand's constants)
    const outFeatures = widths[arch.modules[first!].output];
    return { op: "lora_shrink", kernel: use({ family: "lora_shrink", constants: { outFeatures, ...constants } }), input, modules, gateColumn, ...(pass === undefined ? {} : { pass }) };
  };
  /**
   * Linears that all read one input, each with its LoRA: one shrink for the group first (or, not
   * grouping, one before each), then the products, module i's LoRA reading region i of t.
   */
  const adaptedLinears = (linears: readonly (readonly [ExpertModule, LinearIo])[], pass?: number): PlanOp[] => {
    if (maxLoraRank === 0) return linears.flatMap(([m, io]) => linearOf(m, io, "off"));
    const groups = groupShrinks ? [linears] : linears.map((l) => [l]);
    return groups.flatMap((group) => [shrinkOp(group.map(([m]) => m), group[0]![1].input, pass), ...group.flatMap(([m, io], t) => linearOf(m, io, { t }))]);
  };
  const linear = (
    module: LinearModule,
    K: number,
    N: number,
    io: LinearIo,
    weight: string,
    loraUse: LoraUse = "off",
  ): PlanOp => {
    const residual = io.residual !== undefined;
    const tensor = tensors.find((t) => t.name === layerTensor(weight, 0))!;
    // The storage format is a kernel constant (absent for f32), so each format has its own kernels.
    const format = tensor.gpuDtype === "f32" ? {} : { weights: tensor.gpuDtype };
    const heights = blockHeights(tensor, maxBindingBytes);
    const blocks = heights.map((rows) => ({
      rows,
      matmul: use({ family: "matmul", constants: { K, N: rows, residual, stride: N, ...format } }),
      matvec: use({ family: "matvec", constants: { K, N: rows, residual, stride: N, ...format } }),
    }));
    return {
      op: "linear",
      module,
      matmul: use({ family: "matmul", constants: { K, N, residual, ...format } }),
      matvec: use({ family: "matvec", constants: { K, N, residual, ...format } }),
      ...io,
      weight,
      ...(module !== "lm_head" && maxLoraRank > 0 && loraUse !== "off"
        ? {
            lora: {
              ...loraOf(module, N, residual, loraUse.t),
              // decode's LoRA in the matvec's epilogue; a split weight's blocks keep the expand
              ...(blocks.length === 0 ? { matvec: use({ family: "matvec", constants: { K, N, residual, ...format, loraRank: maxLoraRank } }) } : {}),
            },
          }
        : {}),
      ...(blocks.length > 0 ? { blocks } : {}),
    };
  };
  /** A module's LoRA after its shrink: the expand, its gate column and its region `t` of the engine's t. */
  const loraOf = (m: ExpertModule, N: number, residual: boolean, t: number): PlanLora => {
    // The engine's t carries each row's LoRA info, which the epilogue matvec reads (lora.ts rowInfo).
    const constants = { inFeatures: widths[arch.modules[m].input], outFeatures: N, maxRank: maxLoraRank, rowInfo: true };
    return {
      // DoRA-capable, since any tenant may be DoRA; over a fused residual it reads the residual back
      expand: use({ family: "lora_expand", constants: { ...constants, dora: true, ...(residual ? { residual } : {}) } }),
      gateColumn: EXPERT_MODULES.indexOf(m),
      t,
    };
  };
  const { hidden, qWidth, kvWidth, intermediate, vocab } = dims;
  const widths = widthsOf(base);
  const norm = use({ family: "rmsnorm", constants: { hidden, eps: dims.rmsNormEps, ...(arch.normOffset ? { offset: 1 as const } : {}) } });
  const glu = arch.activation === "silu" ? "swiglu" : "geglu";
  const window = base.slidingWindow === undefined ? {} : { window: base.slidingWindow };
  const attentionShape = { heads: dims.heads, kvHeads: dims.kvHeads, headDim: dims.headDim };

  const gluOp = (): PlanOp => ({ op: glu, kernel: use({ family: glu, constants: {} }), gate: "gate", up: "up", output: "act" });
  const feedForward = (): PlanOp[] => [
    ...adaptedLinears([
      ["gate_proj", { input: "xn", output: "gate" }],
      ["up_proj", { input: "xn", output: "up" }],
    ]),
    gluOp(),
    ...adaptedLinears([["down_proj", { input: "act", output: "x", residual: "h" }]]),
  ];
  /**
   * MixLoRA's feed-forward block: the router picks each row's k experts; the gate and up base products
   * run once, then each pass p adds the p-th chosen expert's LoRA to copies of them, runs the GLU and
   * the down product with that expert's LoRA, and mixes the result into the residual stream by the
   * expert's weight (pass 0 starts from h). A LoRA module of the MLP the adapter lacks adds nothing.
   */
  const feedForwardPasses = (): PlanOp[] => {
    const route: PlanOp = { op: "moe_route", kernel: use({ family: "moe_route", constants: { ...selection!, inFeatures: hidden } }), input: "xn" };
    const mix = use({ family: "moe_mix", constants: { width: hidden, topK: selection!.topK } });
    // Each pass's LoRA-only ops for gate and up, each after its own shrink (the MoE variants run groups of one).
    const lora = (module: ExpertModule, input: ActivationName, output: ActivationName, pass: number): PlanOp[] => [
      shrinkOp([module], input, pass),
      { op: "lora", module, output, lora: loraOf(module, widths[arch.modules[module].output], false, 0) },
    ];
    const passes = Array.from({ length: selection!.topK }, (_, pass): PlanOp[] => [
      { op: "copy", from: "gateBase", to: "gate" },
      { op: "copy", from: "upBase", to: "up" },
      ...(maxLoraRank > 0 ? [...lora("gate_proj", "xn", "gate", pass), ...lora("up_proj", "xn", "up", pass)] : []),
      gluOp(),
      ...adaptedLinears([["down_proj", { input: "act", output: "ffn" }]], pass),
      { op: "moe_mix", kernel: mix, pass, input: "ffn", residual: "h", output: "x" },
    ]);
    return [route, ...linearOf("gate_proj", { input: "xn", output: "gateBase" }, "off"), ...linearOf("up_proj", { input: "xn", output: "upBase" }, "off"), ...passes.flat()];
  };
  const layer: PlanOp[] = [
    { op: "rmsnorm", kernel: norm, input: "x", weight: layerTemplate(arch, `${arch.attentionNorm}.weight`), output: "xn" },
    ...adaptedLinears([
      ["q_proj", { input: "xn", output: "q" }],
      ["k_proj", { input: "xn", output: "k" }],
      ["v_proj", { input: "xn", output: "v" }],
    ]),
    {
      op: "rope",
      kernel: use({ family: "rope", constants: ropeConstants(dims) }),
      q: "q",
      k: "k",
    },
    {
      op: "kv_write",
      kernel: use({
        family: "kv_write",
        constants: { kvHeads: dims.kvHeads, headDim: dims.headDim, maxPositions: ctx },
      }),
      k: "k",
      v: "v",
    },
    {
      op: "attention",
      kernel: use({ family: "attention", constants: { ...attentionShape, maxPositions: ctx, ...window } }),
      q: "q",
      output: "attn",
    },
    ...adaptedLinears([["o_proj", { input: "attn", output: "h", residual: "x" }]]),
    {
      op: "rmsnorm",
      kernel: norm,
      input: "h",
      weight: layerTemplate(arch, `${arch.mlpNorm}.weight`),
      output: "xn",
    },
    ...(moe?.placement === "per_ffn" ? feedForwardPasses() : feedForward()),
  ];
  const routers = (adapter?.router === undefined ? [] : adapter.layers).map((layer): PlanRouterLayer => {
    const experts = EXPERT_MODULES.filter((m) => adapter!.experts.some((e) => e.layer === layer && e.module === m));
    const requests = routerKernelRequests(adapter!.router!, hidden, experts);
    return {
      layer,
      experts,
      ...(requests.score ? { score: use(requests.score) } : {}),
      ...(requests.pool ? { pool: use(requests.pool) } : {}),
      gate: use(requests.gate),
    };
  });
  const lmHead = dims.tiedEmbeddings ? arch.embedding : arch.lmHead;
  const head: PlanOp[] = [
    { op: "rmsnorm", kernel: norm, input: "out", weight: arch.finalNorm, output: "outNorm" },
    linear("lm_head", hidden, vocab, { input: "outNorm", output: "logits" }, lmHead),
    { op: "sample", kernel: use({ family: "sampling", constants: { vocab } }), logits: "logits" },
  ];
  // Beam search's top-k of the log-softmax, dispatched after the head when a step asks for candidates.
  const beamTopK = use({ family: "beam_topk", constants: { vocab } });
  // The server's penalties, logit_bias and min_p before sampling, and the sampled token's logprob after.
  const logitAdjust = use({ family: "logit_adjust", constants: { vocab } });
  const chosenLogprob = use({ family: "chosen_logprob", constants: { vocab } });

  return {
    base: base.name,
    family: base.family,
    dims,
    tensors,
    activations: [
      ...(["x", "h", "xn", "out", "outNorm"] as const).map((name) => ({ name, width: hidden })),
      { name: "q", width: qWidth },
      { name: "attn", width: qWidth },
      { name: "k", width: kvWidth },
      { name: "v", width: kvWidth },
      ...(["gate", "up", "act"] as const).map((name) => ({ name, width: intermediate })),
      ...(moe?.placement === "per_ffn" ? [...(["gateBase", "upBase"] as const).map((name) => ({ name, width: intermediate })), { name: "ffn" as const, width: hidden }] : []),
      { name: "logits", width: vocab },
    ],
    input: "x",
    embedding: arch.embedding,
    // gemma scales the embedding rows by sqrt(hidden_size), in the activations' precision (f32 here)
    ...(arch.scaleEmbeddings ? { embeddingScale: use({ family: "scale", constants: { factor: Math.fround(Math.sqrt(hidden)) } }) } : {}),
    layer,
    headInput: "out",
    head,
    matvecMaxRows,
    maxLoraRank,
    maxBindingBytes,
    routers,
    ...(routers.length > 0 ? { router: adapter!.router! } : {}),
    ...(moe ? { moe } : {}),
    beamTopK,
    logitAdjust,
    chosenLogprob,
    kernels: [...kernels.values()],
  };
}

/** The MoE kernels' selection constants: dense keeps all E (renormalising nothing: the softmax sums to 1). */
function moeSelection(moe: MoeRouting): MoeSelection {
  const s = moe.selection;
  return s.rule === "top_k" ? { experts: moe.experts, topK: s.k, renormalize: s.renormalize } : { experts: moe.experts, topK: moe.experts, renormalize: false };
}

/** The kernels a router runs in a layer whose enabled modules are `experts` (hidden size `hidden`). */
export function routerKernelRequests(
  config: RouterConfig,
  hidden: number,
  experts: readonly ExpertModule[],
): { readonly score?: KernelRequest; readonly pool?: KernelRequest; readonly gate: KernelRequest } {
  const { pooling, activation, selection } = config;
  const columns = experts.map((m) => EXPERT_MODULES.indexOf(m));
  // The activation acts on the vector the gate reads (eq. 3): the pooled prompt, or a token's state.
  const gate: KernelRequest = {
    family: "router_gate",
    constants: { hidden, columns, width: EXPERT_MODULES.length, selection, activation, ...(activation === "rational" ? { rational: config.rational! } : {}) },
  };
  if (config.when === "token") return { gate };
  return {
    ...(pooling === "attention" ? { score: { family: "router_score", constants: { hidden } } } : {}),
    pool: { family: "router_pool", constants: { hidden, pooling } },
    gate,
  };
}


/** The distinct row-block heights of a splittable tensor beyond the binding size; none when it fits. */
function blockHeights(t: PlanTensor, maxBindingBytes: number): number[] {
  const rows = t.shape[0] ?? 1;
  const perBlock = rowsPerBlock(t.shape, maxBindingBytes, t.gpuDtype);
  if (!t.splittable || perBlock === rows) return [];
  return rows % perBlock === 0 ? [perBlock] : [perBlock, rows % perBlock];
}

/** The checkpoint tensors of a base as the plan places them on the GPU, in checkpoint order; `weights` stores the linear ones. */
function tensorTable(base: BaseModel, weights: WeightFormat): PlanTensor[] {
  return checkpointTensors(base).map((t) => ({
    ...t,
    shape: [...t.shape],
    gpuDtype: t.role === "linear" || t.role === "lm_head" ? weights : "f32",
    splittable: t.role === "embedding" || t.role === "lm_head" || t.role === "linear",
  }));
}


/** The WGSL source of one planned kernel (or of one outside the plan that the CLI resolves for the engine). */
export function plannedKernelSource(k: KernelRequest): KernelSource {
  switch (k.family) {
    case "rmsnorm":
      return rmsNormKernel(k.constants);
    case "matmul":
      return matmulKernel(k.constants);
    case "matvec":
      return matvecKernel(k.constants);
    case "rope":
      return ropeKernel(k.constants);
    case "kv_write":
      return kvWriteKernel(k.constants);
    case "attention":
      return attentionKernel(k.constants);
    case "swiglu":
      return swigluKernel();
    case "geglu":
      return gegluKernel();
    case "scale":
      return scaleKernel(k.constants);
    case "bias":
      return biasKernel(k.constants);
    case "sampling":
      return samplingKernel(k.constants);
    case "lora_shrink":
      return loraShrinkKernel(k.constants);
    case "lora_expand":
      return loraExpandKernel(k.constants);
    case "router_score":
      return routerScoreKernel(k.constants);
    case "router_pool":
      return routerPoolKernel(k.constants);
    case "router_gate":
      return routerGateKernel(k.constants);
    case "beam_topk":
      return beamTopKKernel(k.constants);
    case "logit_adjust":
      return logitAdjustKernel(k.constants);
    case "chosen_logprob":
      return chosenLogprobKernel(k.constants);
    case "moe_route":
      return moeRouteKernel(k.constants);
    case "moe_mix":
      return moeMixKernel(k.constants);
  }
}

/** The key of the plan's kernel for `request` (same family and constants), if the plan has one. */
export function plannedKey(plan: Plan, request: KernelRequest): string | undefined {
  // Constants compare as values: a manifest's JSON may order their keys differently.
  return plan.kernels.find((k) => k.family === request.family && isDeepStrictEqual(k.constants, request.constants))?.key;
}

/** The plan's kernels as WGSL sources, by key. */
export function kernelSources(plan: Plan): ReadonlyMap<string, KernelSource> {
  return new Map(plan.kernels.map((k) => [k.key, plannedKernelSource(k)]));
}
