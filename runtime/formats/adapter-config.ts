// adapter_config.json: Hugging Face PEFT's LoRA config, plus a `milora` section for routed adapters; or,
// for a per_ffn (MixLoRA) adapter, MoE-PEFT's MIXLORA config (TUDB-Labs/MoE-PEFT, the layout MixLoRA
// adapters are published in), plus the same `milora` section when milora wrote it.
// Reading turns it into the Adapter spec it describes (with PEFT's rules for target_modules,
// layers_to_transform, rank_pattern and alpha_pattern); writing does the reverse for a spec.
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { RE2JS } from "re2js";
import {
  EXPERT_MODULES,
  FFN_MODULES,
  type Activation,
  type Adapter,
  type BaseModel,
  type ExpertModule,
  type ExpertSlot,
  type LoraOptions,
  type MoePlacement,
  type MoeRouting,
  type Pooling,
  type RouterConfig,
  type RoutingTime,
  type Selection,
} from "../../compiler/model.ts";
import { MAX_LAYERS, MAX_MOE_EXPERTS, MAX_RANK } from "../../compiler/limits.ts";
import { familyOf, moduleShape, modulePath } from "../../compiler/families.ts";
import { RATIONAL_ORDER_LIMITS } from "../../compiler/rational.ts";
import { CheckpointError } from "./safetensors.ts";

export const ADAPTER_CONFIG_FILE = "adapter_config.json";
/**
 * Version of the `milora` section this code reads and writes. 2: the paper's router (self-attention
 * pooler w_sa, un-renormalised top-k gates unless `renormalize`, activation after pooling, rational
 * activation). Version 1 files are refused with what changed (see version1Message). A per-token
 * baseline's router (`"placement": "per_module"` or `"per_ffn"`) needs no new version: a version 2 reader
 * that predates it refuses such a section (its router lacks the per-layer router's keys) rather than
 * misreading it, and a per_ffn adapter's config is MIXLORA, which such a reader refuses outright.
 */
export const MILORA_SECTION_VERSION = 2;


/** The LoRA update's multiplier: alpha / r, or alpha / sqrt(r) with rsLoRA. */
export function loraScaling(rank: number, alpha: number, rslora: boolean): number {
  return rslora ? alpha / Math.sqrt(rank) : alpha / rank;
}

/** One expert slot of a base with the given LoRA options; the shape comes from the base. */
export function loraSlot(base: BaseModel, layer: number, module: ExpertModule, o: Omit<LoraOptions, "scaling">): ExpertSlot {
  return { layer, module, ...moduleShape(base, module), ...o, scaling: loraScaling(o.rank, o.alpha, o.rslora) };
}


/** Keys a rank_pattern or alpha_pattern may have: above one per module of the largest base milora accepts. */
const MAX_PATTERN_KEYS = 8192;

/** PEFT's LoraConfig defaults, for fields a config leaves out. */
const PEFT_DEFAULTS = { r: 8, loraAlpha: 8, loraDropout: 0 } as const;

/** The `milora` section: what a routed adapter adds to PEFT's fields. */
export interface MiloraSection {
  readonly version: number;
  /** specHash of the spec the adapter was made for (provenance; not needed to load it). */
  readonly specHash: string;
  /** The adapter's name in its spec. */
  readonly adapter: string;
  /** MiLoRA's per-layer router; absent when the section describes a per-token baseline (`moe`). */
  readonly router?: RouterConfig;
  /** A per_module or per_ffn router: `"router": {"placement": ..., "num_experts": E, "selection": ..., "balance": B}`. */
  readonly moe?: MoeRouting;
  /** Enabled modules per layer, in EXPERT_MODULES order: the rows of that layer's router. */
  readonly experts: ReadonlyMap<number, readonly ExpertModule[]>;
}

/** The LoRA options MixLoRA gives a group of modules (its top-level fields, or `expert_lora` over them). */
export interface MixLoraOptions {
  readonly r: number;
  readonly loraAlpha: number;
  readonly loraDropout: number;
  readonly useRslora: boolean;
}

/** The MixLoRA fields of a MIXLORA config (MoE-PEFT's MixLoraConfig), validated. */
export interface MixLoraFields {
  /** `mixlora` (MoE-PEFT) or `mixtral` (the MixLoRA package): the same top-k router. */
  readonly routingStrategy: "mixlora" | "mixtral";
  readonly numExperts: number;
  readonly topK: number;
  /** router_aux_loss_coef: the load-balancing loss's coefficient (training only). */
  readonly balance: number;
  /** act_fn: the experts' activation; null for the base's own (checked against the base when the spec is built). */
  readonly actFn: string | null;
  /** The MLP experts' LoRA options: `expert_lora` over the top-level r, lora_alpha, lora_dropout, use_rslora. */
  readonly expert: MixLoraOptions;
}

/** The fields of a PEFT LoRA config that milora reads, validated. */
export interface PeftLoraConfig {
  readonly path: string;
  /** LORA (PEFT), or MIXLORA (MoE-PEFT's MixLoRA: then `mixlora` holds its fields). */
  readonly peftType: "LORA" | "MIXLORA";
  readonly baseModel: string | null;
  readonly r: number;
  readonly loraAlpha: number;
  readonly loraDropout: number;
  /** A list of module-name suffixes, or one regular expression matched against the whole module path. */
  readonly targetModules: readonly string[] | string;
  readonly layersToTransform: readonly number[] | null;
  readonly rankPattern: Readonly<Record<string, number>>;
  readonly alphaPattern: Readonly<Record<string, number>>;
  readonly useRslora: boolean;
  /** DoRA on every targeted module (PEFT keeps one flag per adapter). */
  readonly useDora: boolean;
  /** A MIXLORA config's router and expert fields; absent for LORA. */
  readonly mixlora?: MixLoraFields;
  readonly milora?: MiloraSection;
}

