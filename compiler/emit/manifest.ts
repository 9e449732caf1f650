// manifest.json: what a compiled package holds, as plain data. The runtime reads only this file and
// the kernel files it names; it refuses a manifest written by a compiler it is not compatible with.
import type { AdapterBudget } from "../budget.ts";
import type { BaseModel, ExpertSlot, RouterConfig } from "../model.ts";
import type { Plan } from "../plan.ts";

/** The milora version this compiler writes into manifests (kept equal to package.json's by a test). */
export const COMPILER_VERSION = "0.1.0";
/**
 * The manifest's layout; bumped when a field changes meaning. 3: the paper's router (selection
 * `renormalize`, `rational` orders, the w_sa pooler's score kernel, the activation after pooling).
 */
export const MANIFEST_FORMAT = 3;
export const MANIFEST_FILE = "manifest.json";

/** A base model without its source span and local config path (they name the compiling machine's files). */
export type ManifestBase = Omit<BaseModel, "span" | "configPath">;

export interface ManifestAdapter {
  readonly name: string;
  readonly extends?: string;
  readonly layers: readonly number[];
  readonly experts: readonly ExpertSlot[];
  /** Absent for plain LoRA (`router off`). */
  readonly router?: RouterConfig;
}

export interface ManifestKernel {
  /** The kernel's cache key, as the plan's ops name it. */
  readonly key: string;
  /** Path of its WGSL file inside the package. */
  readonly file: string;
}

export interface Manifest {
  readonly format: number;
  readonly compiler: { readonly name: "milora"; readonly version: string };
  readonly package: { readonly name: string; readonly version: string };
  /** The spec file (relative to itself: its base name) and the SHA-256 of every source it read. */
  readonly spec: { readonly file: string; readonly sha256: string };
  readonly base: ManifestBase;
  readonly adapter: ManifestAdapter;
  readonly plan: Plan;
  readonly budget: AdapterBudget;
  readonly kernels: readonly ManifestKernel[];
}

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
