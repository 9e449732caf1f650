// An adapter directory: adapter_config.json + adapter_model.safetensors in PEFT's layout (DoRA's
// magnitude vectors included), plus MiLoRA's router, pooler and rational-activation tensors and the
// per_module baseline's routers under names of our own; a per_ffn (MixLoRA) adapter in MoE-PEFT's
// MixLoRA layout instead (docs/formats.md). Loading checks the
// files against a spec (given, or rebuilt from the config) and reports every mismatch at once.
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { familyOf, modulePath } from "../../compiler/families.ts";
import { EXPERT_MODULES, FFN_MODULES, storedRank, type Adapter, type BaseModel, type ExpertModule, type ExpertSlot } from "../../compiler/model.ts";
import { rationalInit } from "../../compiler/rational.ts";
import {
  ADAPTER_CONFIG_FILE,
  configJson,
  configLoraOptions,
  loraScaling,
  readAdapterConfig,
  specFromConfig,
  type PeftLoraConfig,
} from "./adapter-config.ts";
import { assertFinite } from "./finite.ts";
import { CheckpointError, SafetensorsFile, writeSafetensors, type TensorInfo, type TensorToWrite } from "./safetensors.ts";

export const ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors";
/** What PEFT and MoE-PEFT save without safetensors (a PyTorch pickle): refused with how to convert it. */
const PICKLED_WEIGHTS_FILE = "adapter_model.bin";

/** Key of one LoRA module in LoadedAdapter.lora: `${layer}.${module}`. */
export type LoraKey = `${number}.${ExpertModule}`;

export function loraKey(layer: number, module: ExpertModule): LoraKey {
  return `${layer}.${module}`;
}

export interface LoraWeights {
  /** [rank, inFeatures], row-major. */
  readonly a: Float32Array;
  /** [outFeatures, rank], row-major. */
  readonly b: Float32Array;
  readonly rank: number;
  /** alpha / rank, or alpha / sqrt(rank) with rsLoRA. */
  readonly scaling: number;
  /** DoRA's magnitude m [outFeatures] (PEFT's lora_magnitude_vector); absent for plain LoRA. */
  readonly magnitude?: Float32Array;
}

/** The rational activation's coefficients (paper eq. 6): Ra(x) = P(x) / (1 + |Q(x)|). */
export interface RationalWeights {
  /** a_0 .. a_m. */
  readonly numerator: Float32Array;
  /** b_1 .. b_n. */
  readonly denominator: Float32Array;
}

/** The router in front of one layer. */
export interface RouterWeights {
  /** [experts.length, hidden]: one row per enabled module. */
  readonly gate: Float32Array;
  /** The layer's enabled modules in EXPERT_MODULES order: the gate's rows. */
  readonly experts: readonly ExpertModule[];
  /** [experts.length, hidden]; noisy gating while training, unused at inference. */
  readonly noise?: Float32Array;
  /** w_sa [hidden] of the self-attention pooler (appendix C, eq. 8); present when the router pools with attention. */
  readonly pooler?: Float32Array;
  /** Present when the activation is rational: the file's coefficients, else the GELU-fit initialisation. */
  readonly rational?: RationalWeights;
}

/**
 * Key of a per-token Mixture-of-LoRA router in LoadedAdapter.moeRouters: a module's (per_module) or a
 * layer's feed-forward block's (per_ffn).
 */
export type MoeRouterKey = LoraKey | `${number}.ffn`;

export function moeRouterKey(layer: number, at: ExpertModule | "ffn"): MoeRouterKey {
  return `${layer}.${at}`;
}

/** An adapter in memory: its spec and its weights as f32. */
export interface LoadedAdapter {
  /** The name it is addressed by (the tenant's name). */
  readonly name: string;
  readonly spec: Adapter;
  readonly lora: ReadonlyMap<LoraKey, LoraWeights>;
  /** By layer; absent for plain LoRA. */
  readonly router?: ReadonlyMap<number, RouterWeights>;
  /**
   * A per_module or per_ffn adapter's routers (spec.moe), each [experts, inFeatures] row-major: one per
   * enabled module (per_module), or one per layer reading the MLP's input (per_ffn, in the layers that
   * enable an MLP module). Its LoRA weights hold rank storedRank() (compiler/model.ts).
   */
  readonly moeRouters?: ReadonlyMap<MoeRouterKey, Float32Array>;
}

