// Hugging Face config.json (LlamaConfig keys) -> a base model. Used by `base NAME from "config.json"`
// in specs, and by the runtime when it is given a model directory without a spec.
import { readFileSync } from "node:fs";
import { basename, dirname, resolve } from "node:path";
import type { Span } from "../grammar/ast.ts";
import type { Diagnostic } from "../grammar/diagnostic.ts";
import { BASE_KEYS, BASE_KEY_NAMES, completeSettings, shapeProblems, type BaseSettings } from "./base-keys.ts";
import { familyForModelType, supportedModelTypes, type Family } from "./families.ts";
import type { CheckCode } from "./codes.ts";
import { derivedHeadDimProblem, limitBroken } from "./limits.ts";
import { jsonSyntaxReason } from "./json-syntax.ts";
import type { BaseModel } from "./model.ts";
import { completeRopeScaling, hfRopeScaling, type RopeScalingSetting } from "./rope-scaling.ts";
import { userError } from "../runtime/errors.ts";

const LIMIT_HINT = "no released model comes near it: check the file (milora's limits are listed in docs/reliability.md)";

/** Keys a config must give; the others fall back to the family's defaults (kv heads and head size are derived). */
const REQUIRED_HF_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"];

export interface HfSettings {
  readonly family?: Family;
  readonly settings?: BaseSettings;
  /** rope_scaling, when the config has one (dynamic's original context is completed with the base). */
  readonly ropeScaling?: RopeScalingSetting;
  readonly problems: Diagnostic[];
}

function problem(code: CheckCode, span: Span, message: string, hint?: string): Diagnostic {
  return { code, severity: "error", message, span, ...(hint === undefined ? {} : { hint }) };
}

/** Reads and parses a config.json, reporting a missing, unreadable or non-JSON file at `span`. */
export function loadHfConfigJson(configPath: string, span: Span): { json?: unknown; problems: Diagnostic[] } {
  let text: string;
  try {
    text = readFileSync(configPath, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const reason = code === "ENOENT" ? "no such file" : code === "EISDIR" ? "it is a directory" : (err as Error).message;
    return { problems: [problem("MIL303", span, `cannot read config ${configPath}: ${reason}`)] };
  }
  try {
    return { json: JSON.parse(text), problems: [] };
  } catch (err) {
    return { problems: [problem("MIL304", span, `config ${configPath} is not valid JSON: ${jsonSyntaxReason(err, text)}`)] };
  }
}

/** The base settings a parsed config.json gives, before any overrides from the spec. */
export function hfConfigSettings(json: unknown, configPath: string, span: Span): HfSettings {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    return { problems: [problem("MIL304", span, `config ${configPath} is not a JSON object`)] };
  }
  const config = json as Record<string, unknown>;
  const supported = supportedModelTypes()
    .map((t) => `"${t}"`)
    .join(", ");
  const modelType = config["model_type"];
  if (typeof modelType !== "string") {
    return { problems: [problem("MIL305", span, `config ${configPath} has no model_type`, `supported: ${supported}`)] };
  }
  const family = familyForModelType(modelType);
  if (family === undefined) {
    return {
      problems: [
        problem(
          "MIL305",
          span,
          `config ${configPath} has model_type "${modelType}", which milora does not support`,
          `supported: ${supported}`,
        ),
      ],
    };
  }

  const problems = unsupportedOptions(config, family, configPath, span);
  const missing = REQUIRED_HF_KEYS.filter((k) => config[k] === undefined || config[k] === null);
  if (missing.length > 0) {
    problems.push(problem("MIL306", span, `config ${configPath} lacks ${missing.join(", ")}`));
  }
  const settings: BaseSettings = {};
  for (const key of BASE_KEY_NAMES) {
    const { hf, field, kind } = BASE_KEYS[key];
    const value = config[hf];
    if (value === undefined || value === null) continue;
    const ok =
      kind === "boolean"
        ? typeof value === "boolean"
        : typeof value === "number" && Number.isFinite(value) && value > 0 && (kind === "positive" || Number.isInteger(value));
    if (!ok) {
      const expected = { count: "a positive integer", positive: "a positive number", boolean: "true or false" }[kind];
      problems.push(
        problem("MIL306", span, `${hf} in config ${configPath} must be ${expected}, got ${typeof value === "number" ? String(value) : JSON.stringify(value)}`),
      );
      continue;
    }
    const limit = typeof value === "number" ? limitBroken(field, value) : undefined;
    if (limit !== undefined) {
      problems.push(problem("MIL308", span, `${hf} in config ${configPath} is ${value}, above milora's limit of ${limit}`, LIMIT_HINT));
      continue;
    }
    (settings as Record<string, unknown>)[field] = value;
  }
  // Only a family that reads sliding_window takes it: qwen2's applies only with use_sliding_window.
  if (family.slidingWindow !== "sliding_window") delete settings.slidingWindow;
  const rope = hfRopeScaling(config, configPath);
  problems.push(...rope.problems.map((p) => problem(p.code, span, p.message)));
  if (problems.length > 0) return { family, problems };
  return { family, settings, ...(rope.scaling ? { ropeScaling: rope.scaling } : {}), problems };
}