/** Reads and validates `dir`/adapter_config.json; every problem is one CheckpointError naming the file. */
export function readAdapterConfig(dir: string): PeftLoraConfig {
  const path = `${dir}/${ADAPTER_CONFIG_FILE}`;
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === "ENOENT" ? "missing" : code ? `cannot read (${code})` : `not valid JSON (${(e as Error).message})`;
    throw new CheckpointError(`${path}: ${why}`);
  }
  return parseAdapterConfig(json, path);
}

function parseAdapterConfig(json: unknown, path: string): PeftLoraConfig {
  const fail = (what: string): never => {
    throw new CheckpointError(`${path}: ${what}`);
  };
  if (!isObject(json)) return fail("not a JSON object");
  const field = <T>(key: string, ok: (v: unknown) => v is T, want: string, fallback?: T): T => {
    const v = json[key];
    if ((v === undefined || v === null) && fallback !== undefined) return fallback;
    return ok(v) ? v : fail(`"${key}" must be ${want}, got ${JSON.stringify(v)}`);
  };
  const peftType = field("peft_type", isString, "a string", "LORA");
  if (peftType !== "LORA" && peftType !== "MIXLORA") fail(`peft_type ${peftType} is not supported (only LORA, and MIXLORA for MixLoRA adapters)`);
  const mix = peftType === "MIXLORA";
  if (json.fan_in_fan_out === true) fail(`"fan_in_fan_out": true is not supported`);
  const bias = json.bias ?? "none";
  if (bias !== "none") fail(`"bias": ${JSON.stringify(bias)} is not supported (only "none")`);
  const layersRaw = json.layers_to_transform ?? null;
  const layersToTransform =
    layersRaw === null ? null : isCount(layersRaw) ? [layersRaw] : Array.isArray(layersRaw) && layersRaw.every(isCount) ? layersRaw : fail(`"layers_to_transform" must be a layer number or a list of them, got ${JSON.stringify(layersRaw)}`);
  if (layersToTransform !== null && layersToTransform.length > MAX_LAYERS) fail(`"layers_to_transform" lists ${layersToTransform.length} layers; milora's largest base has ${MAX_LAYERS}`);
  const targets = json.target_modules;
  const targetModules = mix
    ? mixloraTargets(targets, fail)
    : isString(targets)
      ? targets
      : Array.isArray(targets) && targets.length > 0 && targets.every(isString)
        ? targets
        : fail(`"target_modules" must be a regular expression or a non-empty list of module names, got ${JSON.stringify(targets)}`);
  const patterns = (key: string) => field(key, isNumberRecord, "an object of pattern -> number", {});
  const config: PeftLoraConfig = {
    path,
    peftType: mix ? "MIXLORA" : "LORA",
    baseModel: field<string | null>("base_model_name_or_path", (v): v is string | null => v === null || isString(v), "a string", null),
    r: field("r", isPositiveInt, "a positive integer", PEFT_DEFAULTS.r),
    loraAlpha: field("lora_alpha", isPositive, "a positive number", PEFT_DEFAULTS.loraAlpha),
    loraDropout: field("lora_dropout", isProbability, "a number from 0 to 1", PEFT_DEFAULTS.loraDropout),
    targetModules,
    layersToTransform,
    rankPattern: patterns("rank_pattern"),
    alphaPattern: patterns("alpha_pattern"),
    useRslora: field("use_rslora", isBoolean, "true or false", false),
    useDora: field("use_dora", isBoolean, "true or false", false),
  };
  if (mix && config.useDora) fail(doraRefusal("use_dora"));
  // every pattern is compiled now, so a bad one is reported whether or not a module would reach it
  if (isString(targetModules) && targetModules !== "all-linear") compilePattern(targetModules, targetModules, "target_modules", path);
  for (const table of ["rank_pattern", "alpha_pattern"] as const) {
    const keys = Object.keys(table === "rank_pattern" ? config.rankPattern : config.alphaPattern);
    if (keys.length > MAX_PATTERN_KEYS) fail(`"${table}" has ${keys.length} keys; milora reads at most ${MAX_PATTERN_KEYS} (a ${MAX_LAYERS}-layer base has ${MAX_LAYERS * EXPERT_MODULES.length} modules)`);
    for (const key of keys) compilePattern(`(.*\\.)?(${key})$`, key, `${table} key`, path);
  }
  if (config.r > MAX_RANK) fail(`"r" is ${config.r}, above milora's limit of ${MAX_RANK}`);
  for (const [key, value] of Object.entries(config.rankPattern)) {
    if (!isPositiveInt(value)) fail(`rank_pattern "${key}": rank must be a positive integer, got ${value}`);
    if (value > MAX_RANK) fail(`rank_pattern "${key}": rank ${value} is above milora's limit of ${MAX_RANK}`);
  }
  for (const [key, value] of Object.entries(config.alphaPattern)) {
    if (!isPositive(value)) fail(`alpha_pattern "${key}": alpha must be a positive number, got ${value}`);
  }
  const withMix = mix ? { ...config, mixlora: parseMixLora(json, config, fail) } : config;
  return json.milora === undefined || json.milora === null ? withMix : { ...withMix, milora: parseMiloraSection(json.milora, fail) };
}

