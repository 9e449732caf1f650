// `milora compile` without the command line: a spec and an adapter name in, the files of a runnable
// package out (manifest, kernels, typed API, README, package.json), the same bytes for the same input.
import { createHash } from "node:crypto";
import type { Diagnostic } from "../../grammar/diagnostic.ts";
import { renderBudgetTable } from "../budget-table.ts";
import { computeBudget } from "../budget.ts";
import { checkFiles } from "../check.ts";
import type { Adapter } from "../model.ts";
import { planBase, PlanError, type Plan } from "../plan.ts";
import { positionLimit } from "../rope-scaling.ts";
import { didYouMean } from "../suggest.ts";
import { apiClassName, generateApi } from "./api.ts";
import { canonicalJson, COMPILER_VERSION, MANIFEST_FILE, MANIFEST_FORMAT, type Manifest } from "./manifest.ts";
import { defaultPackageName, packageJson, packageNameProblem, versionProblem } from "./package-json.ts";
import { renderReadme } from "./readme.ts";
import { runtimeFiles } from "./runtime-files.ts";
import { declarationSpans, numberedLines, SpecLines } from "./spec-lines.ts";
import { kernelFiles } from "./wgsl-files.ts";
import type { PackageFile } from "./write-package.ts";
import { validateManifest, type WeightFormat } from "../../runtime/package/format.ts";
import { MiloraError } from "../../runtime/errors.ts";

export interface CompileOptions {
  readonly spec: string;
  /** Which adapter of the spec; needed when it declares more than one. */
  readonly adapter?: string;
  /** npm package name (default: the adapter's name in kebab case) and version (default 0.1.0). */
  readonly name?: string;
  readonly version?: string;
  /** KV cache positions per sequence the kernels are specialised for (default: the base's position limit, max_positions unless rope scaling is dynamic, at most 2048). */
  readonly ctx?: number;
  /** How the package stores the linear weights (`--weights`; default: the spec's `weights`, else f32: no checkpoint is read). */
  readonly weights?: WeightFormat;
  /** The matvec row limit by storage format, of the device the package is for (`--calibration FILE`; default MATVEC_MAX_ROWS). */
  readonly matvecMaxRows?: Readonly<Partial<Record<WeightFormat, number>>>;
}

/** A request the spec cannot satisfy: no such adapter, a bad package name, a base the planner cannot lower. */
export class CompileError extends MiloraError {
  override name = "CompileError";
  readonly kind = "spec";
}

export interface CompileResult {
  readonly diagnostics: readonly Diagnostic[];
  /** Source text by path, for code frames. */
  readonly sources: ReadonlyMap<string, string>;
  /** Absent when the spec has errors. */
  readonly package?: { readonly adapter: Adapter; readonly files: readonly PackageFile[] };
}

const DEFAULT_CTX_CAP = 2048;
const DEFAULT_VERSION = "0.1.0";