/** PEFT wraps the base model twice: `base_model.model.` precedes every module path of the base. */
const PEFT_PREFIX = "base_model.model";
type Base = Pick<BaseModel, "family" | "name">;
const layerPath = (base: Base, layer: number) => `${PEFT_PREFIX}.${familyOf(base).architecture.layers}.${layer}`;
/** MoE-PEFT names a MixLoRA adapter's tensors `mixlora.layers.{i}.` and the module's path in the layer. */
const mixloraModule = (base: Base, layer: number, module: ExpertModule) => `mixlora.layers.${layer}.${familyOf(base).architecture.modules[module].path}`;

/** Tensor names in adapter_model.safetensors, for an adapter over `base`. */
export const adapterTensorName = {
  loraA: (base: Base, layer: number, module: ExpertModule) => `${PEFT_PREFIX}.${modulePath(base, layer, module)}.lora_A.weight`,
  loraB: (base: Base, layer: number, module: ExpertModule) => `${PEFT_PREFIX}.${modulePath(base, layer, module)}.lora_B.weight`,
  // PEFT saves DoRA's magnitude without the `.weight` its module holds it under (LoraModel._get_adapter_state_dict)
  loraMagnitude: (base: Base, layer: number, module: ExpertModule) => `${PEFT_PREFIX}.${modulePath(base, layer, module)}.lora_magnitude_vector`,
  router: (base: Base, layer: number) => `${layerPath(base, layer)}.milora_router.weight`,
  routerNoise: (base: Base, layer: number) => `${layerPath(base, layer)}.milora_router_noise.weight`,
  pooler: (base: Base, layer: number) => `${layerPath(base, layer)}.milora_pooler.weight`,
  rationalNumerator: (base: Base, layer: number) => `${layerPath(base, layer)}.milora_rational.numerator`,
  rationalDenominator: (base: Base, layer: number) => `${layerPath(base, layer)}.milora_rational.denominator`,
  /** A per_module adapter's router of one module, [num_experts, in]. */
  moeRouter: (base: Base, layer: number, module: ExpertModule) => `${PEFT_PREFIX}.${modulePath(base, layer, module)}.milora_moe_router.weight`,
  /** per_ffn (MoE-PEFT's MixLoRA layout): an attention module's plain LoRA. */
  mixloraA: (base: Base, layer: number, module: ExpertModule) => `${mixloraModule(base, layer, module)}.lora_A.weight`,
  mixloraB: (base: Base, layer: number, module: ExpertModule) => `${mixloraModule(base, layer, module)}.lora_B.weight`,
  /** per_ffn: the layer's router, [num_experts, hidden]. */
  mixloraGate: (_base: Base, layer: number) => `mixlora.layers.${layer}.mlp.moe_gate.weight`,
  /** per_ffn: expert `expert`'s LoRA on an MLP module, [r, in] and [out, r]. */
  mixloraExpertA: (base: Base, layer: number, module: ExpertModule, expert: number) => `${mixloraModule(base, layer, module)}.experts.${expert}.lora_A.weight`,
  mixloraExpertB: (base: Base, layer: number, module: ExpertModule, expert: number) => `${mixloraModule(base, layer, module)}.experts.${expert}.lora_B.weight`,
};

/** MixLoRA's legacy projection names, as its misc/legacy_weights_convertor.py maps them. */
const LEGACY_PROJ: Readonly<Record<string, string>> = { w1_proj: "gate_proj", w2_proj: "down_proj", w3_proj: "up_proj" };

/**
 * The MixLoRA package's older tensor names (`mixlora.layers.{i}.gate.weight`,
 * `mixlora.layers.{i}.experts.{e}.{proj}.lora_A.weight`) in today's layout; undefined for any other name.
 */
