// The GPU engine: loads a base checkpoint as the plan describes it, holds several LoRA/MiLoRA adapters
// (tenants) beside it, then advances batches of sequences. One step runs the rows of several sequences
// (prefill chunks and decode tokens mixed, each with its own adapter and routing) through every layer
// in one command encoder and one submit, and reads back only the sampled token ids (plus the logits a
// sequence asked for, the gates a router chose in that step, and a beam's top log-prob candidates).
// Beam search (beam-search.ts) forks and re-parents sequences here: their keys and values are copied
// slot to slot on the device, never recomputed.
import { NO_ADAPTER } from "../../compiler/kernels/lora.ts";
import { EXPERT_MODULES, type Adapter, type BaseModel, type ExpertModule } from "../../compiler/model.ts";
import { SAMPLING_WORDS, packSamplingSettings, type SamplingSettings } from "../../compiler/kernels/sampling.ts";
import { BEAM_CANDIDATE_WORDS, MAX_BEAM_CANDIDATES, beamTopKKernel } from "../../compiler/kernels/beam-topk.ts";
import {
  kernelSources,
  layerTensor,
  planBase,
  plannedKernelSource,
  plannedKey,
  type ActivationName,
  type KernelRequest,
  type Plan,
  type PlanLora,
  type PlanOp,
} from "../../compiler/plan.ts";
import type { KernelSource } from "../../compiler/kernels/kernel.ts";
import { openCheckpoint, type ProgressFn } from "../formats/checkpoint.ts";
import { acquireDevice, type AdapterReport, type GpuContext } from "../gpu/device.ts";
import { loadAdapter as readAdapterDir, loraKey, type LoadedAdapter } from "../formats/adapter.ts";
import { AdapterStore, type ResidentAdapter } from "./tenants.ts";
import { generate, generateBatch, type GenerateRequest, type Generation } from "./generate.ts";
import { PipelineCache, StepEncoder, createStorage } from "../gpu/kernel-runner.ts";
import { RouterDispatch, type RouteJob } from "./router-dispatch.ts";
import { MODULES_PER_LAYER, allOnGates, decisionsOf, gateColumn, gatesOf, type LayerRouting } from "./routing.ts";
import { KvCache, kvLayerBytes } from "./kv-cache.ts";
import { Sequence, SequenceError, checkSampling, type LogitsMode, type SamplingOptions } from "./sequence.ts";
import { uploadWeights, type GpuTensor, type GpuWeights } from "./weights.ts";

/** A request the engine cannot serve as configured (context, capacity, device limits). */
export class EngineError extends Error {
  override name = "EngineError";
}

export interface EngineOptions {
  readonly base: BaseModel;
  /** A Hugging Face model directory: config.json and safetensors weights. */
  readonly checkpointDir: string;
  /** KV cache positions per sequence (default: the base's max_positions, capped at 2048). */
  readonly ctx?: number;
  /** Sequences alive at once: the KV cache's slots (default 4). */
  readonly maxSequences?: number;
  /** Rows one step may run (default 256); longer prompts are prefilled in chunks. */
  readonly maxBatchRows?: number;
  /** A device to share (the caller keeps ownership); otherwise one is acquired on `backend`. */
  readonly gpu?: GpuContext;
  readonly backend?: string;
  /** Runs on the device before any weight is uploaded; throws to refuse it (the CLI's kernel self-test). */
  readonly checkDevice?: (gpu: GpuContext) => Promise<void>;
  /** Bytes read from the checkpoint so far, of the total. */
  readonly onProgress?: ProgressFn;
  /**
   * Largest storage binding to assume (default: the device's). Splittable tensors are split at the
   * smaller of this and the plan's binding size; an engine-made plan assumes this size when given.
   */
  readonly maxBindingBytes?: number;
  /** Adapters resident at once (default 4; 0 serves the base alone). */
  readonly maxAdapters?: number;
  /** Largest LoRA rank an adapter may have (default 16). */
  readonly maxLoraRank?: number;
  /** A plan made beforehand (a compiled package's); it fixes the context, largest rank and adapter, so give none. */
  readonly plan?: Plan;
  /**
   * The adapter spec an engine-made plan serves: its routers' kernels join the plan. Adapters of other
   * specs still load; their router kernels are generated at load time (unplannedKernel).
   */
  readonly adapter?: Adapter;
  /**
   * The WGSL to run by kernel key, covering the plan's kernel set (default: generated from the plan).
   * Every kernel the plan names runs from here; only kernels outside the plan are generated (unplannedKernel).
   */
  readonly kernels?: ReadonlyMap<string, KernelSource>;
}

export interface CreateSequenceOptions {
  readonly sampling?: SamplingOptions;
  readonly logits?: LogitsMode;
  /** Name of a loaded adapter to run with; the base alone when absent. */
  readonly adapter?: string;
}

/** What a step gave one sequence whose pending tokens all ran. */
export interface StepOutput {
  /** The token sampled after its last token. */
  readonly token: number;
  /** Logits rows ([vocab] each) as the sequence's `logits` mode asked: every run row's, or the last. */
  readonly logits?: readonly Float32Array[];
  /** With `seq.candidates` > 0: the most likely next tokens, largest log-probability first. */
  readonly candidates?: BeamCandidates;
}

/** A row's most likely next tokens and their log-probabilities (log-softmax over the vocabulary, f32). */
export interface BeamCandidates {
  readonly tokens: Uint32Array;
  readonly logprobs: Float32Array;
}

