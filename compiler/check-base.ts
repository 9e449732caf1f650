// `base` declarations -> BaseModel: a family's defaults or a config.json, then the block's keys on top.
import type { BaseDecl, Property } from "../grammar/ast.ts";
import {
  BASE_KEYS,
  BASE_KEY_NAMES,
  completeSettings,
  miloraNameOfHf,
  shapeProblems,
  type BaseSettings,
} from "./base-keys.ts";
import { FAMILY_NAMES, familyNamed, type Family } from "./families.ts";
import { hfConfigSettings, loadHfConfigJson } from "./hf-config.ts";
import { derivedHeadDimProblem, limitBroken } from "./limits.ts";
import type { BaseModel } from "./model.ts";
import type { Reporter } from "./reporter.ts";
import { completeRopeScaling, specRopeScaling, type RopeScalingSetting } from "./rope-scaling.ts";
import { fromConfigPath } from "./spec-paths.ts";
import { didYouMean } from "./suggest.ts";
import { booleanValue, choiceValue, knownProperties, numberValue } from "./values.ts";
import { WEIGHT_FORMATS } from "../runtime/package/format.ts";

/** The base a declaration describes, or undefined when it has errors (all reported). */
export function checkBase(decl: BaseDecl, specPath: string, r: Reporter): BaseModel | undefined {
  const errorsBefore = r.errorCount;
  const name = decl.name.name;
  const props = knownProperties(decl.properties, [...BASE_KEY_NAMES, "rope_scaling", "weights"], "base", r, hfNameHint);
  for (const prop of props) {
    if (prop.options !== undefined && prop.key.name !== "rope_scaling")
      r.report("MIL215", prop.key.span, `\`${prop.key.name}\` takes no options block`, "only `rope_scaling TYPE { ... }` has options");
  }
  const scalingProp = props.find((prop) => prop.key.name === "rope_scaling");
  // `weights`: how the runtime stores the linear weights (runtime/package/format.ts WEIGHT_FORMATS), no hyper-parameter.
  const weightsProp = props.find((prop) => prop.key.name === "weights");
  const weights = weightsProp === undefined ? undefined : choiceValue(weightsProp, WEIGHT_FORMATS, r);
  const own = settingsOf(props.filter((prop) => prop !== scalingProp && prop !== weightsProp), r);
  const ownScaling = scalingProp === undefined ? undefined : specRopeScaling(scalingProp, r);

  let family: Family | undefined;
  let from: { settings: BaseSettings; configPath: string; ropeScaling?: RopeScalingSetting } | undefined;
  // the parser has made sure exactly one of the two is there
  if (decl.family !== undefined) {
    family = familyNamed(decl.family.name);
    if (family === undefined) {
      r.report(
        "MIL101",
        decl.family.span,
        `unknown family \`${decl.family.name}\``,
        didYouMean(decl.family.name, FAMILY_NAMES),
      );
    }
  } else if (decl.from !== undefined) {
    // a .json file or a model directory holding config.json; anything else is named, never read
    const named = fromConfigPath(specPath, decl.from.value);
    if ("problem" in named) r.report("MIL303", decl.from.span, named.problem);
    const configPath = "path" in named ? named.path : "";
    const loaded = "path" in named ? loadHfConfigJson(configPath, decl.from.span) : { problems: [] };
    const read = loaded.json === undefined ? loaded : hfConfigSettings(loaded.json, configPath, decl.from.span);
    r.diagnostics.push(...read.problems);
    if ("settings" in read && read.settings !== undefined && read.family !== undefined) {
      family = read.family;
      from = { settings: read.settings, configPath, ...(read.ropeScaling ? { ropeScaling: read.ropeScaling } : {}) };
    }
  }
  if (family === undefined || r.errorCount > errorsBefore) return undefined;

  if (own.slidingWindow !== undefined && family.slidingWindow !== "sliding_window") {
    const at = props.find((prop) => prop.key.name === "sliding_window")!;
    r.report("MIL213", at.key.span, `family ${family.name} has no sliding-window attention`, "only mistral bases take sliding_window");
  }
  const settings = { ...from?.settings, ...own };
  const complete = completeSettings(settings, family.defaults);
  for (const p of shapeProblems(settings, complete)) {
    const at = props.find((prop) => prop.key.name === p.key) ?? props.find((prop) => prop.key.name === "heads");
    r.report(p.code, at?.key.span ?? decl.name.span, p.message);
  }
  const headDim = r.errorCount > errorsBefore ? undefined : derivedHeadDimProblem(settings, complete);
  if (headDim !== undefined) {
    const at = props.find((prop) => prop.key.name === "hidden_size") ?? props.find((prop) => prop.key.name === "heads");
    r.report("MIL211", at?.key.span ?? decl.name.span, headDim, "give head_dim, or more heads");
  }
  if (r.errorCount > errorsBefore) return undefined;
  // A spec's rope_scaling replaces the config's whole.
  const scaling = ownScaling ?? from?.ropeScaling;
  return {
    name,
    family: family.name,
    ...complete,
    ...(scaling === undefined ? {} : { ropeScaling: completeRopeScaling(scaling, complete.maxPositions) }),
    ...(weights === undefined ? {} : { weights }),
    ...(from === undefined ? {} : { configPath: from.configPath }),
    span: decl.span,
  };
}

const LIMIT_HINT = "no released model comes near it (milora's limits are listed in docs/reliability.md)";

/** A Hugging Face key written by mistake gets its milora name as the hint. */
function hfNameHint(key: string): string | undefined {
  const milora = miloraNameOfHf(key);
  return milora === undefined ? undefined : `in milora this is \`${milora}\``;
}

function settingsOf(props: readonly Property[], r: Reporter): BaseSettings {
  const settings: Record<string, number | boolean> = {};
  for (const prop of props) {
    const { field, kind } = BASE_KEYS[prop.key.name as keyof typeof BASE_KEYS];
    if (kind === "boolean") {
      const value = booleanValue(prop, r);
      if (value !== undefined) settings[field] = value;
      continue;
    }
    const value = numberValue(prop, r);
    if (value === undefined) continue;
    if (!(value.value > 0 && Number.isFinite(value.value)) || (kind === "count" && !value.integer)) {
      const expected = kind === "count" ? "a positive integer" : "a positive number";
      r.report("MIL205", value.span, `\`${prop.key.name}\` must be ${expected}, got ${value.text}`);
      continue;
    }
    const limit = limitBroken(field, value.value);
    if (limit !== undefined) {
      r.report("MIL211", value.span, `\`${prop.key.name}\` ${value.text} is above milora's limit of ${limit}`, LIMIT_HINT);
      continue;
    }
    settings[field] = value.value;
  }
  return settings as BaseSettings;
}