/** MixLoRA's legacy projection names (its misc/legacy_weights_convertor.py maps them the same way). */
const LEGACY_PROJ_NAMES: Readonly<Record<string, ExpertModule>> = { w1_proj: "gate_proj", w2_proj: "down_proj", w3_proj: "up_proj" };

/**
 * A MIXLORA config's target_modules: a list of module names, or an object of name -> true/false (MoE-PEFT's
 * own form), as the list of names set. Legacy names (w1_proj, w2_proj, w3_proj) become today's.
 */
function mixloraTargets(targets: unknown, fail: (what: string) => never): string[] {
  const want = "a list of module names or an object of module name -> true/false";
  let names: string[];
  if (Array.isArray(targets) && targets.every(isString)) names = targets;
  else if (isObject(targets) && Object.values(targets).every(isBoolean)) names = Object.keys(targets).filter((k) => targets[k] === true);
  else return fail(`"target_modules" must be ${want} in a MIXLORA config, got ${JSON.stringify(targets)}`);
  if (names.length === 0) fail(`"target_modules" names no module, got ${JSON.stringify(targets)}`);
  return [...new Set(names.map((n) => LEGACY_PROJ_NAMES[n] ?? n))];
}

/** What each refused MixLoRA routing strategy does, for its message. */
const REFUSED_STRATEGIES: Readonly<Record<string, string>> = {
  "mixlora-dynamic":
    "it keeps a varying number of experts per token (top-p over the router's probabilities, with a temperature), while milora's per_ffn router keeps a fixed top_k or every expert",
  "mixlora-switch":
    "it is Switch Transformers' top-1 router with an expert capacity that drops the tokens over it, while milora's per_ffn router keeps top_k renormalised experts for every token",
};

/** The MixLoRA fields of a MIXLORA config (MoE-PEFT's MixLoraConfig.from_config, with its defaults). */
function parseMixLora(json: Record<string, unknown>, top: Pick<PeftLoraConfig, "r" | "loraAlpha" | "loraDropout" | "useRslora">, fail: (what: string) => never): MixLoraFields {
  const strategy = json.routing_strategy;
  if (isString(strategy) && Object.hasOwn(REFUSED_STRATEGIES, strategy)) {
    fail(`"routing_strategy": ${JSON.stringify(strategy)} is not supported: ${REFUSED_STRATEGIES[strategy]}; milora reads "mixlora" and "mixtral" (top-k routing)`);
  }
  if (strategy !== "mixlora" && strategy !== "mixtral") {
    fail(`"routing_strategy" must be "mixlora" (or "mixtral", the MixLoRA package's name for the same top-k router), got ${JSON.stringify(strategy)}`);
  }
  const numExperts = json.num_experts;
  if (!Number.isSafeInteger(numExperts) || (numExperts as number) < 2 || (numExperts as number) > MAX_MOE_EXPERTS) {
    fail(`"num_experts" must be an integer from 2 to ${MAX_MOE_EXPERTS}, got ${JSON.stringify(numExperts)}`);
  }
  const topK = json.top_k ?? 2;
  if (!Number.isSafeInteger(topK) || (topK as number) < 1 || (topK as number) > (numExperts as number)) {
    fail(`"top_k" must be an integer from 1 to num_experts (${numExperts}), got ${JSON.stringify(topK)}`);
  }
  const balance = json.router_aux_loss_coef ?? 0.001;
  if (!isNonNegative(balance)) fail(`"router_aux_loss_coef" must be a number >= 0, got ${JSON.stringify(balance)}`);
  const actFn = json.act_fn ?? null;
  if (actFn !== null && !isString(actFn)) fail(`"act_fn" must be an activation name, got ${JSON.stringify(actFn)}`);
  // router_init_range and jitter_noise only matter in training (the router's initialisation, noise on its input).
  const raw = json.expert_lora ?? {};
  if (!isObject(raw)) return fail(`"expert_lora" must be an object of LoRA fields (r, lora_alpha, lora_dropout), got ${JSON.stringify(raw)}`);
  const get = <T>(key: string, ok: (v: unknown) => v is T, want: string, fallback: T): T => {
    const v = raw[key];
    if (v === undefined || v === null) return fallback;
    return ok(v) ? v : fail(`"expert_lora.${key}" must be ${want}, got ${JSON.stringify(v)}`);
  };
  if (raw.use_dora === true) fail(doraRefusal("expert_lora.use_dora"));
  const expert: MixLoraOptions = {
    r: get("r", isPositiveInt, "a positive integer", top.r),
    loraAlpha: get("lora_alpha", isPositive, "a positive number", top.loraAlpha),
    loraDropout: get("lora_dropout", isProbability, "a number from 0 to 1", top.loraDropout),
    useRslora: get("use_rslora", isBoolean, "true or false", top.useRslora),
  };
  if (expert.r > MAX_RANK) fail(`"expert_lora.r" is ${expert.r}, above milora's limit of ${MAX_RANK}`);
  return { routingStrategy: strategy as "mixlora" | "mixtral", numExperts: numExperts as number, topK: topK as number, balance: balance as number, actFn: actFn as string | null, expert };
}

function doraRefusal(key: string): string {
  return `"${key}": true is not supported in a MixLoRA adapter: a DoRA magnitude belongs to a whole module, not to one of the experts that share it (milora's per_ffn router takes plain LoRA experts)`;
}

