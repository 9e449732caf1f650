// manifest.json as the compiler writes it. The format itself (types, validation, versions) is
// runtime/package/format.ts, which the runtime reads it with; a written manifest is assignable to it.
import type { AdapterBudget } from "../budget.ts";
import type { Manifest as FormatManifest } from "../../runtime/package/format.ts";
import type { BaseModel, ExpertModule, ExpertSlot, MoeRouting, RouterConfig } from "../model.ts";
import type { Plan } from "../plan.ts";

export {
  compatibleVersions,
  COMPILER_VERSION,
  MANIFEST_FILE,
  MANIFEST_FORMAT,
  type ManifestAdapter,
  type ManifestKernel,
} from "../../runtime/package/format.ts";

/** A base model without its source span and local config path (they name the compiling machine's files). */
export type ManifestBase = Omit<BaseModel, "span" | "configPath">;

/** The manifest as the compiler writes it: the format's, with the compiler's precise types. */
export interface Manifest extends Omit<FormatManifest<ExpertModule>, "base" | "plan" | "budget" | "adapter"> {
  readonly base: ManifestBase;
  readonly adapter: { readonly name: string; readonly extends?: string; readonly layers: readonly number[]; readonly experts: readonly ExpertSlot[]; readonly router?: RouterConfig; readonly moe?: MoeRouting };
  readonly plan: Plan;
  readonly budget: AdapterBudget;
}

/** JSON with object keys sorted at every level, two-space indented, ending in a newline: same data, same bytes. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => (isPlainObject(v) ? sortedKeys(v) : v), 2) + "\n";
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v) && !ArrayBuffer.isView(v);
}

function sortedKeys(o: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.keys(o).sort().map((k) => [k, o[k]]));
}
