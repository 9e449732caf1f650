// rope_scaling, Hugging Face's rotary scaling (transformers' modeling_rope_utils.py): read from a
// config.json's `rope_scaling` object or from a base block's `rope_scaling TYPE { ... }` entry, checked
// the same way for both, and the longest context it lets a base plan. The formulas are in rope.ts's
// kernel and docs/language.md, "RoPE scaling".
import type { Property } from "../grammar/ast.ts";
import { ROPE_SCALING_TYPES, type RopeScaling } from "../runtime/package/format.ts";
import { BASE_LIMITS } from "./limits.ts";
import type { Reporter } from "./reporter.ts";
import { didYouMean } from "./suggest.ts";
import { describeValue, knownProperties, numberValue } from "./values.ts";

export type RopeScalingType = RopeScaling["type"];

/**
 * A rope_scaling before its base is complete: dynamic scales from the base's max_positions, which a
 * spec may still override, so it is filled in by completeRopeScaling.
 */
export type RopeScalingSetting = Exclude<RopeScaling, { type: "dynamic" }> | { readonly type: "dynamic"; readonly factor: number };

type OptionField = "factor" | "lowFreqFactor" | "highFreqFactor" | "originalMaxPositions";

interface OptionKey {
  readonly field: OptionField;
  /** The key's name in config.json. */
  readonly hf: string;
}

/** The options of a spec's `rope_scaling` entry, milora's names (as `max_positions` is milora's for max_position_embeddings). */
const OPTION_KEYS: Readonly<Record<string, OptionKey>> = {
  factor: { field: "factor", hf: "factor" },
  low_freq_factor: { field: "lowFreqFactor", hf: "low_freq_factor" },
  high_freq_factor: { field: "highFreqFactor", hf: "high_freq_factor" },
  original_max_positions: { field: "originalMaxPositions", hf: "original_max_position_embeddings" },
};

/** Each type's options, all required (Hugging Face's required keys; dynamic's original context is max_positions). */
const TYPE_OPTIONS: Readonly<Record<RopeScalingType, readonly string[]>> = {
  linear: ["factor"],
  dynamic: ["factor"],
  llama3: ["factor", "low_freq_factor", "high_freq_factor", "original_max_positions"],
};

/** rope_type values transformers knows that milora does not implement, refused by name. */
const UNSUPPORTED_TYPES = ["yarn", "longrope", "ntk", "mrope", "su"];

/** Why an option's value is not accepted, or undefined. `options` are the other values given, for high > low. */
function valueProblem(field: OptionField, value: number, options: Partial<Record<OptionField, number>>): string | undefined {
  if (!Number.isFinite(value)) return "must be a finite number";
  switch (field) {
    case "factor":
      return value >= 1 ? undefined : "must be a number >= 1";
    case "lowFreqFactor":
      return value > 0 ? undefined : "must be a number > 0";
    case "highFreqFactor": {
      if (!(value > 0)) return "must be a number > 0";
      const low = options.lowFreqFactor;
      return low === undefined || value > low ? undefined : `must be above low_freq_factor ${low}`;
    }
    case "originalMaxPositions":
      if (!Number.isInteger(value) || value < 1) return "must be a positive integer";
      return value > BASE_LIMITS.maxPositions! ? `is above milora's limit of ${BASE_LIMITS.maxPositions}` : undefined;
  }
}

function settingOf(type: RopeScalingType, options: Partial<Record<OptionField, number>>): RopeScalingSetting {
  const { factor, lowFreqFactor, highFreqFactor, originalMaxPositions } = options as Record<OptionField, number>;
  if (type !== "llama3") return { type, factor };
  return { type, factor, lowFreqFactor, highFreqFactor, originalMaxPositions };
}

/** A config.json problem: MIL306 for a missing or ill-typed key, MIL307 for what milora does not implement. */
export interface HfRopeProblem {
  readonly code: "MIL306" | "MIL307";
  readonly message: string;
}

/**
 * The rope_scaling of a parsed config.json: undefined for none (absent, null, or rope_type "default").
 * The type is `rope_type`, or the older `type`; keys a type does not use are ignored, as transformers does.
 */
export function hfRopeScaling(config: Readonly<Record<string, unknown>>, configPath: string): { scaling?: RopeScalingSetting; problems: HfRopeProblem[] } {
  const value = config["rope_scaling"];
  if (value === undefined || value === null) return { problems: [] };
  const at = `rope_scaling in config ${configPath}`;
  const fail = (code: HfRopeProblem["code"], message: string) => ({ problems: [{ code, message }] });
  if (typeof value !== "object" || Array.isArray(value)) return fail("MIL306", `${at} must be an object or null, got ${JSON.stringify(value)}`);
  const o = value as Record<string, unknown>;
  const typeKey = o["rope_type"] !== undefined ? "rope_type" : "type";
  const type = o[typeKey];
  if (type === undefined) return fail("MIL306", `${at} has neither rope_type nor type`);
  if (type === "default") return { problems: [] };
  if (typeof type !== "string" || !(ROPE_SCALING_TYPES as readonly string[]).includes(type)) {
    return fail("MIL307", `config ${configPath} uses an unsupported option: rope_scaling ${typeKey} ${JSON.stringify(type)} (milora implements ${ROPE_SCALING_TYPES.join(", ")})`);
  }
  const t = type as RopeScalingType;
  const problems: HfRopeProblem[] = [];
  const options: Partial<Record<OptionField, number>> = {};
  const missing: string[] = [];
  for (const key of TYPE_OPTIONS[t]) {
    const { field, hf } = OPTION_KEYS[key]!;
    const v = o[hf];
    if (v === undefined || v === null) {
      missing.push(hf);
      continue;
    }
    const problem = typeof v === "number" ? valueProblem(field, v, options) : "must be a number";
    if (problem !== undefined) problems.push({ code: "MIL306", message: `${at}: ${hf} ${problem}, got ${JSON.stringify(v)}` });
    else options[field] = v as number;
  }
  if (missing.length > 0) problems.push({ code: "MIL306", message: `${at} lacks ${missing.join(", ")} (rope_type ${t} needs ${TYPE_OPTIONS[t].map((k) => OPTION_KEYS[k]!.hf).join(", ")})` });
  // transformers 4.x scales dynamic NTK from max_position_embeddings and ignores this key (a TODO there);
  // a value that differs would make the model depend on the transformers version, so it is refused.
  const original = o["original_max_position_embeddings"];
  if (t === "dynamic" && original !== undefined && original !== null && original !== config["max_position_embeddings"]) {
    problems.push({
      code: "MIL307",
      message: `config ${configPath} uses an unsupported option: rope_scaling dynamic with original_max_position_embeddings ${JSON.stringify(original)} unlike max_position_embeddings ${JSON.stringify(config["max_position_embeddings"])} (milora, as transformers 4.x, scales dynamic from max_position_embeddings)`,
    });
  }
  return problems.length > 0 ? { problems } : { scaling: settingOf(t, options), problems };
}