function modernMixloraName(name: string): string | undefined {
  const gate = /^mixlora\.layers\.(\d+)\.gate\.weight$/.exec(name);
  if (gate) return `mixlora.layers.${gate[1]}.mlp.moe_gate.weight`;
  const expert = /^mixlora\.layers\.(\d+)\.experts\.(\d+)\.(\w+)\.(lora_[AB]\.weight)$/.exec(name);
  if (expert) return `mixlora.layers.${expert[1]}.mlp.${LEGACY_PROJ[expert[3]!] ?? expert[3]}.experts.${expert[2]}.${expert[4]}`;
  return undefined;
}

type TensorRole =
  | { readonly kind: "lora_A" | "lora_B" | "lora_magnitude"; readonly layer: number; readonly module: ExpertModule }
  | { readonly kind: "router" | "router_noise" | "pooler" | "rational_numerator" | "rational_denominator"; readonly layer: number }
  | { readonly kind: "moe_router"; readonly layer: number; readonly at: ExpertModule | "ffn" }
  | { readonly kind: "expert_A" | "expert_B"; readonly layer: number; readonly module: ExpertModule; readonly expert: number };

/** A tensor a spec calls for, with the shape it must have. */
interface SpecTensor {
  readonly name: string;
  readonly shape: readonly number[];
  /**
   * May be absent: the router's noise weights (needed only for training), and the rational
   * activation's coefficients (then the GELU-fit initialisation; both or neither).
   */
  readonly optional: boolean;
  readonly role: TensorRole;
}

/** The enabled modules of one layer, in EXPERT_MODULES order: the rows of its router. */
export function layerExperts(spec: Adapter, layer: number): ExpertModule[] {
  return EXPERT_MODULES.filter((m) => spec.experts.some((e) => e.layer === layer && e.module === m));
}

function specTensors(spec: Adapter): SpecTensor[] {
  if (spec.moe?.placement === "per_ffn") return mixloraTensors(spec, spec.moe.experts);
  const out: SpecTensor[] = [];
  const add = (name: string, shape: number[], role: TensorRole, optional = false) => out.push({ name, shape, optional, role });
  for (const { layer, module, rank, inFeatures, outFeatures, dora } of spec.experts) {
    add(adapterTensorName.loraA(spec.base, layer, module), [rank, inFeatures], { kind: "lora_A", layer, module });
    add(adapterTensorName.loraB(spec.base, layer, module), [outFeatures, rank], { kind: "lora_B", layer, module });
    if (dora) add(adapterTensorName.loraMagnitude(spec.base, layer, module), [outFeatures], { kind: "lora_magnitude", layer, module });
  }
  if (spec.moe) {
    // per_module: each module's rank-r LoRA is its experts' slices; its router reads the module's input
    for (const { layer, module, inFeatures } of spec.experts) {
      add(adapterTensorName.moeRouter(spec.base, layer, module), [spec.moe.experts, inFeatures], { kind: "moe_router", layer, at: module });
    }
    return out;
  }
  if (!spec.router) return out;
  const hidden = spec.base.hiddenSize;
  for (const layer of spec.layers) {
    const experts = layerExperts(spec, layer).length;
    add(adapterTensorName.router(spec.base, layer), [experts, hidden], { kind: "router", layer });
    add(adapterTensorName.routerNoise(spec.base, layer), [experts, hidden], { kind: "router_noise", layer }, true);
    if (spec.router.pooling === "attention") add(adapterTensorName.pooler(spec.base, layer), [1, hidden], { kind: "pooler", layer });
    const orders = spec.router.activation === "rational" ? spec.router.rational : undefined;
    if (orders) {
      add(adapterTensorName.rationalNumerator(spec.base, layer), [orders.numerator + 1], { kind: "rational_numerator", layer }, true);
      if (orders.denominator > 0) add(adapterTensorName.rationalDenominator(spec.base, layer), [orders.denominator], { kind: "rational_denominator", layer }, true);
    }
  }
  return out;
}

/**
 * A per_ffn adapter's tensors in MoE-PEFT's MixLoRA layout, layer by layer: the attention modules' LoRA,
 * the router, and each MLP module's `experts` LoRA of the spec's rank (one per expert).
 */
