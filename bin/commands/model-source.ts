// What `milora run` and `milora serve` run: the base model and adapter specs of a .milora spec, of a
// package `milora compile` wrote, or, given neither, of the checkpoint's own config.json. A spec's or
// package's base must agree with the checkpoint; its adapters are what tenants' weights are checked against.
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { renderDiagnostic } from "../../grammar/code-frame.ts";
import { BASE_KEYS, BASE_KEY_NAMES } from "../../compiler/base-keys.ts";
import { checkFiles } from "../../compiler/check.ts";
import { readHfConfig } from "../../compiler/hf-config.ts";
import type { Adapter, BaseModel } from "../../compiler/model.ts";
import { CONFIG_FILE } from "../../runtime/formats/checkpoint.ts";
import { readCompiledPackage, type CompiledPackage } from "../../runtime/package/loader.ts";
import { CheckpointError } from "../../runtime/formats/safetensors.ts";
import type { ServingSetup } from "../../runtime/serving/http/start.ts";
import { userError } from "../../runtime/errors.ts";
import { enginePlan, largestStoredRank, moeSpecOf, type EnginePlan } from "../engine-plan.ts";
import type { Calibration } from "../measure/calibration.ts";
import type { WeightFormat } from "../../runtime/package/format.ts";

export interface ModelSource {
  readonly base: BaseModel;
  /** The spec file or package directory as given; absent when the base comes from the checkpoint. */
  readonly path?: string;
  /** Adapters the spec or package declares; without either, adapters are read by their own config. */
  readonly adapters: readonly Adapter[];
  /** The compiled package, when the source is one: the engine then runs its plan and kernel files. */
  readonly package?: CompiledPackage;
}

/**
 * Resolves `source` (a spec file, a package directory, or nothing) against the checkpoint `checkpointDir`.
 * A spec's errors are printed to stderr as code frames, then refused as a MiloraError.
 */
export function modelSource(source: string | undefined, checkpointDir: string): ModelSource {
  if (source === undefined) return { base: readHfConfig(checkpointDir), adapters: [] };
  if (!existsSync(source)) throw userError("usage", `cannot read ${source}: no such file or directory`);
  const { base, adapters, pkg } = statSync(source).isDirectory() ? packageOf(source) : specOf(source);
  checkAgainstCheckpoint(source, pkg ? "package" : "spec", base, checkpointDir);
  return { base, path: source, adapters, ...(pkg ? { package: pkg } : {}) };
}

/**
 * The spec an adapter served or run under `name` is checked against: the declared adapter of that name
 * (or of its part before `:`, as in `tiny:alice`), else the only one declared. Undefined without a spec
 * or package. Without a name, the source must declare exactly one.
 */
export function adapterSpecOf(source: ModelSource, name: string | undefined, dir: string): Adapter | undefined {
  const { adapters, path } = source;
  if (path === undefined) return undefined;
  const names = adapters.map((a) => a.name).join(", ") || "none";
  const named = name === undefined ? undefined : adapters.find((a) => a.name === name || a.name === name.split(":")[0]);
  if (named) return named;
  if (adapters.length === 1) return adapters[0];
  if (name === undefined) throw userError("usage", `${path} declares ${adapters.length} adapters (${names}): say which with --adapter NAME=${dir}`);
  throw userError(
    "spec",
    `${path} has no adapter ${name} (adapters: ${names}): --adapter NAME=DIR names the tenant, and with a spec of several adapters NAME must be one of them; ` +
      `write SPEC_ADAPTER:NAME=DIR to run one of the spec's adapters under another name (e.g. ${adapters[0]?.name ?? "adapter"}:${name}=DIR)`,
  );
}

/** What a run needs its engine's plan to hold: the cache length, the largest rank, the tenants' specs. */
export interface PlanSizing {
  readonly ctx?: number;
  readonly maxLoraRank?: number;
  /** The spec each tenant run was checked against, one per tenant. */
  readonly tenants?: readonly Adapter[];
  /** Adapters resident at once (0: the base alone, planned without LoRA kernels). */
  readonly maxAdapters?: number;
  /** `--weights`; and the checkpoint, whose dtypes set the default storage (bin/engine-plan.ts weightsFor). */
  readonly weights?: WeightFormat;
  readonly checkpointDir?: string;
  /** The device's calibration (bin/measure/calibration.ts): the matvec row limit of the storage format. */
  readonly calibration?: Pick<Calibration, "formats">;
}

/**
 * The engine's plan and kernels: a package's own plan and kernel files (which fix everything), else a
 * plan made here, in the CLI, for `ctx` positions and LoRA up to `maxLoraRank`, serving the
 * spec's adapter when every tenant runs under that one adapter, so that its router kernels are planned.
 */