/**
 * A base block's `rope_scaling TYPE { OPTIONS }` entry, every problem reported at its place; undefined
 * when it has errors.
 */
export function specRopeScaling(prop: Property, r: Reporter): RopeScalingSetting | undefined {
  const errorsBefore = r.errorCount;
  const [value, extra] = prop.values;
  const types = ROPE_SCALING_TYPES as readonly string[];
  if (value === undefined || extra !== undefined || value.kind !== "Ident") {
    const span = value?.span ?? prop.key.span;
    r.report("MIL201", span, `\`rope_scaling\` takes one type (${types.join(" | ")}) and an options block, got ${prop.values.map(describeValue).join(", ")}`, "e.g. `rope_scaling linear { factor 4 }`");
    return undefined;
  }
  if (!types.includes(value.name)) {
    const unsupported = UNSUPPORTED_TYPES.includes(value.name);
    r.report(
      "MIL104",
      value.span,
      unsupported ? `rope_scaling ${value.name} is not supported` : `unknown rope_scaling \`${value.name}\``,
      unsupported ? `milora implements ${types.join(", ")}` : didYouMean(value.name, types),
    );
    return undefined;
  }
  const type = value.name as RopeScalingType;
  const keys = TYPE_OPTIONS[type];
  const hint = (key: string): string | undefined => {
    const milora = Object.keys(OPTION_KEYS).find((k) => OPTION_KEYS[k]!.hf === key && k !== key);
    if (milora !== undefined && keys.includes(milora)) return `in milora this is \`${milora}\``;
    if (type === "dynamic" && (key === "original_max_positions" || key === "original_max_position_embeddings"))
      return "dynamic scales from the base's max_positions, as Hugging Face does";
    return undefined;
  };
  const options: Partial<Record<OptionField, number>> = {};
  // in the order of TYPE_OPTIONS, so high_freq_factor is checked against a low_freq_factor already read
  const given = knownProperties(prop.options ?? [], keys, `rope_scaling ${type}`, r, hint).sort((a, b) => keys.indexOf(a.key.name) - keys.indexOf(b.key.name));
  for (const option of given) {
    const n = numberValue(option, r);
    if (n === undefined) continue;
    const { field } = OPTION_KEYS[option.key.name]!;
    const problem = valueProblem(field, n.value, options);
    if (problem !== undefined) r.report("MIL214", n.span, `rope_scaling ${type}: \`${option.key.name}\` ${problem}, got ${n.text}`);
    else options[field] = n.value;
  }
  const missing = keys.filter((k) => !given.some((p) => p.key.name === k));
  if (missing.length > 0) {
    r.report("MIL214", prop.key.span, `rope_scaling ${type} lacks ${missing.map((k) => `\`${k}\``).join(", ")}`, `write \`rope_scaling ${type} { ${keys.map((k) => `${k} N`).join(" ")} }\``);
  }
  return r.errorCount > errorsBefore ? undefined : settingOf(type, options);
}

/** The scaling of a complete base with `maxPositions` positions (dynamic scales from them). */
export function completeRopeScaling(setting: RopeScalingSetting, maxPositions: number): RopeScaling {
  return setting.type === "dynamic" ? { ...setting, originalMaxPositions: maxPositions } : setting;
}

/**
 * The longest context a base may plan: max_positions, or for dynamic scaling factor * max_positions
 * (the context the factor is meant for; Hugging Face itself sets no bound).
 */
export function positionLimit(base: { readonly maxPositions: number; readonly ropeScaling?: RopeScaling }): number {
  const s = base.ropeScaling;
  if (s?.type !== "dynamic") return base.maxPositions;
  return Math.min(BASE_LIMITS.maxPositions!, Math.floor(base.maxPositions * s.factor));
}

/** A scaling as a spec writes it, for messages and headers: `rope_scaling llama3 { factor 32 ... }`. */
export function ropeScalingText(s: RopeScaling): string {
  const options = TYPE_OPTIONS[s.type].map((k) => `${k} ${(s as Record<string, number | string>)[OPTION_KEYS[k]!.field]}`);
  return `rope_scaling ${s.type} { ${options.join(" ")} }`;
}