function mixloraTensors(spec: Adapter, experts: number): SpecTensor[] {
  const out: SpecTensor[] = [];
  const add = (name: string, shape: number[], role: TensorRole) => out.push({ name, shape, optional: false, role });
  for (const layer of spec.layers) {
    const slots = spec.experts.filter((e) => e.layer === layer);
    for (const { module, rank, inFeatures, outFeatures } of slots.filter((e) => !FFN_MODULES.includes(e.module))) {
      add(adapterTensorName.mixloraA(spec.base, layer, module), [rank, inFeatures], { kind: "lora_A", layer, module });
      add(adapterTensorName.mixloraB(spec.base, layer, module), [outFeatures, rank], { kind: "lora_B", layer, module });
    }
    const mlp = slots.filter((e) => FFN_MODULES.includes(e.module));
    if (mlp.length === 0) continue;
    add(adapterTensorName.mixloraGate(spec.base, layer), [experts, spec.base.hiddenSize], { kind: "moe_router", layer, at: "ffn" });
    for (const { module, rank, inFeatures, outFeatures } of mlp) {
      for (let expert = 0; expert < experts; expert++) {
        add(adapterTensorName.mixloraExpertA(spec.base, layer, module, expert), [rank, inFeatures], { kind: "expert_A", layer, module, expert });
        add(adapterTensorName.mixloraExpertB(spec.base, layer, module, expert), [outFeatures, rank], { kind: "expert_B", layer, module, expert });
      }
    }
  }
  return out;
}

export interface LoadAdapterOptions {
  readonly name: string;
  readonly base: BaseModel;
  /** What the files must hold; without it, the spec is rebuilt from adapter_config.json. */
  readonly spec?: Adapter;
}

/**
 * Loads an adapter directory. Throws one CheckpointError listing every way the files differ from the
 * spec: missing, unexpected or misshapen tensors (name and both shapes) and LoRA scaling.
 */
export function loadAdapter(dir: string, opts: LoadAdapterOptions): LoadedAdapter {
  const config = readAdapterConfig(dir);
  const spec = opts.spec ?? specFromConfig(config, opts.base, opts.name);
  const problems = opts.spec
    ? [...baseMismatches(spec.base, opts.base), ...layoutMismatches(config, spec), ...scalingMismatches(config, spec), ...doraMismatches(config, spec)]
    : [];
  const weightsPath = join(dir, ADAPTER_WEIGHTS_FILE);
  if (!existsSync(weightsPath) && existsSync(join(dir, PICKLED_WEIGHTS_FILE))) {
    throw new CheckpointError(
      `${dir} holds ${PICKLED_WEIGHTS_FILE} (a PyTorch pickle, as PEFT and MoE-PEFT save without safetensors) but no ${ADAPTER_WEIGHTS_FILE}; ` +
        `milora reads safetensors only (a pickle can run code when loaded). Convert it once with Python: ` +
        `import torch; from safetensors.torch import save_file; ` +
        `save_file({k: v.contiguous() for k, v in torch.load("${PICKLED_WEIGHTS_FILE}", map_location="cpu", weights_only=True).items()}, "${ADAPTER_WEIGHTS_FILE}")`,
    );
  }
  const file = SafetensorsFile.open(weightsPath);
  try {
    const expected = specTensors(spec);
    const tensors = fileTensors(file, spec, problems);
    problems.push(...tensorMismatches(tensors, expected, spec));
    if (problems.length > 0) {
      const shown = problems.slice(0, 30).map((p) => `  ${p}`);
      if (problems.length > 30) shown.push(`  ... and ${problems.length - 30} more`);
      throw new CheckpointError(`${dir} does not match adapter spec ${spec.name} (${problems.length} problems):\n${shown.join("\n")}`);
    }
    const data = new Map(
      expected
        .filter((t) => tensors.has(t.name))
        .map((t) => {
          const info = tensors.get(t.name)!;
          const values = file.readF32(info.name);
          assertFinite(values, weightsPath, info.name, info.shape);
          return [t.name, values] as const;
        }),
    );
    return assemble(opts.name, spec, data);
  } finally {
    file.close();
  }
}