function parseMiloraSection(raw: unknown, fail: (what: string) => never): MiloraSection {
  const where = (key: string) => `"milora.${key}"`;
  if (!isObject(raw)) return fail(`${where("")} must be an object`);
  if (raw.version === 1) fail(version1Message(raw.router));
  if (raw.version !== MILORA_SECTION_VERSION) fail(`${where("version")} is ${JSON.stringify(raw.version)}; this milora reads version ${MILORA_SECTION_VERSION}`);
  const router = raw.router;
  if (!isObject(router)) return fail(`${where("router")} must be an object`);
  const routing: Pick<MiloraSection, "router" | "moe"> =
    router.placement === "per_module" || router.placement === "per_ffn"
      ? { moe: parseMoeRouter(router, router.placement, where, fail) }
      : { router: parseLayerRouter(router, where, fail) };
  const experts = new Map<number, ExpertModule[]>();
  if (!isObject(raw.experts)) return fail(`${where("experts")} must be an object of layer -> module list`);
  for (const [layer, modules] of Object.entries(raw.experts)) {
    const inOrder = EXPERT_MODULES.filter((m) => Array.isArray(modules) && modules.includes(m));
    if (!/^\d+$/.test(layer) || !Array.isArray(modules) || modules.length === 0 || inOrder.length !== modules.length || modules.some((m, i) => m !== inOrder[i])) {
      fail(`${where(`experts.${layer}`)} must map a layer number to distinct module names in the order ${EXPERT_MODULES.join(", ")}, got ${JSON.stringify(modules)}`);
    }
    experts.set(Number(layer), inOrder);
  }
  return {
    version: MILORA_SECTION_VERSION,
    specHash: isString(raw.spec_hash) ? raw.spec_hash : fail(`${where("spec_hash")} must be a string`),
    adapter: isString(raw.adapter) ? raw.adapter : fail(`${where("adapter")} must be a string`),
    ...routing,
    experts,
  };
}

/** MiLoRA's per-layer router of a `milora` section. */
function parseLayerRouter(router: Record<string, unknown>, where: (key: string) => string, fail: (what: string) => never): RouterConfig {
  const choice = <C extends string>(key: string, choices: readonly C[]): C => {
    const v = router[key];
    return (choices as readonly unknown[]).includes(v) ? (v as C) : fail(`${where(`router.${key}`)} must be one of ${choices.join(", ")}, got ${JSON.stringify(v)}`);
  };
  const activation = choice<Activation>("activation", ["none", "gelu", "relu", "rational"]);
  const rational = router.rational;
  if (activation === "rational") {
    const [nLo, nHi] = RATIONAL_ORDER_LIMITS.numerator;
    const [dLo, dHi] = RATIONAL_ORDER_LIMITS.denominator;
    const order = (v: unknown, lo: number, hi: number) => Number.isSafeInteger(v) && (v as number) >= lo && (v as number) <= hi;
    if (!isObject(rational) || !order(rational.numerator, nLo, nHi) || !order(rational.denominator, dLo, dHi)) {
      fail(`${where("router.rational")} must be {"numerator": M, "denominator": N} with M from ${nLo} to ${nHi} and N from ${dLo} to ${dHi} for activation "rational", got ${JSON.stringify(rational)}`);
    }
  } else if (rational !== undefined) fail(`${where("router.rational")} is only for activation "rational" (the activation is ${JSON.stringify(activation)})`);
  const balance = router.balance;
  if (!isNonNegative(balance)) return fail(`${where("router.balance")} must be a number >= 0, got ${JSON.stringify(balance)}`);
  if (!isBoolean(router.noise)) return fail(`${where("router.noise")} must be true or false`);
  return {
    placement: choice("placement", ["per_layer"] as const),
    input: choice("input", ["layer_input"] as const),
    pooling: choice<Pooling>("pooling", ["last", "mean", "max", "attention"]),
    selection: parseSelection(router.selection, (what) => fail(`${where("router.selection")} ${what}`)),
    activation,
    ...(activation === "rational" ? { rational: { numerator: (rational as { numerator: number }).numerator, denominator: (rational as { denominator: number }).denominator } } : {}),
    when: choice<RoutingTime>("when", ["prompt", "token"]),
    noise: router.noise,
    balance,
  };
}

/** The keys of a per_module or per_ffn router in a `milora` section (moeRouterJson writes them). */
const MOE_ROUTER_KEYS = ["placement", "num_experts", "selection", "balance"];

/** A per-token baseline's router of a `milora` section: `{"placement", "num_experts", "selection", "balance"}`. */
function parseMoeRouter(router: Record<string, unknown>, placement: MoePlacement, where: (key: string) => string, fail: (what: string) => never): MoeRouting {
  const other = Object.keys(router).find((k) => !MOE_ROUTER_KEYS.includes(k));
  if (other !== undefined) fail(`${where(`router.${other}`)} is not a key of a ${placement} router (its keys: ${MOE_ROUTER_KEYS.join(", ")})`);
  const experts = router.num_experts;
  if (!Number.isSafeInteger(experts) || (experts as number) < 2 || (experts as number) > MAX_MOE_EXPERTS) {
    fail(`${where("router.num_experts")} must be an integer from 2 to ${MAX_MOE_EXPERTS}, got ${JSON.stringify(experts)}`);
  }
  const selection = parseSelection(router.selection, (what) => fail(`${where("router.selection")} ${what}`));
  if (selection.rule === "threshold") fail(`${where("router.selection")} of a ${placement} router must be top_k or dense, got threshold`);
  if (selection.rule === "top_k" && selection.k > (experts as number)) fail(`${where("router.selection")}: top_k ${selection.k} is larger than num_experts ${experts}`);
  const balance = router.balance;
  if (!isNonNegative(balance)) fail(`${where("router.balance")} must be a number >= 0, got ${JSON.stringify(balance)}`);
  return { placement, experts: experts as number, selection: selection as MoeRouting["selection"], balance: balance as number };
}