export function planOptions(source: ModelSource, sizing: PlanSizing): EnginePlan {
  const pkg = source.package;
  checkPackageWeights(source, sizing.weights);
  if (pkg) return { plan: pkg.manifest.plan, kernels: pkg.kernels };
  const specs = new Set(sizing.tenants ?? []);
  const [only] = specs;
  // A per-token baseline's kernels must be in the plan; MiLoRA's routers the resolver makes at need.
  const adapter = moeSpecOf([...specs]) ?? (specs.size === 1 && source.adapters.includes(only!) ? only : undefined);
  return enginePlan({
    base: source.base,
    ...(sizing.maxAdapters === undefined ? {} : { maxAdapters: sizing.maxAdapters }),
    ...(sizing.ctx === undefined ? {} : { ctx: sizing.ctx }),
    ...(sizing.maxLoraRank === undefined ? {} : { maxLoraRank: sizing.maxLoraRank }),
    ...(adapter === undefined ? {} : { adapter }),
    ...(sizing.weights === undefined ? {} : { weights: sizing.weights }),
    ...(sizing.checkpointDir === undefined ? {} : { checkpointDir: sizing.checkpointDir }),
    ...(sizing.calibration === undefined ? {} : { calibration: sizing.calibration }),
  });
}

/** Refuses `--weights` other than the storage a compiled package's plan fixed. */
export function checkPackageWeights(source: ModelSource, weights: WeightFormat | undefined): void {
  const plan = source.package?.manifest.plan;
  const stored = plan?.tensors.find((t) => t.role === "linear")?.gpuDtype;
  if (weights !== undefined && stored !== undefined && weights !== stored) {
    throw userError("usage", `${source.path} was compiled with its weights stored as ${stored}: leave out --weights, or recompile it with --weights ${weights}`);
  }
}

/**
 * What a spec or package fixes for `milora serve`: the spec each adapter registered under a name is
 * checked against (a MiloraError, answered 400, when none fits), the LoRA rank to reserve (the
 * largest the spec allows, since any adapter registered later matches one of its adapters), and a
 * package's plan and kernel files. Nothing without one: the adapters given at start size the engine.
 */
export function servingOptions(source: ModelSource): Pick<ServingSetup, "adapterSpec"> & { readonly maxLoraRank?: number; readonly moeSpec?: Adapter; readonly compiled?: EnginePlan } {
  if (source.path === undefined) return {};
  const adapterSpec = (name: string) => adapterSpecOf(source, name, "DIR");
  const pkg = source.package;
  if (pkg) return { adapterSpec, compiled: { plan: pkg.manifest.plan, kernels: pkg.kernels } };
  const largest = largestStoredRank(source.adapters);
  const moeSpec = moeSpecOf(source.adapters);
  return { adapterSpec, ...(largest === undefined ? {} : { maxLoraRank: largest }), ...(moeSpec === undefined ? {} : { moeSpec }) };
}

/** The spec's single base and its adapters; its errors are printed as code frames and refused. */
function specOf(spec: string): { base: BaseModel; adapters: readonly Adapter[]; pkg?: undefined } {
  const { program, diagnostics, sources } = checkFiles([spec]);
  const errors = diagnostics.filter((d) => d.severity === "error");
  if (errors.length > 0) {
    for (const d of errors) process.stderr.write(renderDiagnostic(d, sources.get(d.span.file) ?? "") + "\n");
    throw userError("spec", `${spec} has ${errors.length} error${errors.length === 1 ? "" : "s"}`);
  }
  const [base, ...more] = program.bases;
  if (!base || more.length > 0) throw userError("spec", `${spec} defines ${program.bases.length} bases; it needs exactly one`);
  return { base, adapters: program.adapters };
}

function packageOf(dir: string): { base: BaseModel; adapters: readonly Adapter[]; pkg: CompiledPackage } {
  const pkg = readCompiledPackage(dir);
  return { base: pkg.base, adapters: [pkg.adapter], pkg };
}

/** Refuses a base that disagrees with DIR/config.json (when there is one) on any hyper-parameter. */
function checkAgainstCheckpoint(source: string, what: "spec" | "package", base: BaseModel, dir: string): void {
  if (!existsSync(join(dir, CONFIG_FILE))) return;
  const config = readHfConfig(dir);
  const differences = BASE_KEY_NAMES.filter((k) => base[BASE_KEYS[k].field] !== config[BASE_KEYS[k].field]).map(
    (k) => `${k} ${String(base[BASE_KEYS[k].field])} in the ${what}, ${String(config[BASE_KEYS[k].field])} in ${join(dir, CONFIG_FILE)}`,
  );
  if (differences.length > 0) throw new CheckpointError(`base ${base.name} of ${source} does not match ${dir}: ${differences.join("; ")}`);
}
