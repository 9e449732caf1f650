// The expert modules of a layer: how `experts` patterns name them (their shapes: families.ts).
import { EXPERT_MODULES, type ExpertModule } from "./model.ts";

/** `attn.*` and `mlp.*`: the modules of the attention block and of the feed-forward block. */
export const MODULE_GROUPS = {
  attn: ["q_proj", "k_proj", "v_proj", "o_proj"],
  mlp: ["gate_proj", "up_proj", "down_proj"],
} as const satisfies Record<string, readonly ExpertModule[]>;

/** Every way a pattern may be written, for "did you mean". */
export const PATTERN_SPELLINGS = [...EXPERT_MODULES, ...Object.keys(MODULE_GROUPS).map((g) => `${g}.*`), "all"];

/** The modules a pattern names, or undefined when it names none. */
export function modulesOfPattern(name: string, wildcard: boolean): readonly ExpertModule[] | undefined {
  if (wildcard)
    return Object.hasOwn(MODULE_GROUPS, name) ? MODULE_GROUPS[name as keyof typeof MODULE_GROUPS] : undefined;
  if (name === "all") return EXPERT_MODULES;
  return (EXPERT_MODULES as readonly string[]).includes(name) ? [name as ExpertModule] : undefined;
}