/**
 * Why a version 1 `milora` section is refused: what its numbers meant then, and whether editing the
 * config converts it exactly.
 */
function version1Message(router: unknown): string {
  const r = isObject(router) ? router : {};
  const selection = isObject(r.selection) ? r.selection : {};
  const gated = selection.rule === "top_k" || selection.rule === "threshold";
  const changes = [
    "the attention pooler was a [hidden, hidden] projection with tanh and a score vector (milora_pooler.proj / milora_pooler.v); it is now the paper's self-attention pooler, one vector w_sa (milora_pooler.weight [1, hidden])",
    "top_k and threshold gates were renormalised over the chosen experts; they are now the chosen experts' softmax probabilities over all experts, unless the selection says \"renormalize\": true",
    "the activation was applied to each token's state before pooling; it now acts on the pooled vector",
  ];
  let how: string;
  if (r.pooling === "attention") {
    how = "this adapter pools with attention, whose weights have no equivalent in the new pooler: it cannot be converted and must be retrained (or re-exported with pooling last, mean or max)";
  } else if (r.activation !== undefined && r.activation !== "none" && r.pooling !== "last" && r.when !== "token") {
    how = `this adapter applies ${JSON.stringify(r.activation)} before ${JSON.stringify(r.pooling)} pooling, which the new router cannot express exactly: retrain it, or convert as below and accept that the activation now follows the pooling`;
  } else {
    how = "this adapter converts exactly: in adapter_config.json set \"milora.version\" to 2" + (gated ? ' and add "renormalize": true to "milora.router.selection" (keeping the gates it was trained with)' : "");
  }
  return `"milora.version" is 1, written by an older milora whose router meant something else: ${changes.map((c, i) => `(${i + 1}) ${c}`).join("; ")}. ${how[0]!.toUpperCase()}${how.slice(1)}.`;
}

function parseSelection(raw: unknown, fail: (what: string) => never): Selection {
  const want = 'must be {"rule": "top_k", "k": K, "renormalize": R}, {"rule": "threshold", "threshold": T, "renormalize": R} or {"rule": "dense"} (R true or false, false when absent)';
  if (!isObject(raw)) return fail(want);
  const renormalize = raw.renormalize ?? false;
  if (raw.rule !== "dense" && !isBoolean(renormalize)) return fail(`${want}, got ${JSON.stringify(raw)}`);
  if (raw.rule === "top_k" && isPositiveInt(raw.k)) return { rule: "top_k", k: raw.k, renormalize: renormalize as boolean };
  if (raw.rule === "threshold" && isProbability(raw.threshold)) return { rule: "threshold", threshold: raw.threshold, renormalize: renormalize as boolean };
  if (raw.rule === "dense") return { rule: "dense" };
  return fail(`${want}, got ${JSON.stringify(raw)}`);
}

// PEFT matches these patterns with Python's `re`; milora matches them with RE2 (the re2js port), whose
// time is linear in the module name whatever the pattern, so a config such as `"(.*.*)*x"` cannot hang a
// run. The two engines agree on the syntax PEFT configs use (literals, `.`, classes, `|`, groups, `*+?{m,n}`,
// `^$` on names without newlines); RE2 refuses backreferences and lookaround, which get a clear error.
// PEFT's rules (huggingface/peft, src/peft/utils/other.py, read at commit 5d602fd):
//   target_modules as a string: `match_target_against_key` = `re.fullmatch(target_modules, key)`;
//   rank_pattern / alpha_pattern: `get_pattern_key` = the first key with `re.match(rf"(.*\.)?({key})$", name)`.
const compiled = new Map<string, RE2JS>();

/** An RE2 program for a pattern a config gives; one that RE2 cannot compile is an error naming file, key and pattern. */
function compilePattern(source: string, pattern: string, what: string, file: string): RE2JS {
  const known = compiled.get(source);
  if (known !== undefined) return known;
  let re: RE2JS;
  try {
    re = RE2JS.compile(source);
  } catch (e) {
    const why = (e as Error).message.replace(/^error parsing regexp: /, "");
    throw new CheckpointError(
      `${file}: ${what} ${JSON.stringify(pattern)} is not a regular expression milora can match (${why}); ` +
        "milora matches module names in linear time (RE2 syntax), without backreferences or lookaround",
    );
  }
  if (compiled.size >= 1024) compiled.clear();
  compiled.set(source, re);
  return re;
}

/**
 * The value a pattern table gives a module, PEFT's way: the first key `k` for which `(.*\.)?(k)$` matches
 * the module path from its start, so `q_proj` and `layers.3.self_attn.q_proj` both work.
 */
function patternValue(table: Readonly<Record<string, number>>, path: string, fallback: number, tableName: string, file: string): number {
  for (const [key, value] of Object.entries(table)) {
    // re.match anchors at the start and the pattern ends in `$`: a full match of the name
    if (compilePattern(`(.*\\.)?(${key})$`, key, `${tableName} key`, file).matches(path)) return value;
  }
  return fallback;
}