/** The spec of a plain PEFT LoRA adapter: every module its config targets, no router (gate 1). */
export function adapterSpecFromPeft(dir: string, base: BaseModel, name: string): Adapter {
  return specFromConfig(readAdapterConfig(dir), base, name, false);
}

function baseMismatches(specBase: BaseModel, base: BaseModel): string[] {
  const fields = ["hiddenSize", "layers", "heads", "kvHeads", "headDim", "intermediateSize", "vocabSize"] as const;
  const differ = fields.filter((f) => specBase[f] !== base[f]);
  return differ.length === 0 ? [] : [`the spec is for base ${specBase.name}, which differs from ${base.name} in ${differ.map((f) => `${f} (${specBase[f]} vs ${base[f]})`).join(", ")}`];
}

function scalingMismatches(config: PeftLoraConfig, spec: Adapter): string[] {
  const problems: string[] = [];
  for (const e of spec.experts) {
    const o = configLoraOptions(config, spec.base, e.layer, e.module);
    const scaling = loraScaling(o.rank, o.alpha, o.rslora);
    if (Math.abs(scaling - e.scaling) > 1e-12 * Math.abs(e.scaling)) {
      const describe = (x: { rank: number; alpha: number; rslora: boolean }) => `r ${x.rank}, alpha ${x.alpha}${x.rslora ? ", rsLoRA" : ""}`;
      problems.push(`layer ${e.layer} ${e.module}: ${ADAPTER_CONFIG_FILE} gives LoRA scaling ${scaling} (${describe(o)}), the spec ${e.scaling} (${describe(e)})`);
    }
  }
  return problems;
}

/** A per_ffn spec over a directory not in MixLoRA's layout, or the reverse; and a num_experts the config contradicts. */
function layoutMismatches(config: PeftLoraConfig, spec: Adapter): string[] {
  const ffn = spec.moe?.placement === "per_ffn";
  if (ffn && config.peftType !== "MIXLORA") {
    return [`the spec routes per_ffn (MixLoRA), whose adapters are in MoE-PEFT's MixLoRA layout ("peft_type": "MIXLORA"), but ${ADAPTER_CONFIG_FILE} has "peft_type": "${config.peftType}"`];
  }
  if (!ffn && config.peftType === "MIXLORA") {
    return [`${ADAPTER_CONFIG_FILE} describes a MixLoRA adapter ("peft_type": "MIXLORA"), but the spec ${spec.moe ? `routes ${spec.moe.placement}` : "does not route per_ffn"}`];
  }
  const experts = config.milora?.moe?.experts ?? config.mixlora?.numExperts;
  if (spec.moe && experts !== undefined && experts !== spec.moe.experts) {
    return [`${ADAPTER_CONFIG_FILE} gives num_experts ${experts}, the spec ${spec.moe.experts}`];
  }
  return [];
}

function doraMismatches(config: PeftLoraConfig, spec: Adapter): string[] {
  const dora = spec.experts.some((e) => e.dora);
  if (dora === config.useDora) return [];
  return [`${ADAPTER_CONFIG_FILE} has "use_dora": ${config.useDora}, but the spec's experts ${dora ? "use" : "do not use"} DoRA`];
}

/**
 * The file's tensors by the names the spec uses: for a per_ffn spec the MixLoRA package's legacy names
 * are read as today's. A tensor given under both names is a problem.
 */
function fileTensors(file: SafetensorsFile, spec: Adapter, problems: string[]): ReadonlyMap<string, TensorInfo> {
  const legacy = spec.moe?.placement === "per_ffn";
  const out = new Map<string, TensorInfo>();
  for (const info of file.tensors.values()) {
    const name = (legacy ? modernMixloraName(info.name) : undefined) ?? info.name;
    const seen = out.get(name);
    if (seen) problems.push(`tensors "${seen.name}" and "${info.name}" are the same tensor under MixLoRA's legacy and current names; keep one`);
    else out.set(name, info);
  }
  return out;
}

