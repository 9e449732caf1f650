// The GPU engine of a base model: loads a checkpoint as the plan describes it, then advances batches of
// sequences. One step runs the rows of several sequences (prefill chunks and decode tokens mixed) through
// every layer in one command encoder and one submit, and reads back only the sampled token ids (plus
// the logits a sequence asked for).
import type { BaseModel } from "../compiler/model.ts";
import { SAMPLING_WORDS, packSamplingSettings, type SamplingSettings } from "../compiler/kernels/sampling.ts";
import { kernelSources, layerTensor, planBase, plannedKernelSource, type ActivationName, type Plan, type PlanOp } from "../compiler/plan.ts";
import type { KernelSource } from "../compiler/kernels/kernel.ts";
import { openCheckpoint, type ProgressFn } from "./checkpoint.ts";
import { acquireDevice, type AdapterReport, type GpuContext } from "./device.ts";
import { generate, generateBatch, type GenerateRequest, type Generation } from "./generate.ts";
import { PipelineCache, StepEncoder, createStorage } from "./kernel-runner.ts";
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
  /** Bytes read from the checkpoint so far, of the total. */
  readonly onProgress?: ProgressFn;
  /** Largest storage binding to assume (default: the device's); tensors beyond it are split. */
  readonly maxBindingBytes?: number;
}

export interface CreateSequenceOptions {
  readonly sampling?: SamplingOptions;
  readonly logits?: LogitsMode;
}

/** What a step gave one sequence whose pending tokens all ran. */
export interface StepOutput {
  /** The token sampled after its last token. */
  readonly token: number;
  /** Logits rows ([vocab] each) as the sequence's `logits` mode asked: every run row's, or the last. */
  readonly logits?: readonly Float32Array[];
}

/** One token of a step: its id, its position and the cache slot of its sequence. */
interface Row {
  readonly slot: number;
  readonly token: number;
  readonly position: number;
}

const DEFAULT_CTX_CAP = 2048;

export class Engine {
  readonly #gpu: GpuContext;
  readonly #ownsDevice: boolean;
  readonly #weights: GpuWeights;
  readonly #cache: KvCache;
  readonly #kernels: ReadonlyMap<string, KernelSource>;
  readonly #pipelines: PipelineCache;
  readonly #step: StepEncoder;
  readonly #activations: ReadonlyMap<ActivationName, GPUBuffer>;
  readonly #inputs: { readonly positions: GPUBuffer; readonly rowSlot: GPUBuffer; readonly settings: GPUBuffer; readonly tokens: GPUBuffer };
  readonly #tokensReadback: GPUBuffer;
  #logitsReadback: GPUBuffer | undefined;
  /** Output of one row block of a split linear weight, before its columns are copied into place. */
  readonly #blockOutput: GPUBuffer | undefined;
  #nextId = 0;
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(
    readonly plan: Plan,
    readonly maxRows: number,
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
    this.#kernels = kernelSources(plan);
    this.#pipelines = new PipelineCache(device);
    this.#step = new StepEncoder(device, this.#pipelines);
    this.#activations = new Map(plan.activations.map((a) => [a.name, createStorage(device, maxRows * a.width * 4, `activation ${a.name}`)]));
    this.#inputs = {
      positions: createStorage(device, maxRows * 4, "positions"),
      rowSlot: createStorage(device, maxRows * 4, "row slots"),
      settings: createStorage(device, maxRows * SAMPLING_WORDS * 4, "sampling settings"),
      tokens: createStorage(device, maxRows * 4, "sampled tokens"),
    };
    this.#tokensReadback = device.createBuffer({ label: "tokens readback", size: maxRows * 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    const split = plan.tensors.map((t) => weights.get(t.name)).filter((t) => t.blocks.length > 1);
    const widestBlock = Math.max(0, ...split.flatMap((t) => t.blocks.map((b) => b.rows)));
    this.#blockOutput = widestBlock > 0 ? createStorage(device, maxRows * widestBlock * 4, "split linear block output") : undefined;
    // Compiling every pipeline now keeps shader compilation out of the first step's timing.
    for (const k of this.#allKernels()) this.#pipelines.get(k);
  }