/** Whether PEFT would put a LoRA on the module at `path`. */
function isTargeted(config: PeftLoraConfig, layer: number, path: string): boolean {
  if (config.layersToTransform !== null && !config.layersToTransform.includes(layer)) return false;
  const t = config.targetModules;
  if (typeof t === "string") {
    return t === "all-linear" || compilePattern(t, t, "target_modules", config.path).matches(path);
  }
  return t.some((name) => path === name || path.endsWith(`.${name}`));
}

/**
 * The LoRA options the PEFT fields give one module (the rank is checked against the tensors later). In a
 * MIXLORA config an MLP module's experts take `expert_lora` over the top-level fields (MoE-PEFT's rule).
 */
export function configLoraOptions(config: PeftLoraConfig, base: BaseModel, layer: number, module: ExpertModule): Omit<LoraOptions, "scaling"> {
  const path = modulePath(base, layer, module);
  const group = groupOptions(config, module);
  return {
    rank: patternValue(config.rankPattern, path, group.r, "rank_pattern", config.path),
    alpha: patternValue(config.alphaPattern, path, group.loraAlpha, "alpha_pattern", config.path),
    dropout: group.loraDropout,
    rslora: group.useRslora,
    ...(config.useDora ? { dora: true as const } : {}),
  };
}

/** The defaults a module takes before rank_pattern and alpha_pattern: a MixLoRA MLP expert's, or the config's. */
function groupOptions(config: PeftLoraConfig, module: ExpertModule): MixLoraOptions {
  return config.mixlora && FFN_MODULES.includes(module) ? config.mixlora.expert : config;
}

/**
 * The activation names (transformers' ACT2FN) that compute what a family's MLP computes: a MixLoRA
 * expert's `act_fn` must be one of them (milora runs every expert with the base's own activation).
 */
const ACT_FN_NAMES: Readonly<Record<"silu" | "gelu_tanh", readonly string[]>> = {
  silu: ["silu", "swish"],
  gelu_tanh: ["gelu_pytorch_tanh", "gelu_new", "gelu_fast"],
};

/** The per_ffn routing a MIXLORA config describes, after checking it against the base. */
function mixloraRouting(config: PeftLoraConfig, mix: MixLoraFields, base: BaseModel): MoeRouting {
  const activation = familyOf(base).architecture.activation;
  const accepted = ACT_FN_NAMES[activation];
  if (mix.actFn !== null && !accepted.includes(mix.actFn)) {
    throw new CheckpointError(
      `${config.path}: "act_fn": ${JSON.stringify(mix.actFn)} is not the MLP activation of base ${base.name} (family ${base.family}, ${activation}; accepted: ${accepted.map((a) => JSON.stringify(a)).join(", ")}, or no act_fn): milora runs MixLoRA's experts with the base's own activation`,
    );
  }
  return { placement: "per_ffn", experts: mix.numExperts, selection: { rule: "top_k", k: mix.topK, renormalize: true }, balance: mix.balance };
}

/** The per-token routing of a config: its milora section's, or a MIXLORA config's own fields; undefined for none. */
function moeRouting(config: PeftLoraConfig, section: MiloraSection | undefined, base: BaseModel): MoeRouting | undefined {
  const fail = (what: string): never => {
    throw new CheckpointError(`${config.path}: ${what}`);
  };
  if (!config.mixlora) {
    if (section?.moe?.placement === "per_ffn") fail(`"milora.router" routes per_ffn, whose adapters are stored in MixLoRA's layout ("peft_type": "MIXLORA"), but "peft_type" is ${config.peftType}`);
    return section?.moe;
  }
  const own = mixloraRouting(config, config.mixlora, base);
  if (section?.router) fail(`a MIXLORA config's "milora.router" must route per_ffn, got placement ${section.router.placement}`);
  if (section?.moe && (section.moe.placement !== "per_ffn" || section.moe.experts !== own.experts)) {
    fail(`"milora.router" (placement ${section.moe.placement}, num_experts ${section.moe.experts}) disagrees with the MixLoRA fields (per_ffn, "num_experts": ${own.experts})`);
  }
  return section?.moe ?? own;
}

/** A per-token baseline's rules on the experts a config gives (the checker's MIL218 and MIL219, for files). */
function checkMoeExperts(config: PeftLoraConfig, moe: MoeRouting, experts: readonly ExpertSlot[]): void {
  if (experts.some((e) => e.dora)) throw new CheckpointError(`${config.path}: "use_dora": true with a ${moe.placement} router: a DoRA magnitude belongs to a whole module, not to one of its experts`);
  if (moe.placement === "per_module") {
    const odd = experts.find((e) => e.rank % moe.experts !== 0);
    if (odd) throw new CheckpointError(`${config.path}: layer ${odd.layer} ${odd.module} has rank ${odd.rank}, which does not split into ${moe.experts} per_module experts of equal rank`);
  } else if (!experts.some((e) => FFN_MODULES.includes(e.module))) {
    throw new CheckpointError(`${config.path}: target_modules ${JSON.stringify(config.targetModules)} names none of ${FFN_MODULES.join(", ")}, where MixLoRA's experts live`);
  }
}

/**
 * The spec a config describes. With a `milora` section: its router and per-layer experts. Without one
 * (a plain PEFT adapter): every targeted module of every transformed layer, no router (gate 1); a MIXLORA
 * config without one: a per_ffn spec from its own fields (every targeted module of every layer).
 */
