// An adapter directory: adapter_config.json + adapter_model.safetensors in PEFT's layout (DoRA's
// magnitude vectors included), plus MiLoRA's router, pooler and rational-activation tensors under
// names of our own (docs/formats.md). Loading checks the
// files against a spec (given, or rebuilt from the config) and reports every mismatch at once.
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { familyOf, modulePath } from "../../compiler/families.ts";
import { EXPERT_MODULES, type Adapter, type BaseModel, type ExpertModule } from "../../compiler/model.ts";
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
import { CheckpointError, SafetensorsFile, writeSafetensors, type TensorToWrite } from "./safetensors.ts";

export const ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors";

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
};

type TensorRole =
  | { readonly kind: "lora_A" | "lora_B" | "lora_magnitude"; readonly layer: number; readonly module: ExpertModule }
  | { readonly kind: "router" | "router_noise" | "pooler" | "rational_numerator" | "rational_denominator"; readonly layer: number };

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
  const out: SpecTensor[] = [];
  const add = (name: string, shape: number[], role: TensorRole, optional = false) => out.push({ name, shape, optional, role });
  for (const { layer, module, rank, inFeatures, outFeatures, dora } of spec.experts) {
    add(adapterTensorName.loraA(spec.base, layer, module), [rank, inFeatures], { kind: "lora_A", layer, module });
    add(adapterTensorName.loraB(spec.base, layer, module), [outFeatures, rank], { kind: "lora_B", layer, module });
    if (dora) add(adapterTensorName.loraMagnitude(spec.base, layer, module), [outFeatures], { kind: "lora_magnitude", layer, module });
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
  const problems = opts.spec ? [...baseMismatches(spec.base, opts.base), ...scalingMismatches(config, spec), ...doraMismatches(config, spec)] : [];
  const file = SafetensorsFile.open(join(dir, ADAPTER_WEIGHTS_FILE));
  try {
    const expected = specTensors(spec);
    problems.push(...tensorMismatches(file, expected, spec));
    if (problems.length > 0) {
      const shown = problems.slice(0, 30).map((p) => `  ${p}`);
      if (problems.length > 30) shown.push(`  ... and ${problems.length - 30} more`);
      throw new CheckpointError(`${dir} does not match adapter spec ${spec.name} (${problems.length} problems):\n${shown.join("\n")}`);
    }
    const data = new Map(
      expected
        .filter((t) => file.tensors.has(t.name))
        .map((t) => {
          const values = file.readF32(t.name);
          assertFinite(values, join(dir, ADAPTER_WEIGHTS_FILE), t.name, file.tensors.get(t.name)!.shape);
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

function doraMismatches(config: PeftLoraConfig, spec: Adapter): string[] {
  const dora = spec.experts.some((e) => e.dora);
  if (dora === config.useDora) return [];
  return [`${ADAPTER_CONFIG_FILE} has "use_dora": ${config.useDora}, but the spec's experts ${dora ? "use" : "do not use"} DoRA`];
}

function tensorMismatches(file: SafetensorsFile, expected: readonly SpecTensor[], spec: Adapter): string[] {
  const problems: string[] = [];
  const shape = (s: readonly number[]) => `[${s.join(", ")}]`;
  const routerMissing = expected.filter((t) => t.role.kind === "router" && !file.tensors.has(t.name));
  if (spec.router && routerMissing.length === spec.layers.length) {
    problems.push(`the spec routes this adapter (router pooling ${spec.router.pooling}, when ${spec.router.when}) but the file holds no router tensors`);
  }
  for (const t of expected) {
    const info = file.tensors.get(t.name);
    if (!info) {
      if (!t.optional) problems.push(`missing tensor "${t.name}" (spec expects ${shape(t.shape)})`);
    } else if (info.shape.length !== t.shape.length || info.shape.some((n, i) => n !== t.shape[i])) {
      problems.push(`tensor "${t.name}" has shape ${shape(info.shape)}, spec expects ${shape(t.shape)}`);
    } else if (!["F32", "F16", "BF16"].includes(info.dtype)) {
      problems.push(`tensor "${t.name}" has dtype ${info.dtype}; weights must be F32, F16 or BF16`);
    }
  }
  // The rational coefficients come as a set: a file with some of a layer's and not the others is broken.
  for (const layer of spec.router?.activation === "rational" ? spec.layers : []) {
    const names = [adapterTensorName.rationalNumerator(spec.base, layer), adapterTensorName.rationalDenominator(spec.base, layer)].filter((n) => expected.some((t) => t.name === n));
    const present = names.filter((n) => file.tensors.has(n));
    if (present.length > 0 && present.length < names.length) {
      problems.push(`layer ${layer}: the rational activation needs ${names.map((n) => `"${n}"`).join(" and ")} together (the file has only "${present[0]}")`);
    }
  }
  const known = new Set(expected.map((t) => t.name));
  for (const info of file.tensors.values()) {
    if (known.has(info.name)) continue;
    const why =
      !spec.router && info.name.includes(".milora_")
        ? "the spec has no router"
        : info.name.endsWith(".lora_magnitude_vector") && !spec.experts.some((e) => e.dora)
          ? "a DoRA magnitude, but the adapter is not DoRA (use_dora false)"
          : `not part of adapter spec ${spec.name}`;
    problems.push(`unexpected tensor "${info.name}" ${shape(info.shape)} (${why})`);
  }
  return problems;
}

function assemble(name: string, spec: Adapter, data: ReadonlyMap<string, Float32Array>): LoadedAdapter {
  const get = (n: string) => data.get(n)!;
  const lora = new Map<LoraKey, LoraWeights>();
  for (const { layer, module, rank, scaling, dora } of spec.experts) {
    const a = get(adapterTensorName.loraA(spec.base, layer, module));
    const b = get(adapterTensorName.loraB(spec.base, layer, module));
    lora.set(loraKey(layer, module), { a, b, rank, scaling, ...(dora ? { magnitude: get(adapterTensorName.loraMagnitude(spec.base, layer, module)) } : {}) });
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