  /**
   * Plans the base, checks the checkpoint against it (every problem at once), uploads the weights and
   * allocates the KV cache. Throws PlanError, CheckpointError, EngineError or NoAdapterError.
   */
  static async load(options: EngineOptions): Promise<Engine> {
    const { base } = options;
    const ctx = options.ctx ?? Math.min(base.maxPositions, DEFAULT_CTX_CAP);
    const plan = planBase(base, { ctx });
    const slots = options.maxSequences ?? 4;
    if (!Number.isInteger(slots) || slots < 1) throw new EngineError(`maxSequences must be a positive integer, got ${slots}`);
    const checkpoint = openCheckpoint(options.checkpointDir, options.onProgress ? { onProgress: options.onProgress } : {});
    let gpu: GpuContext | undefined;
    try {
      gpu = options.gpu ?? (await acquireDevice(options.backend === undefined ? {} : { backend: options.backend }));
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
      const engine = new Engine(plan, maxRows, gpu, options.gpu === undefined, weights, new KvCache(gpu.device, cacheShape));
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
      const rows = Array.from({ length: n }, (_, position) => ({ slot: 0, token: 0, position }));
      await this.#run(rows, [n - 1], [GREEDY], false);
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

  /** A new sequence holding `prompt` (pending), bound to a free KV cache slot. */
  createSequence(prompt: readonly number[], options: CreateSequenceOptions = {}): Sequence {
    if (prompt.length === 0) throw new SequenceError("a prompt needs at least one token");
    const sampling = checkSampling(options.sampling ?? {});
    const slot = this.#cache.acquire();
    if (slot === undefined) throw new EngineError(`all ${this.#cache.shape.slots} sequence slots are in use`);
    const seq = new Sequence(this.#nextId++, slot, this.plan.dims.ctx, this.plan.dims.vocab, sampling);
    try {
      seq.append(prompt);
    } catch (e) {
      this.#cache.release(slot);
      throw e;
    }
    seq.logits = options.logits ?? "none";
    return seq;
  }

  /** Ends a sequence and frees its slot. */
  release(seq: Sequence): void {
    if (seq.released) return;
    seq.markReleased();
    this.#cache.release(seq.slot);
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
    this.#cache.destroy();
    this.#step.destroy();
    for (const b of [...this.#activations.values(), ...Object.values(this.#inputs), this.#tokensReadback]) b.destroy();
    this.#logitsReadback?.destroy();
    this.#blockOutput?.destroy();
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
    }
    const outputs = new Map<Sequence, StepOutput>();
    const logitsSoFar = new Map<Sequence, Float32Array[]>();
    let waiting = [...seqs];
    while (waiting.length > 0) {
      const rows: (Row & { readonly seq: Sequence })[] = [];
      const outRows: number[] = [];
      const finishing = new Map<Sequence, number>(); // sequence -> its sampled out-row index
      for (const seq of waiting) {
        const take = Math.min(seq.pending, this.maxRows - rows.length);
        if (take === 0) break;
        const first = rows.length;
        for (let i = 0; i < take; i++) rows.push({ seq, slot: seq.slot, token: seq.tokens[seq.cached + i]!, position: seq.cached + i });
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
      const result = await this.#run(rows, outRows, settings, wantLogits);

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
        outputs.set(seq, { token: result.tokens[out]!, ...(logits ? { logits } : {}) });
      }
      waiting = waiting.filter((s) => !outputs.has(s));
    }
    return outputs;
  }

  /**
   * One forward step: `rows` through every layer, then the head on `outRows` (indices into rows),
   * sampled with `settings` (one per out row). One submit; the only wait is for the readback.
   */
  async #run(rows: readonly Row[], outRows: readonly number[], settings: readonly SamplingSettings[], wantLogits: boolean) {
    const { device } = this.#gpu;
    const { hidden, vocab } = this.plan.dims;
    const queue = device.queue;
    queue.writeBuffer(this.#inputs.positions, 0, Uint32Array.from(rows, (r) => r.position));
    queue.writeBuffer(this.#inputs.rowSlot, 0, Uint32Array.from(rows, (r) => r.slot));
    const step = this.#step;

    const x = this.#act(this.plan.input);
    const embedding = this.#weights.get(this.plan.embedding);
    rows.forEach((row, r) => {
      const block = blockOf(embedding, row.token);
      step.copy(block.buffer, (row.token - block.firstRow) * hidden * 4, x, r * hidden * 4, hidden * 4);
    });
    for (let layer = 0; layer < this.plan.dims.layers; layer++) {
      for (const op of this.plan.layer) this.#dispatch(op, rows.length, layer);
    }
    const out = outRows.length;
    if (out > 0) {
      const headInput = this.#act(this.plan.headInput);
      for (const [from, to, count] of runs(outRows)) step.copy(x, from * hidden * 4, headInput, to * hidden * 4, count * hidden * 4);
      queue.writeBuffer(this.#inputs.settings, 0, packSamplingSettings(settings));
      for (const op of this.plan.head) this.#dispatch(op, out, 0);
      step.copy(this.#inputs.tokens, 0, this.#tokensReadback, 0, out * 4);
      if (wantLogits) step.copy(this.#act("logits"), 0, this.#logitsStaging(), 0, out * vocab * 4);
    }
    step.submit();
    if (out === 0) return { tokens: new Uint32Array(0), logits: undefined };

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
    return { tokens, logits };
  }

  #dispatch(op: PlanOp, rows: number, layer: number): void {
    const step = this.#step;
    const act = (name: ActivationName) => this.#act(name);
    const kernel = (key: string) => this.#kernels.get(key)!;
    const cache = { kCache: this.#cache.keys[layer]!, vCache: this.#cache.values[layer]! };
    const { positions, rowSlot } = this.#inputs;
    switch (op.op) {
      case "rmsnorm":
        return step.dispatch(kernel(op.kernel), { x: act(op.input), weight: this.#weights.buffer(layerTensor(op.weight, layer)), out: act(op.output) }, { rows });
      case "linear":
        return this.#linear(op, rows, layer);
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
    const x = this.#act(op.input);
    const y = this.#act(op.output);
    const residual: Record<string, GPUBuffer> = op.residual === undefined ? {} : { residual: this.#act(op.residual) };
    if (weight.blocks.length === 1) {
      this.#step.dispatch(this.#kernels.get(key)!, { x, w: weight.blocks[0]!.buffer, ...residual, y }, { rows });
      return;
    }
    // A split weight (never with a residual, see PlanTensor.splittable): each block's columns are
    // computed apart, then copied row by row into their place in y.
    const N = weight.shape[0]!;
    for (const block of weight.blocks) {
      this.#step.dispatch(this.#blockKernel(key, block.rows), { x, w: block.buffer, y: this.#blockOutput! }, { rows });
      for (let r = 0; r < rows; r++) this.#step.copy(this.#blockOutput!, r * block.rows * 4, y, (r * N + block.firstRow) * 4, block.rows * 4);
    }
  }

  /** The variant of a linear kernel for a row block of `N` output features. */
  #blockKernel(key: string, N: number): KernelSource {
    const planned = this.plan.kernels.find((k) => k.key === key)!;
    if (planned.family !== "matmul" && planned.family !== "matvec") throw new Error(`${key} is not a linear kernel`);
    return plannedKernelSource({ ...planned, constants: { ...planned.constants, N } });
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

  #logitsStaging(): GPUBuffer {
    this.#logitsReadback ??= this.#gpu.device.createBuffer({
      label: "logits readback",
      size: this.maxRows * this.plan.dims.vocab * 4,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    return this.#logitsReadback;
  }
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