function tensorMismatches(tensors: ReadonlyMap<string, TensorInfo>, expected: readonly SpecTensor[], spec: Adapter): string[] {
  const problems: string[] = [];
  const shape = (s: readonly number[]) => `[${s.join(", ")}]`;
  const routerMissing = expected.filter((t) => t.role.kind === "router" && !tensors.has(t.name));
  if (spec.router && routerMissing.length === spec.layers.length) {
    problems.push(`the spec routes this adapter (router pooling ${spec.router.pooling}, when ${spec.router.when}) but the file holds no router tensors`);
  }
  const moeRouters = expected.filter((t) => t.role.kind === "moe_router");
  if (spec.moe && moeRouters.length > 0 && moeRouters.every((t) => !tensors.has(t.name))) {
    problems.push(`the spec routes every token ${spec.moe.placement} over ${spec.moe.experts} experts but the file holds none of its ${moeRouters.length} router tensors`);
  }
  for (const t of expected) {
    const info = tensors.get(t.name);
    if (!info) {
      if (!t.optional) problems.push(`missing tensor "${t.name}" (spec expects ${shape(t.shape)})`);
    } else if (info.shape.length !== t.shape.length || info.shape.some((n, i) => n !== t.shape[i])) {
      problems.push(`tensor "${info.name}" has shape ${shape(info.shape)}, spec expects ${shape(t.shape)}`);
    } else if (!["F32", "F16", "BF16"].includes(info.dtype)) {
      problems.push(`tensor "${info.name}" has dtype ${info.dtype}; weights must be F32, F16 or BF16`);
    }
  }
  // The rational coefficients come as a set: a file with some of a layer's and not the others is broken.
  for (const layer of spec.router?.activation === "rational" ? spec.layers : []) {
    const names = [adapterTensorName.rationalNumerator(spec.base, layer), adapterTensorName.rationalDenominator(spec.base, layer)].filter((n) => expected.some((t) => t.name === n));
    const present = names.filter((n) => tensors.has(n));
    if (present.length > 0 && present.length < names.length) {
      problems.push(`layer ${layer}: the rational activation needs ${names.map((n) => `"${n}"`).join(" and ")} together (the file has only "${present[0]}")`);
    }
  }
  const known = new Set(expected.map((t) => t.name));
  for (const [name, info] of tensors) {
    if (known.has(name)) continue;
    problems.push(`unexpected tensor "${info.name}" ${shape(info.shape)} (${unexpectedWhy(name, spec)})`);
  }
  return problems;
}

/** Why a tensor the spec does not have is there, as well as can be told from its name. */
function unexpectedWhy(name: string, spec: Adapter): string {
  const moe = spec.moe;
  if (name.includes(".milora_moe_router.")) {
    if (moe?.placement !== "per_module") return `a per_module router, but the spec ${moe ? `routes ${moe.placement}` : "has no per_module router"}`;
  } else if (!spec.router && name.includes(".milora_")) {
    return moe ? `a MiLoRA per-layer router tensor, but the spec routes ${moe.placement}` : "the spec has no router";
  }
  if (name.endsWith(".lora_magnitude_vector") && !spec.experts.some((e) => e.dora)) return "a DoRA magnitude, but the adapter is not DoRA (use_dora false)";
  if (name.startsWith("mixlora.")) {
    if (moe?.placement !== "per_ffn") return "a tensor of MixLoRA's layout, but the spec does not route per_ffn";
    const expert = /\.experts\.(\d+)\./.exec(name);
    if (expert && Number(expert[1]) >= moe.experts) return `expert ${expert[1]}, but the spec has num_experts ${moe.experts} (experts 0 to ${moe.experts - 1})`;
  }
  return `not part of adapter spec ${spec.name}`;
}

/**
 * A per_ffn module's E experts of rank r as one LoRA of rank E*r: A [E*r, in] with expert e's rows at
 * e*r .. (e+1)*r - 1, B [out, E*r] with expert e's columns there.
 */
