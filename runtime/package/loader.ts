// Loading a package `milora compile` wrote: its manifest (refused when an incompatible compiler wrote
// it), its kernels from kernels/*.wgsl, then the base checkpoint and the tenants' adapters. This is the
// runtime entry compiled packages import as `milora/runtime`.
import { IncrementalDetokenizer, detokenize } from "../text/detokenizer.ts";
import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { EXPERT_MODULES, type Adapter, type BaseModel, type ExpertModule, type ExpertSlot, type RouterConfig } from "../../compiler/model.ts";
import type { KernelSource } from "../gpu/kernel.ts";
import { COMPILER_VERSION, MANIFEST_FILE, PackageError, splitKernelFile, validateManifest, type Manifest } from "./format.ts";
import { loadAdapter } from "../formats/adapter.ts";
import { CheckpointError } from "../formats/safetensors.ts";
import { AdapterStoreError } from "../engine/tenants.ts";
import type { GpuContext } from "../gpu/device.ts";
import { Engine } from "../engine/engine.ts";
import { generateBatch, generateSteps } from "../engine/generate.ts";
import type { SamplingOptions } from "../engine/sequence.ts";
import { Tokenizer } from "../text/tokenizer.ts";
import { MiloraError } from "../errors.ts";

export { acquireDevice, type GpuContext } from "../gpu/device.ts";

export { PackageError } from "./format.ts";
export { ERROR_KINDS, MiloraError, type ErrorKind } from "../errors.ts";

/** Something the package asks for that this runtime version cannot do yet. */
export class UnsupportedError extends MiloraError {
  override name = "UnsupportedError";
  readonly kind = "unsupported";
}

/** A compiled package as read from disk, before anything touches a device. */
export interface CompiledPackage {
  readonly dir: string;
  readonly manifest: Manifest<ExpertModule>;
  readonly base: BaseModel;
  readonly adapter: Adapter;
  /** By key: the WGSL of kernels/*.wgsl (header removed) with the interface the manifest records for it. */
  readonly kernels: ReadonlyMap<string, KernelSource>;
}

/**
 * Reads and checks a package directory (a path, or a `file:` URL such as `new URL(".", import.meta.url)`).
 * Throws PackageError naming the file and the problem.
 */
export function readCompiledPackage(location: string | URL): CompiledPackage {
  const dir = location instanceof URL ? fileURLToPath(location) : resolve(location);
  const manifest = readManifest(dir);
  // Spans of the compiled spec are not shipped; diagnostics about the package point at its manifest.
  const at = { offset: 0, line: 1, column: 1 };
  const span: BaseModel["span"] = { file: join(dir, MANIFEST_FILE), start: at, end: at };
  const base: BaseModel = { ...manifest.base, span };
  // The format checked the router's and experts' shapes; the module names are checked here, against the family's.
  const adapter: Adapter = {
    ...manifest.adapter,
    experts: manifest.adapter.experts as readonly ExpertSlot[],
    ...(manifest.adapter.router === undefined ? {} : { router: manifest.adapter.router as RouterConfig }),
    ...(manifest.adapter.moe === undefined ? {} : { moe: manifest.adapter.moe }),
    base,
    span,
  };
  return { dir, manifest, base, adapter, kernels: readKernels(dir, manifest) };
}

function readManifest(dir: string): Manifest<ExpertModule> {
  const path = join(dir, MANIFEST_FILE);
  if (!existsSync(path)) throw new PackageError(`${dir} is not a compiled milora package: it has no ${MANIFEST_FILE}`);
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new PackageError(`${path}: not valid JSON (${(e as Error).message})`);
  }
  const manifest = validateManifest(json, path);
  const modules: readonly string[] = EXPERT_MODULES;
  const unknown = [
    ...manifest.adapter.experts.map((e, i) => [`adapter.experts[${i}].module`, e.module] as const),
    ...manifest.plan.tensors.map((t, i) => [`plan.tensors[${i}].module`, t.module] as const),
    ...manifest.plan.routers.flatMap((r, i) => r.experts.map((m, j) => [`plan.routers[${i}].experts[${j}]`, m] as const)),
  ].find(([, m]) => m !== undefined && !modules.includes(m));
  if (unknown) throw new PackageError(`${path}: field ${unknown[0]} must be one of ${modules.join(", ")} (got ${JSON.stringify(unknown[1])})`);
  return manifest as Manifest<ExpertModule>;
}