export function compilePackage(options: CompileOptions): CompileResult {
  const { program, diagnostics, sources } = checkFiles([options.spec]);
  if (diagnostics.some((d) => d.severity === "error")) return { diagnostics, sources };
  const adapter = chooseAdapter(program.adapters, options.adapter, options.spec);
  const lines = new SpecLines(sources, options.spec);
  const base = adapter.base;
  const ctx = options.ctx ?? Math.min(positionLimit(base), DEFAULT_CTX_CAP);
  let plan: Plan;
  try {
    // The package serves its adapter: LoRA kernels up to the spec's largest rank, its routers' kernels,
    // and block kernels for weights beyond WebGPU's default storage binding (DEFAULT_BINDING_BYTES).
    const matvecMaxRows = options.matvecMaxRows?.[options.weights ?? base.weights ?? "f32"];
    plan = planBase(base, {
      ctx,
      adapter,
      ...(options.weights === undefined ? {} : { weights: options.weights }),
      ...(matvecMaxRows === undefined ? {} : { matvecMaxRows }),
    });
  } catch (e) {
    // What the planner refuses (a context beyond max_positions) is what this compile cannot satisfy.
    if (!(e instanceof PlanError)) throw e;
    throw new CompileError(e.message);
  }
  const name = options.name ?? defaultPackageName(adapter.name);
  const version = options.version ?? DEFAULT_VERSION;
  const problem = packageNameProblem(name) ?? versionProblem(version);
  if (problem !== undefined) throw new CompileError(problem);

  const budget = computeBudget(adapter);
  const specFile = lines.display(options.spec);
  const budgetTable = renderBudgetTable(adapter, budget, { color: false });
  const spans = declarationSpans(adapter, program);
  const specLines = numberedLines(lines, spans);
  const adapterSpans = spans.slice(1);
  const kernels = kernelFiles(plan, base, lines, { ranks: lines.rankLines(adapterSpans), router: lines.routerLines(adapterSpans) });
  const { span: _span, configPath: _configPath, ...manifestBase } = base;
  const manifest: Manifest = {
    format: MANIFEST_FORMAT,
    compiler: { name: "milora", version: COMPILER_VERSION },
    package: { name, version },
    spec: { file: specFile, sha256: sourcesHash(sources, lines) },
    base: manifestBase,
    adapter: {
      name: adapter.name,
      ...(adapter.extends === undefined ? {} : { extends: adapter.extends }),
      layers: adapter.layers,
      experts: adapter.experts,
      ...(adapter.router === undefined ? {} : { router: adapter.router }),
      ...(adapter.moe === undefined ? {} : { moe: adapter.moe }),
    },
    plan,
    budget,
    kernels: kernels.map(({ key, file, name, entryPoint, bindings, params, dispatch }) => ({ key, file, name, entryPoint, bindings, params, dispatch })),
  };
  const manifestJson = canonicalJson(manifest);
  // Every manifest written is one the runtime runs: the format's own check, on the bytes written.
  validateManifest(JSON.parse(manifestJson), MANIFEST_FILE);
  const className = apiClassName(adapter.name);
  const runtime = runtimeFiles();
  const files: PackageFile[] = [
    { path: "package.json", contents: packageJson({ name, version }, `MiLoRA adapter ${adapter.name} on ${base.name}, compiled by milora`, runtime) },
    { path: MANIFEST_FILE, contents: manifestJson },
    {
      path: "README.md",
      contents: renderReadme({ adapter, packageName: name, className, specFile, budgetTable, specLines, kernelCount: kernels.length }),
    },
    ...kernels.map((k) => ({ path: k.file, contents: k.text })),
    ...generateApi({ adapter, budget, specFile, budgetTable, specLines }).map((f) => ({ ...f, ...(f.path === "cli.js" ? { executable: true } : {}) })),
    ...runtime.files,
  ];
  return { diagnostics, sources, package: { adapter, files: files.sort((a, b) => (a.path < b.path ? -1 : 1)) } };
}

function chooseAdapter(adapters: readonly Adapter[], wanted: string | undefined, spec: string): Adapter {
  const names = adapters.map((a) => a.name);
  if (wanted === undefined) {
    if (adapters.length === 1) return adapters[0]!;
    if (adapters.length === 0) throw new CompileError(`${spec} declares no adapter: a package is compiled for one adapter`);
    throw new CompileError(`${spec} declares ${adapters.length} adapters (${names.join(", ")}): choose one with --adapter NAME`);
  }
  const found = adapters.find((a) => a.name === wanted);
  if (found === undefined) {
    throw new CompileError(`${spec} has no adapter ${wanted}: ${names.length > 0 ? didYouMean(wanted, names) : "it declares none"}`);
  }
  return found;
}

/** SHA-256 over every source file read (imports too), by the path generated files show. */
function sourcesHash(sources: ReadonlyMap<string, string>, lines: SpecLines): string {
  const hash = createHash("sha256");
  const byPath = [...sources].map(([path, text]) => [lines.display(path), text] as const).sort((a, b) => (a[0] < b[0] ? -1 : 1));
  for (const [path, text] of byPath) hash.update(`${path}\n${text.length}\n${text}`);
  return `sha256:${hash.digest("hex")}`;
}