function unsupportedOptions(config: Record<string, unknown>, family: Family, configPath: string, span: Span): Diagnostic[] {
  const found: string[] = [];
  const { keys, accepts } = family.activationKeys;
  const actKey = keys.find((k) => config[k] !== undefined && config[k] !== null);
  if (actKey !== undefined && !accepts.includes(config[actKey] as string))
    found.push(`${actKey} ${JSON.stringify(config[actKey])} (milora implements ${accepts.join(", ")} for ${family.name})`);
  if (family.slidingWindow === "use_sliding_window" && config["use_sliding_window"] === true)
    found.push(`use_sliding_window true (milora runs ${family.name} with full attention in every layer)`);
  if (config["attention_bias"] === true) found.push("attention_bias true");
  if (config["mlp_bias"] === true) found.push("mlp_bias true");
  return found.map((what) => problem("MIL307", span, `config ${configPath} uses an unsupported option: ${what}`));
}

/** Completes settings into a base model, reporting impossible attention shapes at `span`. */
export function baseFromHfConfig(
  json: unknown,
  name: string,
  configPath: string,
  span: Span,
): { base?: BaseModel; problems: Diagnostic[] } {
  const { family, settings, ropeScaling, problems } = hfConfigSettings(json, configPath, span);
  if (family === undefined || settings === undefined) return { problems };
  const complete = completeSettings(settings, family.defaults);
  const shape = shapeProblems(settings, complete).map((p) =>
    problem(p.code, span, `config ${configPath}: ${p.message}`),
  );
  if (shape.length > 0) return { problems: shape };
  const headDim = derivedHeadDimProblem(settings, complete);
  if (headDim !== undefined) return { problems: [problem("MIL308", span, `config ${configPath}: ${headDim}`, LIMIT_HINT)] };
  return {
    base: {
      name,
      family: family.name,
      ...complete,
      ...(ropeScaling === undefined ? {} : { ropeScaling: completeRopeScaling(ropeScaling, complete.maxPositions) }),
      configPath: resolve(configPath),
      span,
    },
    problems: [],
  };
}

/**
 * The base model described by a config.json (or a model directory holding one), named after its directory.
 * Throws a MiloraError (kind checkpoint) listing every problem; meant for callers without a spec, such as `milora run --base DIR`.
 */
export function readHfConfig(path: string): BaseModel {
  const configPath = path.endsWith(".json") ? path : resolve(path, "config.json");
  const at = { offset: 0, line: 1, column: 1 };
  const span: Span = { file: configPath, start: at, end: at };
  const loaded = loadHfConfigJson(configPath, span);
  const { base, problems } =
    loaded.json === undefined
      ? { base: undefined, problems: loaded.problems }
      : baseFromHfConfig(loaded.json, basename(dirname(resolve(configPath))), configPath, span);
  if (base === undefined) {
    throw userError("checkpoint", problems.map((p) => p.message + (p.hint ? ` (${p.hint})` : "")).join("\n"));
  }
  return base;
}