export function specFromConfig(config: PeftLoraConfig, base: BaseModel, name: string, useMilora = true): Adapter {
  const section = useMilora ? config.milora : undefined;
  const enabled = (layer: number): readonly ExpertModule[] =>
    section ? (section.experts.get(layer) ?? []) : EXPERT_MODULES.filter((m) => isTargeted(config, layer, modulePath(base, layer, m)));
  const outside = section ? [...section.experts.keys()].filter((l) => l >= base.layers) : (config.layersToTransform ?? []).filter((l) => l >= base.layers);
  if (outside.length > 0) {
    throw new CheckpointError(`${config.path}: layer ${outside.join(", ")} is outside the base (${base.name} has ${base.layers} layers)`);
  }
  const experts: ExpertSlot[] = [];
  for (let layer = 0; layer < base.layers; layer++) {
    for (const m of enabled(layer)) experts.push(loraSlot(base, layer, m, configLoraOptions(config, base, layer, m)));
  }
  if (experts.length === 0) {
    throw new CheckpointError(
      `${config.path}: target_modules ${JSON.stringify(config.targetModules)} names none of the modules milora adapts (${EXPERT_MODULES.join(", ")})`,
    );
  }
  const moe = moeRouting(config, section, base);
  if (moe) checkMoeExperts(config, moe, experts);
  const at = { offset: 0, line: 1, column: 1 };
  const span: Adapter["span"] = { file: config.path, start: at, end: at };
  return {
    name: section?.adapter ?? name,
    base,
    layers: [...new Set(experts.map((e) => e.layer))],
    experts,
    ...(section?.router ? { router: section.router } : {}),
    ...(moe ? { moe } : {}),
    span,
  };
}

/**
 * The adapter_config.json for a spec: PEFT's fields, and the `milora` section when it is routed; for a
 * per_ffn spec, MoE-PEFT's MIXLORA fields and the `milora` section.
 */
export function configJson(spec: Adapter): Record<string, unknown> {
  if (spec.moe?.placement === "per_ffn") return mixloraConfigJson(spec, spec.moe);
  const { base, experts } = spec;
  const r = mostCommon(experts.map((e) => e.rank));
  const alpha = mostCommon(experts.map((e) => e.alpha));
  const rslora = experts[0]?.rslora ?? false;
  if (experts.some((e) => e.rslora !== rslora)) {
    throw new Error(`adapter ${spec.name}: PEFT stores one use_rslora per adapter, but the spec mixes rsLoRA and plain scaling`);
  }
  // the checker refuses a spec that mixes DoRA and plain modules (MIL216)
  const dora = experts[0]?.dora === true;
  if (experts.some((e) => (e.dora === true) !== dora)) throw new Error(`adapter ${spec.name}: PEFT stores one use_dora per adapter, but the spec mixes DoRA and plain LoRA`);
  const modules = EXPERT_MODULES.filter((m) => experts.some((e) => e.module === m));
  // A list of modules covers every chosen layer; a spec that is not such a grid names each module path.
  const isGrid = experts.length === modules.length * spec.layers.length;
  const allLayers = spec.layers.length === base.layers;
  return {
    peft_type: "LORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: base.configPath ? base.name : null,
    r,
    lora_alpha: alpha,
    lora_dropout: mostCommon(experts.map((e) => e.dropout)),
    target_modules: isGrid ? modules : experts.map((e) => modulePath(base, e.layer, e.module).replaceAll(".", "\\.")).join("|"),
    layers_to_transform: isGrid && !allLayers ? spec.layers : null,
    rank_pattern: exceptions(spec, (e) => e.rank, () => r),
    alpha_pattern: exceptions(spec, (e) => e.alpha, () => alpha),
    use_rslora: rslora,
    use_dora: dora,
    bias: "none",
    fan_in_fan_out: false,
    inference_mode: true,
    ...(spec.router ? { milora: miloraSectionJson(spec, spec.router) } : spec.moe ? { milora: miloraSectionJson(spec, moeRouterJson(spec.moe)) } : {}),
  };
}

/** A per-token baseline's router as the `milora` section writes it. */
function moeRouterJson(moe: MoeRouting): Record<string, unknown> {
  return { placement: moe.placement, num_experts: moe.experts, selection: moe.selection, balance: moe.balance };
}

/**
 * A per_ffn spec's config in MoE-PEFT's MIXLORA form: the top-level LoRA fields for the attention modules,
 * `expert_lora` for the MLP experts where they differ, the router's fields, and the `milora` section (which
 * alone keeps a selection MixLoRA cannot say: dense, or top_k without renormalising, and per-layer modules).
 */