/**
 * The kernels of kernels/*.wgsl, each one the manifest's plan dispatches. The files are the source of
 * truth for the WGSL (hand-tuning one is allowed); bindings, params and workgroup counts are the
 * interface the manifest records beside each file.
 */
function readKernels(dir: string, manifest: Manifest): Map<string, KernelSource> {
  const kernels = new Map<string, KernelSource>();
  for (const { file, ...kernel } of manifest.kernels) {
    const path = join(dir, file);
    if (!existsSync(path)) throw new PackageError(`${dir} is incomplete: ${file} (kernel ${kernel.key}) is missing`);
    let text: string;
    try {
      text = readFileSync(path, "utf8");
    } catch (e) {
      throw new PackageError(`${path} (kernel ${kernel.key}) cannot be read: ${(e as Error).message}`);
    }
    kernels.set(kernel.key, { ...kernel, wgsl: splitKernelFile(text).wgsl });
  }
  return kernels;
}

export interface LoadOptions<Tenant extends string> {
  /** The base model: a Hugging Face directory (config.json, safetensors weights, optionally tokenizer.json). */
  readonly base: string;
  /** Each tenant's adapter directory (PEFT layout plus MiLoRA's router tensors), by tenant name. */
  readonly adapters: Readonly<Record<Tenant, string>>;
  /** A device to share (the caller keeps it); otherwise one is acquired on `backend`. */
  readonly device?: GpuContext;
  readonly backend?: string;
  /** Sequences generated at once (default 4). */
  readonly maxSequences?: number;
}

/** A prompt: text (encoded with the base's tokenizer, after its BOS token) or token ids. */
export type Prompt = string | readonly number[];

export interface GenerateOptions<Tenant extends string> extends SamplingOptions {
  /** Whose adapter to apply; without one the base model runs alone. */
  readonly tenant?: Tenant;
  /** Tokens to generate (default 32). */
  readonly maxTokens?: number;
  /** Token ids that end generation (default: the tokenizer's end-of-sequence tokens); the stop token is yielded. */
  readonly stop?: readonly number[];
  /**
   * Beam search of this width (Hugging Face's num_beams; default 1, greedy or sampled decoding): the
   * tokens of the best hypothesis are yielded once the search ends. Needs a slot per beam (maxSequences).
   * The prompt, and a MiLoRA tenant's routing decision, are computed once and shared by every beam.
   */
  readonly beams?: number;
  /** With beams: score = sum of log-probabilities / length ** lengthPenalty (default 1). */
  readonly lengthPenalty?: number;
  /** With beams: Hugging Face's early_stopping (default false: its heuristic). */
  readonly earlyStopping?: boolean | "never";
}

export interface BeamOptions<Tenant extends string> extends GenerateOptions<Tenant> {
  readonly beams: number;
  /** How many hypotheses to return, best first (default: all `beams`). */
  readonly numReturnSequences?: number;
}

/** One beam search hypothesis. */
export interface ScoredSequence {
  readonly ids: readonly number[];
  /** The text, when the base has a tokenizer. */
  readonly text?: string;
  /** sum of log-probabilities / length ** lengthPenalty. */
  readonly score: number;
}

export interface Token {
  readonly id: number;
  /** The text this token adds, when the base has a tokenizer. */
  readonly text?: string;
}

/** One layer's gates, keyed by the modules the package enables in that layer. */
export interface LayerRouting {
  readonly layer: number;
  readonly gates: Readonly<Partial<Record<ExpertModule, number>>>;
}