export function stackExperts(experts: readonly { readonly a: Float32Array; readonly b: Float32Array }[], slot: Pick<ExpertSlot, "rank" | "inFeatures" | "outFeatures">): { a: Float32Array; b: Float32Array } {
  const { rank: r, inFeatures, outFeatures } = slot;
  const n = experts.length;
  const a = new Float32Array(n * r * inFeatures);
  const b = new Float32Array(outFeatures * n * r);
  experts.forEach((x, e) => {
    a.set(x.a, e * r * inFeatures);
    for (let o = 0; o < outFeatures; o++) b.set(x.b.subarray(o * r, (o + 1) * r), o * n * r + e * r);
  });
  return { a, b };
}

/** Expert `expert`'s A [r, in] and B [out, r] out of a stacked per_ffn LoRA (the reverse of stackExperts). */
export function expertOf(stacked: Pick<LoraWeights, "a" | "b" | "rank">, expert: number, slot: Pick<ExpertSlot, "rank" | "inFeatures" | "outFeatures">): { a: Float32Array; b: Float32Array } {
  const { rank: r, inFeatures, outFeatures } = slot;
  const a = stacked.a.slice(expert * r * inFeatures, (expert + 1) * r * inFeatures);
  const b = new Float32Array(outFeatures * r);
  for (let o = 0; o < outFeatures; o++) b.set(stacked.b.subarray(o * stacked.rank + expert * r, o * stacked.rank + (expert + 1) * r), o * r);
  return { a, b };
}

function assemble(name: string, spec: Adapter, data: ReadonlyMap<string, Float32Array>): LoadedAdapter {
  const get = (n: string) => data.get(n)!;
  const lora = new Map<LoraKey, LoraWeights>();
  const moe = spec.moe;
  for (const slot of spec.experts) {
    const { layer, module, rank, scaling, dora } = slot;
    if (moe?.placement === "per_ffn") {
      const weights = FFN_MODULES.includes(module)
        ? stackExperts(
            Array.from({ length: moe.experts }, (_, e) => ({
              a: get(adapterTensorName.mixloraExpertA(spec.base, layer, module, e)),
              b: get(adapterTensorName.mixloraExpertB(spec.base, layer, module, e)),
            })),
            slot,
          )
        : { a: get(adapterTensorName.mixloraA(spec.base, layer, module)), b: get(adapterTensorName.mixloraB(spec.base, layer, module)) };
      lora.set(loraKey(layer, module), { ...weights, rank: storedRank(spec, slot), scaling });
      continue;
    }
    const a = get(adapterTensorName.loraA(spec.base, layer, module));
    const b = get(adapterTensorName.loraB(spec.base, layer, module));
    lora.set(loraKey(layer, module), { a, b, rank, scaling, ...(dora ? { magnitude: get(adapterTensorName.loraMagnitude(spec.base, layer, module)) } : {}) });
  }
  if (moe) {
    const moeRouters = new Map<MoeRouterKey, Float32Array>();
    if (moe.placement === "per_module") {
      for (const { layer, module } of spec.experts) moeRouters.set(moeRouterKey(layer, module), get(adapterTensorName.moeRouter(spec.base, layer, module)));
    } else {
      for (const layer of spec.layers) {
        const gate = data.get(adapterTensorName.mixloraGate(spec.base, layer));
        if (gate) moeRouters.set(moeRouterKey(layer, "ffn"), gate);
      }
    }
    return { name, spec, lora, moeRouters };
  }
  if (!spec.router) return { name, spec, lora };
  const pooled = spec.router.pooling === "attention";
  const orders = spec.router.activation === "rational" ? spec.router.rational : undefined;
  const init = orders && rationalInit(orders);
  const router = new Map<number, RouterWeights>();
  for (const layer of spec.layers) {
    const noise = data.get(adapterTensorName.routerNoise(spec.base, layer));
    const numerator = data.get(adapterTensorName.rationalNumerator(spec.base, layer));
    const rational: RationalWeights | undefined = init && {
      numerator: numerator ?? Float32Array.from(init.numerator),
      denominator: (numerator ? data.get(adapterTensorName.rationalDenominator(spec.base, layer)) : undefined) ?? Float32Array.from(init.denominator),
    };
    router.set(layer, {
      gate: get(adapterTensorName.router(spec.base, layer)),
      experts: layerExperts(spec, layer),
      ...(noise ? { noise } : {}),
      ...(pooled ? { pooler: get(adapterTensorName.pooler(spec.base, layer)) } : {}),
      ...(rational ? { rational } : {}),
    });
  }
  return { name, spec, lora, router };
}