function mixloraConfigJson(spec: Adapter, moe: MoeRouting): Record<string, unknown> {
  const { base, experts } = spec;
  const mlp = experts.filter((e) => FFN_MODULES.includes(e.module));
  const attention = experts.filter((e) => !FFN_MODULES.includes(e.module));
  const group = (slots: readonly ExpertSlot[], what: string): MixLoraOptions => {
    const rslora = slots[0]?.rslora ?? false;
    if (slots.some((e) => e.rslora !== rslora)) throw new Error(`adapter ${spec.name}: MixLoRA stores one use_rslora for the ${what}, but the spec mixes rsLoRA and plain scaling there`);
    return { r: mostCommon(slots.map((e) => e.rank)), loraAlpha: mostCommon(slots.map((e) => e.alpha)), loraDropout: mostCommon(slots.map((e) => e.dropout)), useRslora: rslora };
  };
  const expert = group(mlp, "MLP experts");
  const top = attention.length > 0 ? group(attention, "attention modules") : expert;
  const same = expert.r === top.r && expert.loraAlpha === top.loraAlpha && expert.loraDropout === top.loraDropout && expert.useRslora === top.useRslora;
  const fallback = (m: ExpertModule) => (FFN_MODULES.includes(m) ? expert : top);
  const rankPattern = exceptions(spec, (e) => e.rank, (m) => fallback(m).r);
  const alphaPattern = exceptions(spec, (e) => e.alpha, (m) => fallback(m).loraAlpha);
  return {
    peft_type: "MIXLORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: base.configPath ? base.name : null,
    bias: "none",
    r: top.r,
    lora_alpha: top.loraAlpha,
    lora_dropout: top.loraDropout,
    use_rslora: top.useRslora,
    use_dora: false,
    target_modules: EXPERT_MODULES.filter((m) => experts.some((e) => e.module === m)),
    ...(same ? {} : { expert_lora: { r: expert.r, lora_alpha: expert.loraAlpha, lora_dropout: expert.loraDropout, use_rslora: expert.useRslora } }),
    routing_strategy: "mixlora",
    num_experts: moe.experts,
    // dense keeps every expert with the softmax: top_k E renormalised is the same gates
    top_k: moe.selection.rule === "top_k" ? moe.selection.k : moe.experts,
    router_aux_loss_coef: moe.balance,
    router_init_range: 0.02,
    jitter_noise: 0,
    // milora's own keys, which MixLoRA's readers ignore: only when the spec needs them
    ...(spec.layers.length === base.layers ? {} : { layers_to_transform: spec.layers }),
    ...(Object.keys(rankPattern).length > 0 ? { rank_pattern: rankPattern } : {}),
    ...(Object.keys(alphaPattern).length > 0 ? { alpha_pattern: alphaPattern } : {}),
    inference_mode: true,
    milora: miloraSectionJson(spec, moeRouterJson(moe)),
  };
}

function miloraSectionJson(spec: Adapter, router: RouterConfig | Record<string, unknown>): Record<string, unknown> {
  const experts: Record<string, ExpertModule[]> = {};
  for (const e of spec.experts) (experts[e.layer] ??= []).push(e.module);
  return { version: MILORA_SECTION_VERSION, spec_hash: specHash(spec), adapter: spec.name, router, experts };
}

/** Pattern entries for slots whose value differs from their module's default: by module name when uniform across layers. */
function exceptions(spec: Adapter, value: (e: ExpertSlot) => number, fallbackOf: (m: ExpertModule) => number): Record<string, number> {
  const table: Record<string, number> = {};
  for (const m of EXPERT_MODULES) {
    const fallback = fallbackOf(m);
    const slots = spec.experts.filter((e) => e.module === m);
    const values = new Set(slots.map(value));
    if (values.size === 1 && !values.has(fallback)) table[m] = value(slots[0]!);
    else if (values.size > 1) {
      for (const e of slots) if (value(e) !== fallback) table[modulePath(spec.base, e.layer, m)] = value(e);
    }
  }
  return table;
}

function mostCommon(values: readonly number[]): number {
  const counts = new Map<number, number>();
  for (const v of values) counts.set(v, (counts.get(v) ?? 0) + 1);
  return [...counts].sort((a, b) => b[1] - a[1] || a[0] - b[0])[0]?.[0] ?? 0;
}

/**
 * A short hash of what decides an adapter's tensors and outputs: base dimensions, experts with their
 * LoRA options, and router settings. Training-only settings (dropout, noise, balance) are left out.
 */
export function specHash(spec: Adapter): string {
  const { base, router } = spec;
  const canonical = {
    base: [base.family, base.hiddenSize, base.layers, base.heads, base.kvHeads, base.headDim, base.intermediateSize, base.vocabSize],
    // DoRA is appended only when on, so plain adapters keep the hashes they had before DoRA existed
    experts: spec.experts.map((e) => [e.layer, e.module, e.rank, e.alpha, e.rslora, ...(e.dora ? ["dora"] : [])]),
    router: router ? [router.placement, router.input, router.pooling, router.selection, router.activation, router.rational ?? null, router.when] : null,
    // appended only for a per-token baseline, so the hashes of other adapters are unchanged
    ...(spec.moe ? { moe: [spec.moe.placement, spec.moe.experts, spec.moe.selection] } : {}),
  };
  return `sha256:${createHash("sha256").update(JSON.stringify(canonical)).digest("hex").slice(0, 16)}`;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
function isString(v: unknown): v is string {
  return typeof v === "string";
}
function isBoolean(v: unknown): v is boolean {
  return typeof v === "boolean";
}
function isCount(v: unknown): v is number {
  return Number.isSafeInteger(v) && (v as number) >= 0;
}
function isPositiveInt(v: unknown): v is number {
  return Number.isSafeInteger(v) && (v as number) > 0;
}
function isPositive(v: unknown): v is number {
  return typeof v === "number" && Number.isFinite(v) && v > 0;
}
function isNonNegative(v: unknown): v is number {
  return typeof v === "number" && Number.isFinite(v) && v >= 0;
}
function isProbability(v: unknown): v is number {
  return isNonNegative(v) && v <= 1;
}
function isNumberRecord(v: unknown): v is Record<string, number> {
  return isObject(v) && Object.values(v).every((x) => typeof x === "number" && Number.isFinite(x));
}