/** One token of a step: its id, its position and the cache slot of its sequence. */
interface Row {
  readonly slot: number;
  readonly token: number;
  readonly position: number;
  /** Adapter slot (NO_ADAPTER for the base alone) and the gates known before the step. */
  readonly adapter: number;
  readonly gates?: Float32Array;
}

/** The adapter folded into the base weights, and what the changed weights held before. */
interface MergedState {
  readonly adapter: string;
  readonly originals: ReadonlyMap<string, Float32Array>;
}

const DEFAULT_CTX_CAP = 2048;

export class Engine {
  readonly #gpu: GpuContext;
  readonly #ownsDevice: boolean;
  readonly #weights: GpuWeights;
  readonly #cache: KvCache;
  readonly #kernels: ReadonlyMap<string, KernelSource>;
  /** Resolved kernels by request (JSON), so steps look each one up once. */
  readonly #resolved = new Map<string, KernelSource>();
  readonly #pipelines: PipelineCache;
  readonly #step: StepEncoder;
  readonly #activations: ReadonlyMap<ActivationName, GPUBuffer>;
  readonly #inputs: {
    readonly positions: GPUBuffer;
    readonly rowSlot: GPUBuffer;
    readonly settings: GPUBuffer;
    readonly tokens: GPUBuffer;
    /** Per row: adapter slot, gates [rows, layers * 7], and shrink's output [rows, maxRank]. */
    readonly rowAdapter: GPUBuffer;
    readonly gates: GPUBuffer;
    readonly loraT: GPUBuffer;
  };
  readonly #tokensReadback: GPUBuffer;
  readonly #adapters: AdapterStore;
  readonly #router: RouterDispatch;
  #merged: MergedState | undefined;
  /** Live sequences per adapter name: an adapter in use cannot be unloaded. */
  readonly #users = new Map<string, Set<Sequence>>();
  #logitsReadback: GPUBuffer | undefined;
  #gatesReadback: GPUBuffer | undefined;
  /** Beam candidates [maxRows, MAX_BEAM_CANDIDATES] on the device and their readback, made on first use. */
  #candidates: { readonly kernel: KernelSource; readonly buffer: GPUBuffer; readonly readback: GPUBuffer } | undefined;
  #nextId = 0;
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(
    readonly plan: Plan,
    readonly maxRows: number,
    readonly base: BaseModel,
    maxAdapters: number,
    kernels: ReadonlyMap<string, KernelSource>,
    gpu: GpuContext,
    ownsDevice: boolean,
    weights: GpuWeights,
    cache: KvCache,
  ) {
    this.#gpu = gpu;
    this.#ownsDevice = ownsDevice;
    this.#weights = weights;
    this.#cache = cache;
    const device = gpu.device;
    this.#kernels = kernels;
    this.#pipelines = new PipelineCache(device);
    this.#step = new StepEncoder(device, this.#pipelines);
    this.#activations = new Map(plan.activations.map((a) => [a.name, createStorage(device, maxRows * a.width * 4, `activation ${a.name}`)]));
    this.#inputs = {
      positions: createStorage(device, maxRows * 4, "positions"),
      rowSlot: createStorage(device, maxRows * 4, "row slots"),
      settings: createStorage(device, maxRows * SAMPLING_WORDS * 4, "sampling settings"),
      tokens: createStorage(device, maxRows * 4, "sampled tokens"),
      rowAdapter: createStorage(device, maxRows * 4, "row adapters"),
      gates: createStorage(device, maxRows * this.#gateStride * 4, "gates"),
      loraT: createStorage(device, maxRows * Math.max(1, plan.maxLoraRank) * 4, "lora shrink output"),
    };
    this.#adapters = new AdapterStore(device, plan, maxAdapters);
    this.#router = new RouterDispatch(device, { hidden: plan.dims.hidden, maxRows, maxGroups: maxAdapters }, (request) => this.#kernelFor(request));
    this.#tokensReadback = device.createBuffer({ label: "tokens readback", size: maxRows * 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    // Compiling every pipeline now keeps shader compilation out of the first step's timing.
    for (const k of this.#allKernels()) this.#pipelines.get(k);
  }

  /**
   * Plans the base, checks the checkpoint against it (every problem at once), uploads the weights and
   * allocates the KV cache. Throws PlanError, CheckpointError, EngineError or NoAdapterError.
   */
  static async load(options: EngineOptions): Promise<Engine> {
    const { base } = options;
    const slots = options.maxSequences ?? 4;
    if (!Number.isInteger(slots) || slots < 1) throw new EngineError(`maxSequences must be a positive integer, got ${slots}`);
    const maxAdapters = options.maxAdapters ?? 4;
    if (!Number.isInteger(maxAdapters) || maxAdapters < 0) throw new EngineError(`maxAdapters must be an integer >= 0, got ${maxAdapters}`);
    const plan = planOf(options, maxAdapters);
    const { ctx } = plan.dims;
    const kernels = options.kernels ?? kernelSources(plan);
    const missing = plan.kernels.filter((k) => !kernels.has(k.key)).map((k) => k.key);
    if (missing.length > 0) throw new EngineError(`no WGSL was given for kernel${missing.length === 1 ? "" : "s"} ${missing.join(", ")} of the plan`);
    const checkpoint = openCheckpoint(options.checkpointDir, options.onProgress ? { onProgress: options.onProgress } : {});
    let gpu: GpuContext | undefined;
    try {
      gpu = options.gpu ?? (await acquireDevice(options.backend === undefined ? {} : { backend: options.backend }));
      await options.checkDevice?.(gpu);
      const maxBinding = options.maxBindingBytes ?? gpu.report.limits.maxStorageBufferBindingSize ?? 128 * 1024 * 1024;
      const cacheShape = { layers: plan.dims.layers, kvWidth: plan.dims.kvWidth, ctx, slots };
      if (kvLayerBytes(cacheShape) > maxBinding) {
        const mib = (b: number) => (b / 1024 / 1024).toFixed(1);
        throw new EngineError(
          `the KV cache for ${slots} sequences of ${ctx} positions needs ${mib(kvLayerBytes(cacheShape))} MiB per layer, ` +
            `more than the device's largest storage binding (${mib(maxBinding)} MiB): lower the context or the sequences`,
        );
      }
      const widest = Math.max(...plan.activations.map((a) => a.width));
      const maxRows = Math.max(1, Math.min(options.maxBatchRows ?? 256, Math.floor(maxBinding / (4 * widest))));
      const weights = await uploadWeights(gpu.device, checkpoint, plan, maxBinding);
      const engine = new Engine(plan, maxRows, base, maxAdapters, kernels, gpu, options.gpu === undefined, weights, new KvCache(gpu.device, cacheShape));
      try {
        await engine.#warmUp();
      } catch (e) {
        engine.destroy();
        throw e;
      }
      return engine;
    } catch (e) {
      if (gpu && options.gpu === undefined) gpu.destroy();
      throw e;
    } finally {
      checkpoint.close();
    }
  }

  /**
   * Runs one matmul-sized and one matvec-sized step, since GL drivers (llvmpipe among them) compile a
   * shader on its first dispatch: that belongs to loading, not to the first prefill's timing. The rows
   * scribble on slot 0's cache, which a sequence overwrites before it reads any position.
   */
  async #warmUp(): Promise<void> {
    for (const n of [Math.min(this.maxRows, this.plan.matvecMaxRows + 1), 1]) {
      const rows = Array.from({ length: n }, (_, position) => ({ slot: 0, token: 0, position, adapter: NO_ADAPTER }));
      await this.#run(rows, [n - 1], [GREEDY], false, []);
    }
  }

  /** The adapter the engine runs on. */
  get device(): AdapterReport {
    return this.#gpu.report;
  }

  /** Slots free for new sequences. */
  get freeSlots(): number {
    return this.#cache.freeSlots;
  }

  /**
   * A new sequence holding `prompt` (pending), bound to a free KV cache slot and, with `adapter`, to a
   * loaded adapter. A prompt-routed adapter's prompt must run in one step, so it may not exceed maxRows.
   */
  createSequence(prompt: readonly number[], options: CreateSequenceOptions = {}): Sequence {
    if (prompt.length === 0) throw new SequenceError("a prompt needs at least one token");
    const sampling = checkSampling(options.sampling ?? {});
    const adapter = options.adapter === undefined ? undefined : this.#resident(options.adapter);
    if (adapter && this.#merged) throw new EngineError(`adapter ${this.#merged.adapter} is merged into the base weights: unmerge it before running adapters`);
    if (adapter?.adapter.spec.router?.when === "prompt" && prompt.length > this.maxRows) {
      throw new EngineError(
        `the prompt has ${prompt.length} tokens but adapter ${adapter.name} routes on the prompt, which must be prefilled in one step ` +
          `of at most ${this.maxRows} rows: shorten the prompt or raise maxBatchRows`,
      );
    }
    const slot = this.#cache.acquire();
    if (slot === undefined) throw new EngineError(`all ${this.#cache.shape.slots} sequence slots are in use`);
    const seq = new Sequence(this.#nextId++, slot, this.plan.dims.ctx, this.plan.dims.vocab, sampling, adapter);
    try {
      seq.append(prompt);
    } catch (e) {
      this.#cache.release(slot);
      throw e;
    }
    seq.logits = options.logits ?? "none";
    if (adapter) {
      if (!adapter.adapter.spec.router) seq.gates = allOnGates(adapter, this.plan.dims.layers);
      let users = this.#users.get(adapter.name);
      if (!users) this.#users.set(adapter.name, (users = new Set()));
      users.add(seq);
    }
    return seq;
  }

  /**
   * A new sequence in a free slot holding everything `parent` holds: its tokens, its adapter and routing
   * decision (a prompt's gates are shared, not recomputed) and its cached keys and values, copied on the
   * device. Beam search forks the prompt's sequence into its beams after the prefill.
   */
  fork(parent: Sequence): Sequence {
    if (parent.released) throw new SequenceError(`sequence ${parent.id} was released`);
    const slot = this.#cache.acquire();
    if (slot === undefined) throw new EngineError(`all ${this.#cache.shape.slots} sequence slots are in use: beam search needs one per beam`);
    const child = new Sequence(this.#nextId++, slot, parent.ctx, parent.vocab, parent.sampling, parent.adapter);
    child.copyStateFrom(parent);
    this.#cache.copyPositions([{ from: parent.slot, to: slot, start: 0, end: parent.cached }]);
    if (parent.adapter) this.#users.get(parent.adapter.name)!.add(child);
    return child;
  }

  /**
   * Each `seq` becomes a copy of its `parent` (a beam continuing another beam's history): the cached
   * positions where their tokens differ are copied on the device (one submit for all), the shared prefix
   * (at least the prompt) stays. No parent may also be re-parented in the same call.
   */
  adopt(pairs: readonly { readonly seq: Sequence; readonly parent: Sequence }[]): void {
    const targets = new Set(pairs.map((p) => p.seq));
    const copies = pairs.map(({ seq, parent }) => {
      if (seq.released || parent.released) throw new SequenceError(`adopt: sequence ${seq.released ? seq.id : parent.id} was released`);
      if (targets.has(parent) && parent !== seq) throw new SequenceError(`adopt: sequence ${parent.id} is both a parent and re-parented`);
      let common = Math.min(seq.cached, parent.cached);
      for (let i = 0; i < common; i++) {
        if (seq.tokens[i] !== parent.tokens[i]) {
          common = i;
          break;
        }
      }
      const copy = { from: parent.slot, to: seq.slot, start: common, end: parent.cached };
      seq.copyStateFrom(parent);
      return copy;
    });
    this.#cache.copyPositions(copies);
  }

  /** Ends a sequence and frees its slot. */
  release(seq: Sequence): void {
    if (seq.released) return;
    seq.markReleased();
    this.#cache.release(seq.slot);
    if (seq.adapter) this.#users.get(seq.adapter.name)?.delete(seq);
  }

  /**
   * Makes an adapter resident under `name`: a directory (PEFT layout, checked against `spec` when given,
   * else against its own config) or one already in memory. Throws CheckpointError or AdapterStoreError.
   */
  loadAdapter(name: string, source: string | LoadedAdapter, options: { readonly spec?: Adapter } = {}): ResidentAdapter {
    if (this.plan.maxLoraRank === 0) throw new EngineError("this engine serves no adapters (maxAdapters 0)");
    const adapter =
      typeof source === "string"
        ? readAdapterDir(source, { name, base: this.base, ...(options.spec ? { spec: options.spec } : {}) })
        : { ...source, name };
    const resident = this.#adapters.add(adapter);
    for (const k of this.#router.kernelsOf(resident)) this.#pipelines.get(k);
    return resident;
  }

  /** Frees an adapter's slot; refused while a live sequence uses it. */
  unloadAdapter(name: string): void {
    const users = this.#users.get(name)?.size ?? 0;
    if (users > 0) throw new EngineError(`adapter ${name} is used by ${users} live sequence${users === 1 ? "" : "s"}: release them first`);
    if (this.#merged?.adapter === name) throw new EngineError(`adapter ${name} is merged into the base weights: unmerge it first`);
    this.#adapters.remove(name);
  }

  /** Names of the resident adapters. */
  adapters(): string[] {
    return this.#adapters.names();
  }

  /**
   * Merged mode, for one tenant: folds W + g * scaling * B A into the base weights for one routing
   * decision (a prompt-routed adapter's `routing`, e.g. a sequence's; gate 1 everywhere for plain LoRA),
   * so that sequences without an adapter then run the base kernels only. Token routing cannot be folded.
   */
  mergeAdapter(name: string, routing?: readonly LayerRouting[]): Promise<void> {
    return this.#serialised(async () => {
      if (this.#merged) throw new EngineError(`adapter ${this.#merged.adapter} is already merged: unmerge it first`);
      const adapter = this.#resident(name);
      const router = adapter.adapter.spec.router;
      if (router?.when === "token") throw new EngineError(`adapter ${name} routes every token, which no single set of merged weights can express`);
      if (router && !routing) throw new EngineError(`adapter ${name} is routed: merging needs a routing decision (a prompt's)`);
      const gates = routing ? gatesOf(routing, this.plan.dims.layers) : allOnGates(adapter, this.plan.dims.layers);
      const device = this.#gpu.device;
      const originals = new Map<string, Float32Array>();
      for (const { layer, module } of adapter.adapter.spec.experts) {
        const g = gates[gateColumn(layer, module)]!;
        if (g === 0) continue;
        const w = adapter.adapter.lora.get(loraKey(layer, module))!;
        const tensor = this.plan.tensors.find((t) => t.layer === layer && t.module === module)!.name;
        const original = await this.#weights.read(device, tensor);
        originals.set(tensor, original);
        this.#weights.write(device.queue, tensor, foldLora(original, w.a, w.b, w.rank, g * w.scaling));
      }
      this.#merged = { adapter: name, originals };
    });
  }

  /** Restores the base weights a merge changed. */
  unmergeAdapter(): Promise<void> {
    return this.#serialised(async () => {
      if (!this.#merged) return;
      for (const [name, data] of this.#merged.originals) this.#weights.write(this.#gpu.device.queue, name, data);
      this.#merged = undefined;
    });
  }

  /** The merged adapter's name, if any. */
  get merged(): string | undefined {
    return this.#merged?.adapter;
  }

  /**
   * Runs every pending token of `seqs` (in as many steps as `maxRows` requires) and samples the token
   * that follows each. The sampled token is returned, not appended: the caller appends what it keeps.
   */
  prefill(seqs: readonly Sequence[]): Promise<Map<Sequence, StepOutput>> {
    return this.#serialised(() => this.#advance(seqs));
  }

  /** As prefill, for sequences with exactly one pending token each (the usual decode step). */
  decode(seqs: readonly Sequence[]): Promise<Map<Sequence, StepOutput>> {
    return this.#serialised(() => {
      for (const s of seqs) if (s.pending !== 1) throw new SequenceError(`decode: sequence ${s.id} has ${s.pending} pending tokens, not 1`);
      return this.#advance(seqs);
    });
  }

  /** Prefills one prompt and decodes up to `maxTokens` tokens after it. */
  generate(request: GenerateRequest): Promise<Generation> {
    return generate(this, request);
  }

  /** Several prompts batched together: prefilled in shared steps, then decoded in lockstep. */
  generateBatch(requests: readonly GenerateRequest[]): Promise<Generation[]> {
    return generateBatch(this, requests);
  }

  /** Frees every GPU buffer (and the device, when the engine acquired it). */
  destroy(): void {
    this.#weights.destroy();
    this.#adapters.destroy();
    this.#router.destroy();
    this.#cache.destroy();
    this.#step.destroy();
    for (const b of [...this.#activations.values(), ...Object.values(this.#inputs), this.#tokensReadback]) b.destroy();
    this.#logitsReadback?.destroy();
    this.#gatesReadback?.destroy();
    this.#candidates?.buffer.destroy();
    this.#candidates?.readback.destroy();
    if (this.#ownsDevice) this.#gpu.destroy();
  }

  // Steps share buffers, so calls from concurrent callers run one after another.
  #serialised<T>(run: () => Promise<T>): Promise<T> {
    const result = this.#queue.then(run);
    this.#queue = result.catch(() => undefined);
    return result;
  }

  async #advance(seqs: readonly Sequence[]): Promise<Map<Sequence, StepOutput>> {
    if (new Set(seqs).size !== seqs.length) throw new SequenceError("a sequence appears twice in one batch");
    for (const s of seqs) {
      if (s.released) throw new SequenceError(`sequence ${s.id} was released`);
      if (s.pending === 0) throw new SequenceError(`sequence ${s.id} has no pending tokens`);
      if (s.adapter && this.#merged) throw new EngineError(`adapter ${this.#merged.adapter} is merged into the base weights: unmerge it before running adapters`);
      if (routesPrompt(s) && s.pending > this.maxRows) {
        throw new EngineError(`sequence ${s.id}: a prompt-routed prompt of ${s.pending} tokens must run in one step of at most ${this.maxRows} rows`);
      }
    }
    const outputs = new Map<Sequence, StepOutput>();
    const logitsSoFar = new Map<Sequence, Float32Array[]>();
    let waiting = [...seqs];
    while (waiting.length > 0) {
      const rows: (Row & { readonly seq: Sequence })[] = [];
      const outRows: number[] = [];
      const jobs: (RouteJob & { readonly seq: Sequence })[] = [];
      const finishing = new Map<Sequence, number>(); // sequence -> its sampled out-row index
      for (const seq of waiting) {
        const take = Math.min(seq.pending, this.maxRows - rows.length);
        if (take === 0) break;
        // Layer l's router pools over the whole prompt, so a routed prompt is never split over steps.
        if (routesPrompt(seq) && take < seq.pending) break;
        const first = rows.length;
        const adapter = seq.adapter?.slot ?? NO_ADAPTER;
        const router = seq.adapter?.adapter.spec.router;
        const gates = seq.gates ?? (seq.adapter ? new Float32Array(this.#gateStride) : undefined);
        for (let i = 0; i < take; i++) {
          rows.push({ seq, slot: seq.slot, token: seq.tokens[seq.cached + i]!, position: seq.cached + i, adapter, ...(gates ? { gates } : {}) });
        }
        if (router && seq.gates === undefined) jobs.push({ seq, adapter: seq.adapter!, config: router, first, count: take, perRow: router.when === "token" });
        const done = take === seq.pending;
        if (seq.logits === "all") for (let r = first; r < rows.length; r++) outRows.push(r);
        else if (done) outRows.push(rows.length - 1);
        if (done) finishing.set(seq, outRows.length - 1);
      }
      const settings = outRows.map((r, i) => {
        const seq = rows[r]!.seq;
        return finishing.get(seq) === i ? seq.samplingSettings() : GREEDY;
      });
      const wantLogits = outRows.some((r) => rows[r]!.seq.logits !== "none");
      const candidates = Math.max(0, ...[...finishing.keys()].map((s) => s.candidates));
      if (candidates > Math.min(MAX_BEAM_CANDIDATES, this.plan.dims.vocab)) {
        throw new EngineError(`${candidates} beam candidates per row asked for; at most ${Math.min(MAX_BEAM_CANDIDATES, this.plan.dims.vocab)} (and the vocabulary)`);
      }
      const result = await this.#run(rows, outRows, settings, wantLogits, jobs, candidates);

      for (const job of jobs) {
        const { seq } = job;
        const row = (r: number) => result.gates!.subarray(r * this.#gateStride, (r + 1) * this.#gateStride);
        if (job.perRow) {
          for (let r = job.first; r < job.first + job.count; r++) seq.routing.push(...decisionsOf(row(r), job.adapter.routers.keys(), rows[r]!.position));
        } else {
          // Every row of the prompt carries the same decision; it is the sequence's for good.
          seq.gates = row(job.first).slice();
          seq.routing.push(...decisionsOf(seq.gates, job.adapter.routers.keys()));
        }
      }
      for (const seq of new Set(rows.map((r) => r.seq))) {
        const ran = rows.filter((r) => r.seq === seq).length;
        seq.cached += ran;
        if (seq.logits === "all" && result.logits) {
          const mine = outRows.flatMap((r, i) => (rows[r]!.seq === seq ? [result.logits!(i)] : []));
          logitsSoFar.set(seq, [...(logitsSoFar.get(seq) ?? []), ...mine]);
        }
        const out = finishing.get(seq);
        if (out === undefined) continue;
        seq.sampled++;
        const logits = seq.logits === "all" ? logitsSoFar.get(seq) : seq.logits === "last" ? [result.logits!(out)] : undefined;
        const mine = seq.candidates > 0 ? result.candidates?.(out, seq.candidates) : undefined;
        outputs.set(seq, { token: result.tokens[out]!, ...(logits ? { logits } : {}), ...(mine ? { candidates: mine } : {}) });
      }
      waiting = waiting.filter((s) => !outputs.has(s));
    }
    return outputs;
  }

  /**
   * One forward step: `rows` through every layer (routers of `jobs` first in each layer they route),
   * then the head on `outRows` (indices into rows), sampled with `settings` (one per out row). One
   * submit; the waits are for the readbacks (tokens, and logits and gates when asked for).
   */
  async #run(rows: readonly Row[], outRows: readonly number[], settings: readonly SamplingSettings[], wantLogits: boolean, jobs: readonly RouteJob[], candidates = 0) {
    const { device } = this.#gpu;
    const { hidden, vocab, layers } = this.plan.dims;
    const queue = device.queue;
    queue.writeBuffer(this.#inputs.positions, 0, Uint32Array.from(rows, (r) => r.position));
    queue.writeBuffer(this.#inputs.rowSlot, 0, Uint32Array.from(rows, (r) => r.slot));
    const active = this.#loraActivity(rows, jobs);
    if (active.some((layer) => layer.some(Boolean))) {
      const G = this.#gateStride;
      const gates = new Float32Array(rows.length * G);
      rows.forEach((r, i) => r.gates && gates.set(r.gates, i * G));
      queue.writeBuffer(this.#inputs.rowAdapter, 0, Uint32Array.from(rows, (r) => r.adapter));
      queue.writeBuffer(this.#inputs.gates, 0, gates);
    }
    const step = this.#step;

    const x = this.#act(this.plan.input);
    const embedding = this.#weights.get(this.plan.embedding);
    rows.forEach((row, r) => {
      const block = blockOf(embedding, row.token);
      step.copy(block.buffer, (row.token - block.firstRow) * hidden * 4, x, r * hidden * 4, hidden * 4);
    });
    const groups = this.#router.prepare(jobs);
    const table = { buffer: this.#inputs.gates, stride: this.#gateStride };
    for (let layer = 0; layer < layers; layer++) {
      for (const group of groups) this.#router.route(step, group, layer, x, table);
      for (const op of this.plan.layer) this.#dispatch(op, rows.length, layer, active[layer]!);
    }
    const out = outRows.length;
    if (out > 0) {
      const headInput = this.#act(this.plan.headInput);
      for (const [from, to, count] of runs(outRows)) step.copy(x, from * hidden * 4, headInput, to * hidden * 4, count * hidden * 4);
      queue.writeBuffer(this.#inputs.settings, 0, packSamplingSettings(settings));
      for (const op of this.plan.head) this.#dispatch(op, out, 0, []);
      step.copy(this.#inputs.tokens, 0, this.#tokensReadback, 0, out * 4);
      if (wantLogits) step.copy(this.#act("logits"), 0, this.#logitsStaging(), 0, out * vocab * 4);
      if (candidates > 0) {
        // Beam search needs log-probabilities, and sampling already runs on the device, so the log-softmax
        // and the top candidates do too: k (token, logprob) pairs per row come back instead of vocab logits.
        const c = this.#beamCandidates();
        step.dispatch(c.kernel, { logits: this.#act("logits"), candidates: c.buffer }, { rows: out, k: candidates });
        step.copy(c.buffer, 0, c.readback, 0, out * candidates * BEAM_CANDIDATE_WORDS * 4);
      }
    }
    const gatesBytes = rows.length * this.#gateStride * 4;
    if (jobs.length > 0) step.copy(this.#inputs.gates, 0, this.#gatesStaging(), 0, gatesBytes);
    step.submit();

    let gates: Float32Array | undefined;
    if (jobs.length > 0) {
      const staging = this.#gatesStaging();
      await staging.mapAsync(GPUMapMode.READ, 0, gatesBytes);
      gates = new Float32Array(staging.getMappedRange(0, gatesBytes).slice(0));
      staging.unmap();
    }
    if (out === 0) return { tokens: new Uint32Array(0), logits: undefined, gates, candidates: undefined };

    await this.#tokensReadback.mapAsync(GPUMapMode.READ, 0, out * 4);
    const tokens = new Uint32Array(this.#tokensReadback.getMappedRange(0, out * 4).slice(0));
    this.#tokensReadback.unmap();
    let logits: ((i: number) => Float32Array) | undefined;
    if (wantLogits) {
      const staging = this.#logitsStaging();
      await staging.mapAsync(GPUMapMode.READ, 0, out * vocab * 4);
      const all = new Float32Array(staging.getMappedRange(0, out * vocab * 4).slice(0));
      staging.unmap();
      logits = (i) => all.subarray(i * vocab, (i + 1) * vocab);
    }
    let picks: ((i: number, count: number) => BeamCandidates) | undefined;
    if (candidates > 0) {
      const { readback } = this.#beamCandidates();
      const bytes = out * candidates * BEAM_CANDIDATE_WORDS * 4;
      await readback.mapAsync(GPUMapMode.READ, 0, bytes);
      const words = readback.getMappedRange(0, bytes).slice(0);
      readback.unmap();
      const ids = new Uint32Array(words);
      const values = new Float32Array(words);
      picks = (i, count) => {
        const at = i * candidates * BEAM_CANDIDATE_WORDS;
        return {
          tokens: Uint32Array.from({ length: count }, (_, j) => ids[at + j * BEAM_CANDIDATE_WORDS]!),
          logprobs: Float32Array.from({ length: count }, (_, j) => values[at + j * BEAM_CANDIDATE_WORDS + 1]!),
        };
      };
    }
    return { tokens, logits, gates, candidates: picks };
  }

  /**
   * Per layer and module, whether any row may need its LoRA: a row with a known non-zero gate, or a
   * row routed on the GPU in this step by an adapter that has the module. Others are not dispatched.
   */
  #loraActivity(rows: readonly Row[], jobs: readonly RouteJob[]): boolean[][] {
    return Array.from({ length: this.plan.dims.layers }, (_, layer) =>
      EXPERT_MODULES.map((m) => {
        const column = gateColumn(layer, m);
        return rows.some((r) => r.gates !== undefined && r.gates[column] !== 0) || jobs.some((j) => j.adapter.routers.has(layer) && j.adapter.has(layer, m));
      }),
    );
  }

  get #gateStride(): number {
    return this.plan.dims.layers * MODULES_PER_LAYER;
  }

  #resident(name: string): ResidentAdapter {
    const adapter = this.#adapters.get(name);
    if (!adapter) {
      const loaded = this.#adapters.names();
      throw new EngineError(`no adapter named "${name}" is loaded (loaded: ${loaded.length > 0 ? loaded.join(", ") : "none"})`);
    }
    return adapter;
  }

  /** Records one op; `active` says which of the layer's expert modules run their LoRA (EXPERT_MODULES order). */
  #dispatch(op: PlanOp, rows: number, layer: number, active: readonly boolean[]): void {
    const step = this.#step;
    const act = (name: ActivationName) => this.#act(name);
    const kernel = (key: string) => this.#kernels.get(key)!;
    const cache = { kCache: this.#cache.keys[layer]!, vCache: this.#cache.values[layer]! };
    const { positions, rowSlot } = this.#inputs;
    switch (op.op) {
      case "rmsnorm":
        return step.dispatch(kernel(op.kernel), { x: act(op.input), weight: this.#weights.buffer(layerTensor(op.weight, layer)), out: act(op.output) }, { rows });
      case "linear":
        this.#linear(op, rows, layer);
        if (op.lora && active[op.lora.gateColumn]) this.#lora(op, op.lora, rows, layer);
        return;
      case "rope":
        return step.dispatch(kernel(op.kernel), { q: act(op.q), k: act(op.k), positions }, { rows });
      case "kv_write":
        return step.dispatch(kernel(op.kernel), { k: act(op.k), v: act(op.v), ...cache, rowSlot, positions }, { rows });
      case "attention":
        return step.dispatch(kernel(op.kernel), { q: act(op.q), ...cache, rowSlot, positions, out: act(op.output) }, { rows });
      case "swiglu":
        return step.dispatch(kernel(op.kernel), { gate: act(op.gate), up: act(op.up), out: act(op.output) }, { n: rows * this.plan.dims.intermediate });
      case "sample":
        return step.dispatch(kernel(op.kernel), { logits: act(op.logits), settings: this.#inputs.settings, tokens: this.#inputs.tokens }, { rows });
    }
  }

  #linear(op: Extract<PlanOp, { op: "linear" }>, rows: number, layer: number): void {
    const key = rows <= this.plan.matvecMaxRows ? op.matvec : op.matmul;
    const weight = this.#weights.get(layerTensor(op.weight, layer));
    const io = { x: this.#act(op.input), y: this.#act(op.output), ...(op.residual === undefined ? {} : { residual: this.#act(op.residual) }) };
    if (weight.blocks.length === 1) {
      this.#step.dispatch(this.#kernels.get(key)!, { ...io, w: weight.blocks[0]!.buffer }, { rows });
      return;
    }
    // A split weight: each row block computes its own columns of y in place (residual included).
    for (const block of weight.blocks) this.#step.dispatch(this.#blockKernel(key, block.rows), { ...io, w: block.buffer }, { rows, column: block.firstRow });
  }

  /** y += g * scaling * B (A x) for the rows whose adapter has a non-zero gate on this module. */
  #lora(op: Extract<PlanOp, { op: "linear" }>, lora: PlanLora, rows: number, layer: number): void {
    const stack = this.#adapters.stack(layer, op.module as ExpertModule);
    const select = { slots: stack.slots, rowAdapter: this.#inputs.rowAdapter, gates: this.#inputs.gates };
    const params = { rows, gateStride: this.#gateStride, gateIndex: layer * MODULES_PER_LAYER + lora.gateColumn };
    const t = this.#inputs.loraT;
    this.#step.dispatch(this.#kernels.get(lora.shrink)!, { x: this.#act(op.input), a: stack.a, ...select, t }, params);
    this.#step.dispatch(this.#kernels.get(lora.expand)!, { t, b: stack.b, ...select, y: this.#act(op.output) }, params);
  }

  /** The variant of a linear kernel for a row block of `N` output features, written into the full-width y. */
  #blockKernel(key: string, N: number): KernelSource {
    const planned = this.plan.kernels.find((k) => k.key === key)!;
    if (planned.family !== "matmul" && planned.family !== "matvec") throw new Error(`${key} is not a linear kernel`);
    return this.#kernelFor({ family: planned.family, constants: { ...planned.constants, N, stride: planned.constants.N } });
  }

  /** The WGSL for a kernel request: the kernel map's when the plan names it, else unplannedKernel's. */
  #kernelFor(request: KernelRequest): KernelSource {
    const id = JSON.stringify(request);
    let source = this.#resolved.get(id);
    if (source === undefined) {
      const key = plannedKey(this.plan, request);
      source = key === undefined ? unplannedKernel(request) : this.#kernels.get(key)!;
      this.#resolved.set(id, source);
    }
    return source;
  }

  *#allKernels(): Iterable<KernelSource> {
    yield* this.#kernels.values();
    for (const op of [...this.plan.layer, ...this.plan.head]) {
      if (op.op !== "linear") continue;
      const weight = this.#weights.get(layerTensor(op.weight, 0));
      if (weight.blocks.length === 1) continue;
      for (const b of weight.blocks) for (const key of [op.matmul, op.matvec]) yield this.#blockKernel(key, b.rows);
    }
  }

  #act(name: ActivationName): GPUBuffer {
    return this.#activations.get(name)!;
  }

  #gatesStaging(): GPUBuffer {
    this.#gatesReadback ??= this.#gpu.device.createBuffer({
      label: "gates readback",
      size: this.maxRows * this.#gateStride * 4,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    return this.#gatesReadback;
  }

  /**
   * The beam candidates kernel and its buffers. The kernel is not part of the plan (a compiled package
   * carries no file for it): it is generated here from the vocabulary size on first use, like the
   * engine's other unplanned kernels, and compiled then.
   */
  #beamCandidates() {
    if (!this.#candidates) {
      const kernel = beamTopKKernel({ vocab: this.plan.dims.vocab });
      this.#pipelines.get(kernel);
      const size = this.maxRows * MAX_BEAM_CANDIDATES * BEAM_CANDIDATE_WORDS * 4;
      this.#candidates = {
        kernel,
        buffer: createStorage(this.#gpu.device, size, "beam candidates"),
        readback: this.#gpu.device.createBuffer({ label: "beam candidates readback", size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST }),
      };
    }
    return this.#candidates;
  }

  #logitsStaging(): GPUBuffer {
    this.#logitsReadback ??= this.#gpu.device.createBuffer({
      label: "logits readback",
      size: this.maxRows * this.plan.dims.vocab * 4,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    return this.#logitsReadback;
  }
}

/**
 * The WGSL of a kernel the plan does not name, generated at run time: the routers of an adapter whose
 * router the plan was not made for (an engine planned without an adapter spec, or a server given another
 * spec's tenants), and row-block variants of a weight split finer than the plan assumed (a device or
 * `maxBindingBytes` below the plan's binding size). A compiled package's own adapter and weights
 * never come here: its plan names all of their kernels.
 */
export function unplannedKernel(request: KernelRequest): KernelSource {
  return plannedKernelSource(request);
}

/** The caller's plan, or one for the options' context, largest rank, binding size and adapter. */
function planOf(options: EngineOptions, maxAdapters: number): Plan {
  const { base, plan } = options;
  if (plan === undefined) {
    const ctx = options.ctx ?? Math.min(base.maxPositions, DEFAULT_CTX_CAP);
    const binding = options.maxBindingBytes === undefined ? {} : { maxBindingBytes: options.maxBindingBytes };
    const adapter = options.adapter === undefined ? {} : { adapter: options.adapter };
    return planBase(base, { ctx, maxLoraRank: maxAdapters === 0 ? 0 : (options.maxLoraRank ?? 16), ...binding, ...adapter });
  }
  if (options.ctx !== undefined || options.maxLoraRank !== undefined || options.adapter !== undefined)
    throw new EngineError("a given plan fixes the context, the largest LoRA rank and the adapter: leave ctx, maxLoraRank and adapter out");
  return plan;
}

/** Whether the sequence still has to route on its prompt (its first step decides for good). */
function routesPrompt(seq: Sequence): boolean {
  return seq.adapter?.adapter.spec.router?.when === "prompt" && seq.gates === undefined;
}

/** W + c * B A for W [out, in] row-major, A [rank, in], B [out, rank]. */
function foldLora(w: Float32Array, a: Float32Array, b: Float32Array, rank: number, c: number): Float32Array {
  const inF = a.length / rank;
  const out = Float32Array.from(w);
  for (let o = 0; o < out.length / inF; o++) {
    for (let j = 0; j < rank; j++) {
      const coef = c * b[o * rank + j]!;
      for (let i = 0; i < inF; i++) out[o * inF + i]! += coef * a[j * inF + i]!;
    }
  }
  return out;
}

/** Settings for out rows whose sample nobody reads (logits-only rows). */
const GREEDY: SamplingSettings = { temperature: 0, topK: 0, topP: 1, seed: 0, step: 0 };

function blockOf(t: GpuTensor, row: number) {
  return t.blocks.find((b) => row >= b.firstRow && row < b.firstRow + b.rows)!;
}

/** Consecutive runs in a sorted index list, as [first source index, first target index, length]. */
function runs(indices: readonly number[]): [number, number, number][] {
  const out: [number, number, number][] = [];
  indices.forEach((from, to) => {
    const last = out.at(-1);
    if (last && last[0] + last[2] === from) last[2]++;
    else out.push([from, to, 1]);
  });
  return out;
}