function tensorData(adapter: LoadedAdapter, role: TensorRole): Float32Array | undefined {
  if (role.kind === "lora_A" || role.kind === "lora_B" || role.kind === "lora_magnitude") {
    const w = adapter.lora.get(loraKey(role.layer, role.module));
    return role.kind === "lora_A" ? w?.a : role.kind === "lora_B" ? w?.b : w?.magnitude;
  }
  if (role.kind === "moe_router") return adapter.moeRouters?.get(moeRouterKey(role.layer, role.at));
  if (role.kind === "expert_A" || role.kind === "expert_B") {
    const w = adapter.lora.get(loraKey(role.layer, role.module));
    const slot = adapter.spec.experts.find((e) => e.layer === role.layer && e.module === role.module)!;
    if (!w) return undefined;
    const stacked = storedRank(adapter.spec, slot);
    if (w.rank !== stacked || w.a.length !== stacked * slot.inFeatures || w.b.length !== slot.outFeatures * stacked) {
      throw new Error(
        `adapter ${adapter.name}: layer ${role.layer} ${role.module} holds a LoRA of rank ${w.rank} (${w.a.length} and ${w.b.length} values), but ${adapter.spec.moe!.experts} experts of rank ${slot.rank} stack to rank ${stacked}`,
      );
    }
    const expert = expertOf(w, role.expert, slot);
    return role.kind === "expert_A" ? expert.a : expert.b;
  }
  const r = adapter.router?.get(role.layer);
  switch (role.kind) {
    case "router":
      return r?.gate;
    case "router_noise":
      return r?.noise;
    case "pooler":
      return r?.pooler;
    case "rational_numerator":
      return r?.rational?.numerator;
    case "rational_denominator":
      return r?.rational?.denominator;
  }
}

/**
 * Writes an adapter directory that loadAdapter reads back exactly (f32). The directory appears whole or
 * not at all: it is written beside `dir` and renamed; an existing adapter there is replaced, anything
 * else refused.
 */
export function writeAdapter(dir: string, adapter: LoadedAdapter): void {
  const tensors: TensorToWrite[] = [];
  for (const t of specTensors(adapter.spec)) {
    const data = tensorData(adapter, t.role);
    if (data) tensors.push({ name: t.name, dtype: "F32", shape: t.shape, data });
    else if (!t.optional) throw new Error(`adapter ${adapter.name}: no weights for tensor "${t.name}"`);
  }
  if (existsSync(dir) && readdirSync(dir).length > 0 && !existsSync(join(dir, ADAPTER_CONFIG_FILE))) {
    throw new CheckpointError(`${dir} exists and is not an adapter directory; refusing to replace it`);
  }
  const unique = `${process.pid}-${Math.random().toString(36).slice(2)}`;
  const temp = `${resolve(dir)}.tmp-${unique}`;
  mkdirSync(temp, { recursive: true });
  const old = `${resolve(dir)}.old-${unique}`;
  const replacing = existsSync(dir);
  try {
    writeFileSync(join(temp, ADAPTER_CONFIG_FILE), JSON.stringify(configJson(adapter.spec), null, 2) + "\n");
    writeSafetensors(join(temp, ADAPTER_WEIGHTS_FILE), tensors, { format: "pt" });
    // A directory cannot be renamed over a non-empty one: move the old adapter aside, and back on failure.
    if (replacing) renameSync(dir, old);
    try {
      renameSync(temp, dir);
    } catch (e) {
      if (replacing) renameSync(old, dir);
      throw e;
    }
  } catch (e) {
    rmSync(temp, { recursive: true, force: true });
    throw e;
  }
  rmSync(old, { recursive: true, force: true });
}