const DEFAULT_MAX_TOKENS = 32;

/** A loaded package: the base on a device, the tenants' adapters, and the package's spec. */
export class CompiledModel<Tenant extends string> {
  readonly #engine: Engine;
  readonly #tokenizer: Tokenizer | undefined;
  readonly #tenants: readonly string[];

  /** Use loadCompiledModel. */
  constructor(readonly pkg: CompiledPackage, engine: Engine, tokenizer: Tokenizer | undefined, tenants: readonly string[]) {
    this.#engine = engine;
    this.#tokenizer = tokenizer;
    this.#tenants = tenants;
  }

  /** Token ids of a prompt; text needs the base's tokenizer. */
  encode(prompt: Prompt): number[] {
    if (typeof prompt !== "string") return [...prompt];
    if (this.#tokenizer === undefined) throw new CheckpointError("the base directory has no tokenizer.json, so a text prompt cannot be encoded: pass token ids");
    return this.#tokenizer.encode(prompt, { addBos: true });
  }

  /** Generates after `prompt`, with the tenant's adapter when one is named, yielding each token as its step ends. */
  async *generate(prompt: Prompt, options: GenerateOptions<Tenant> = {}): AsyncGenerator<Token> {
    if (options.beams !== undefined && options.beams !== 1) {
      const [best] = await this.generateBeams(prompt, { ...options, beams: options.beams, numReturnSequences: 1 });
      const text = this.#detokenizer();
      for (const id of best!.ids) yield text ? { id, text: text.push(id) } : { id };
      return;
    }
    const { tenant, maxTokens = DEFAULT_MAX_TOKENS, stop = this.#tokenizer?.eosIds ?? [], beams: _beams, lengthPenalty: _lp, earlyStopping: _es, ...sampling } = options;
    if (tenant !== undefined) this.#checkTenant(tenant);
    const request = { prompt: this.encode(prompt), maxTokens, sampling, stop, ...(tenant === undefined ? {} : { adapter: tenant }) };
    // One token at a time through the incremental detokenizer: a character split over tokens comes out
    // whole with the token that completes it (the server and `milora run` decode the same way).
    // Bytes of a character the output ends inside are never text, so nothing is owed at the end.
    const text = this.#detokenizer();
    for await (const [id] of generateSteps(this.#engine, [request])) {
      if (id === undefined) continue;
      yield text ? { id, text: text.push(id) } : { id };
    }
  }

  #detokenizer(): IncrementalDetokenizer | undefined {
    const tokenizer = this.#tokenizer;
    return tokenizer === undefined ? undefined : new IncrementalDetokenizer((ids) => tokenizer.decode(ids));
  }

  /** Beam search after `prompt`: the numReturnSequences best hypotheses (default all), best first, with scores. */
  async generateBeams(prompt: Prompt, options: BeamOptions<Tenant>): Promise<ScoredSequence[]> {
    const { tenant, maxTokens = DEFAULT_MAX_TOKENS, stop = this.#tokenizer?.eosIds ?? [], beams, lengthPenalty, earlyStopping, numReturnSequences = beams, ...sampling } = options;
    if (tenant !== undefined) this.#checkTenant(tenant);
    const beam = { beams, numReturnSequences, ...(lengthPenalty === undefined ? {} : { lengthPenalty }), ...(earlyStopping === undefined ? {} : { earlyStopping }) };
    const request = { prompt: this.encode(prompt), maxTokens, sampling, stop, beam, ...(tenant === undefined ? {} : { adapter: tenant }) };
    const [result] = await generateBatch(this.#engine, [request]);
    const hypotheses = result!.beams ?? [{ tokens: result!.tokens, score: result!.score ?? NaN }];
    return hypotheses.map((h) => ({
      ids: h.tokens,
      ...(this.#tokenizer === undefined ? {} : { text: detokenize((ids) => this.#tokenizer!.decode(ids), h.tokens) }),
      score: h.score,
    }));
  }

  /**
   * The gates a tenant's routers give each enabled module for `prompt` (0 for modules switched off).
   * Per-token routers decide again at every token: this is their decision at the prompt's last token.
   * Plain LoRA has gate 1 everywhere and needs no device for it. A per-token baseline (per_module,
   * per_ffn) routes inside its modules at every token and has no per-layer gates to give.
   */
  async route(prompt: Prompt, options: { readonly tenant: Tenant }): Promise<LayerRouting[]> {
    this.#checkTenant(options.tenant);
    const { adapter } = this.pkg;
    if (adapter.moe) throw new UnsupportedError(`route(): adapter ${adapter.name} routes every token ${adapter.moe.placement} among experts inside its modules, so it has no per-layer gates to report`);
    const ids = this.encode(prompt);
    const enabled = (layer: number) => adapter.experts.filter((e) => e.layer === layer).map((e) => e.module);
    if (adapter.router === undefined) {
      return adapter.layers.map((layer) => ({ layer, gates: Object.fromEntries(enabled(layer).map((m) => [m, 1])) }));
    }
    // A prompt-only run: the routers decide during prefill and nothing is generated.
    const { routing } = await this.#engine.generate({ prompt: ids, maxTokens: 0, adapter: options.tenant });
    if (routing === undefined) throw new UnsupportedError(`route(): the engine of milora ${COMPILER_VERSION} reported no routing for tenant ${options.tenant}`);
    return adapter.layers.map((layer) => {
      const decisions = routing.filter((r) => r.layer === layer);
      const chosen = decisions.at(-1)?.experts ?? {};
      return { layer, gates: Object.fromEntries(enabled(layer).map((m) => [m, chosen[m] ?? 0])) };
    });
  }

  destroy(): void {
    this.#engine.destroy();
  }

  #checkTenant(tenant: string): void {
    if (this.#tenants.includes(tenant)) return;
    const known = this.#tenants.length > 0 ? `the loaded tenants are ${this.#tenants.join(", ")}` : "no adapters were loaded";
    throw new AdapterStoreError(`no tenant ${tenant}: ${known}`);
  }
}

/**
 * Reads the package at `location`, checks each adapter against its spec, and loads the base checkpoint
 * onto a device with every tenant's adapter resident. Throws a MiloraError (runtime/errors.ts): PackageError,
 * CheckpointError (a checkpoint or adapter that does not match), EngineError, NoAdapterError.
 */
export async function loadCompiledModel<Tenant extends string>(location: string | URL, options: LoadOptions<Tenant>): Promise<CompiledModel<Tenant>> {
  const pkg = readCompiledPackage(location);
  // Adapters are checked against the spec before the (slower) base load, so a wrong one fails fast.
  const adapters = Object.entries<string>(options.adapters).map(([tenant, dir]) => loadAdapter(dir, { name: tenant, base: pkg.base, spec: pkg.adapter }));
  const tokenizer = await Tokenizer.load(options.base);
  const engine = await Engine.load({
    base: pkg.base,
    checkpointDir: options.base,
    // The package's plan and kernel files, with every tenant resident at once.
    plan: pkg.manifest.plan,
    kernels: pkg.kernels,
    maxAdapters: Math.max(1, adapters.length),
    ...(options.maxSequences === undefined ? {} : { maxSequences: options.maxSequences }),
    // A step may hold a whole context (within the device's binding limit): a prompt up to the context
    // is prefilled in one step (a longer step budget than the engine's default, for speed).
    maxBatchRows: pkg.manifest.plan.dims.ctx,
    ...(options.device === undefined ? {} : { gpu: options.device }),
    ...(options.backend === undefined ? {} : { backend: options.backend }),
  });
  try {
    for (const adapter of adapters) engine.loadAdapter(adapter.name, adapter);
  } catch (e) {
    engine.destroy();
    throw e;
  }
  return new CompiledModel<Tenant>(pkg, engine, tokenizer, adapters.map((a) => a.name));
}
