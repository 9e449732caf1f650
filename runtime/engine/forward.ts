// The forward encoder: one engine step on the device. It writes the step's rows (positions, cache
// slots, tenant slots and known gates), records every layer's ops (routers first where they route,
// the base kernels, each module's LoRA where some row needs it), then the head on the out rows (logit
// processing, sampling, beam candidates, chosen logprobs), in one command encoder and one submit, and
// reads back only what was asked for. It owns the buffers a step runs on.
import { EXPERT_MODULES, type ExpertModule } from "../../compiler/model.ts";
import { ADJUST_ENTRY_WORDS, ADJUST_ROW_WORDS, BEAM_CANDIDATE_WORDS, MAX_BEAM_CANDIDATES, NO_ADAPTER, SAMPLING_WORDS, packSamplingSettings, type SamplingSettings } from "../gpu/layouts.ts";
import type { KernelSource } from "../gpu/kernel.ts";
import { createStorage, StepEncoder, type BufferArg, type PipelineCache } from "../gpu/kernel-runner.ts";
import { layerTensor, type ActivationName, type FamilyBinding, type KernelFamily, type Plan, type PlanLora, type PlanOp } from "../package/format.ts";
import { EngineError } from "./engine-error.ts";
import { CHOICE_BYTES, loraTWords } from "../gpu/layouts.ts";
import type { EngineKernels } from "./kernels.ts";
import type { KvCache } from "./kv-cache.ts";
import type { LogitProcessing } from "./logit-adjust.ts";
import type { BeamCandidates } from "./requests.ts";
import { RouterDispatch, type RouteJob } from "./router-dispatch.ts";
import { moeRouterKey } from "../formats/adapter.ts";
import { MODULES_PER_LAYER, gateColumn } from "./routing.ts";
import type { Row } from "./step-planner.ts";
import type { AdapterStore } from "./tenants.ts";
import type { GpuTensor, GpuWeights } from "./weights.ts";

/** What one step runs. */
export interface ForwardStep {
  readonly rows: readonly Row[];
  /** Rows (indices into rows) the head runs on, ascending. */
  readonly outRows: readonly number[];
  /** Sampler settings, one per out row. */
  readonly settings: readonly SamplingSettings[];
  /** Whether the out rows' logits come back. */
  readonly wantLogits: boolean;
  /** Sequences routed on the device in this step. */
  readonly jobs: readonly RouteJob[];
  /** Beam candidates per out row to read back (0: none). */
  readonly candidates?: number;
  /** Penalties, bias and min_p of the out rows, when any has some. */
  readonly processing?: LogitProcessing;
  /** Whether the sampled tokens' log-probabilities come back. */
  readonly chosenLogprobs?: boolean;
  /** A prompt routed over chunks: the chunk sizes (step-planner.ts PlannedStep.chunks). */
  readonly chunks?: readonly number[];
}

/** What one step read back, per out row unless said otherwise. */
export interface ForwardResult {
  readonly tokens: Uint32Array;
  readonly logits: ((out: number) => Float32Array) | undefined;
  /** The gates table [rows, layers * 7] after the step, when a router ran (a chunked step: its one row). */
  readonly gates: Float32Array | undefined;
  readonly candidates: ((out: number, count: number) => BeamCandidates) | undefined;
  readonly chosen: Float32Array | undefined;
}

export interface ForwardEncoderOptions {
  readonly device: GPUDevice;
  readonly plan: Plan<ExpertModule>;
  /** Rows one step may run. */
  readonly maxRows: number;
  /** Tenants routed in one step at most (the router dispatch's index segments). */
  readonly maxTenants: number;
  readonly weights: GpuWeights;
  readonly cache: KvCache;
  readonly kernels: EngineKernels;
  readonly pipelines: PipelineCache;
  readonly tenants: AdapterStore;
}

/**
 * Per row, one past the last position its sequence (its cache slot) reaches in the step: the length a
 * dynamic rope_scaling scales by, as Hugging Face scales each forward by max(position_ids) + 1.
 */
export function stepLengths(rows: readonly { readonly slot: number; readonly position: number }[]): Uint32Array {
  const last = new Map<number, number>();
  for (const r of rows) last.set(r.slot, Math.max(last.get(r.slot) ?? 0, r.position + 1));
  return Uint32Array.from(rows, (r) => last.get(r.slot)!);
}

/** Settings for out rows whose sample nobody reads (logits-only rows). */
export const GREEDY: SamplingSettings = { temperature: 0, topK: 0, topP: 1, seed: 0, step: 0 };

export class ForwardEncoder {
  readonly #device: GPUDevice;
  readonly #plan: Plan<ExpertModule>;
  readonly #maxRows: number;
  readonly #weights: GpuWeights;
  readonly #cache: KvCache;
  readonly #kernels: EngineKernels;
  readonly #pipelines: PipelineCache;
  readonly #tenants: AdapterStore;
  readonly #router: RouterDispatch;
  readonly #step: StepEncoder;
  readonly #activations: ReadonlyMap<ActivationName, GPUBuffer>;
  /** u32 words of one module's region of loraT. */
  readonly #tWords: number;
  readonly #widths: ReadonlyMap<ActivationName, number>;
  readonly #inputs: {
    readonly positions: GPUBuffer;
    readonly rowSlot: GPUBuffer;
    /** Per row, for dynamic rope scaling: stepLengths(). */
    readonly lengths: GPUBuffer;
    readonly settings: GPUBuffer;
    readonly tokens: GPUBuffer;
    /**
     * Per row: tenant slot, gates [rows, layers * 7]; and the shrinks' output t, one region of
     * loraTWords per module of the largest shrink group (a group's module i writes region i).
     */
    readonly rowAdapter: GPUBuffer;
    readonly gates: GPUBuffer;
    readonly loraT: GPUBuffer;
    /** per_ffn: each row's expert choices of the current layer [rows, k] (compiler/kernels/moe.ts). */
    readonly choice: GPUBuffer;
  };
  readonly #tokensReadback: GPUBuffer;
  #logitsReadback: GPUBuffer | undefined;
  #gatesReadback: GPUBuffer | undefined;
  /** Beam candidates [maxRows, MAX_BEAM_CANDIDATES] on the device and their readback, made on first use. */
  #candidates: { readonly kernel: KernelSource<FamilyBinding<"beam_topk">>; readonly buffer: GPUBuffer; readonly readback: GPUBuffer } | undefined;
  /** Logit processing (penalties, bias, min_p) and chosen logprobs: kernels and buffers made on first use. */
  #processing: LogitProcessingBuffers | undefined;
  /** The logits the sampling op reads in this step, when processing wrote them elsewhere. */
  #sampleInput: GPUBuffer | undefined;
  /** A chunked prompt's hidden states [rows, hidden] and its rows' positions and slots, made on first use. */
  readonly #prompt: { states?: GPUBuffer; inputs?: GPUBuffer } = {};

  constructor(options: ForwardEncoderOptions) {
    const { device, plan, maxRows } = options;
    this.#device = device;
    this.#plan = plan;
    this.#maxRows = maxRows;
    this.#weights = options.weights;
    this.#cache = options.cache;
    this.#kernels = options.kernels;
    this.#pipelines = options.pipelines;
    this.#tenants = options.tenants;
    this.#step = new StepEncoder(device, this.#pipelines);
    this.#activations = new Map(plan.activations.map((a) => [a.name, createStorage(device, maxRows * a.width * 4, `activation ${a.name}`)]));
    this.#widths = new Map(plan.activations.map((a) => [a.name, a.width]));
    this.#tWords = loraTWords(maxRows, plan.maxLoraRank);
    const tRegions = Math.max(1, ...plan.layer.map((op) => (op.op === "lora_shrink" ? op.modules.length : 1)));
    this.#inputs = {
      positions: createStorage(device, maxRows * 4, "positions"),
      rowSlot: createStorage(device, maxRows * 4, "row slots"),
      lengths: createStorage(device, maxRows * 4, "row sequence lengths"),
      settings: createStorage(device, maxRows * SAMPLING_WORDS * 4, "sampling settings"),
      tokens: createStorage(device, maxRows * 4, "sampled tokens"),
      rowAdapter: createStorage(device, maxRows * 4, "row adapters"),
      gates: createStorage(device, maxRows * this.#gateStride * 4, "gates"),
      loraT: createStorage(device, tRegions * this.#tWords * 4, "lora shrink output"),
      choice: createStorage(device, maxRows * moeChoices(plan) * CHOICE_BYTES, "moe expert choices"),
    };
    this.#router = new RouterDispatch({
      device,
      hidden: plan.dims.hidden,
      maxRows,
      maxGroups: options.maxTenants,
      maxPromptRows: plan.dims.ctx,
      kernelsOf: (config, layer, router) => this.#kernels.router(config, layer, router.experts),
    });
    this.#tokensReadback = device.createBuffer({ label: "tokens readback", size: maxRows * 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  }

  /**
   * Runs one matmul-sized and one matvec-sized step, since GL drivers (llvmpipe among them) compile a
   * shader on its first dispatch: that belongs to loading, not to the first prefill's timing. The rows
   * scribble on slot 0's cache, which a sequence overwrites before it reads any position.
   */
  async warmUp(): Promise<void> {
    for (const n of [Math.min(this.#maxRows, this.#plan.matvecMaxRows + 1), 1]) {
      const rows = Array.from({ length: n }, (_, position) => ({ slot: 0, token: 0, position, tenantSlot: NO_ADAPTER }));
      await this.run({ rows, outRows: [n - 1], settings: [GREEDY], wantLogits: false, jobs: [] });
    }
  }

  /**
   * One forward step: the rows through every layer (routers of `jobs` first in each layer they route),
   * then the head on the out rows, sampled with `settings`. One submit (and one more per further
   * `maxRows` out rows of a chunked step); the waits are for the readbacks (tokens, and logits and
   * gates when asked for). Throws EngineError, before anything is recorded, when the step needs logit
   * processing kernels the plan lacks.
   */
  async run(input: ForwardStep): Promise<ForwardResult> {
    const { rows, outRows, settings, jobs, processing } = input;
    if (processing || input.chosenLogprobs) this.#logitProcessing();
    const stride = this.#gateStride;
    // The states the head reads: the step's activation, or a chunked prompt's hidden states.
    const source = input.chunks ? this.#recordByLayer(rows, input.chunks, jobs) : this.#recordRows(rows, jobs);
    // A chunked prompt's decision is the same on every table row; row 0 holds it.
    const gatesBytes = (input.chunks ? 1 : rows.length) * stride * 4;
    const max = this.#maxRows;
    const pieces: HeadPiece[] = [];
    for (let start = 0; start === 0 || start < outRows.length; start += max) {
      const end = Math.min(outRows.length, start + max);
      const head = { ...input, settings: settings.slice(start, end), ...(processing ? { processing: processingRows(processing, start, end) } : {}) };
      if (end > start) this.#recordHead(source, outRows.slice(start, end), head);
      if (start === 0 && jobs.length > 0) this.#step.copy(this.#inputs.gates, 0, this.#gatesStaging(), 0, gatesBytes);
      this.#step.submit();
      if (start === 0 && jobs.length > 0) {
        const staging = this.#gatesStaging();
        await staging.mapAsync(GPUMapMode.READ, 0, gatesBytes);
        pieces.push({ gates: new Float32Array(staging.getMappedRange(0, gatesBytes).slice(0)) });
        staging.unmap();
      }
      if (end > start) pieces.push(await this.#readHead(end - start, head));
    }
    return joinPieces(pieces, max, this.#plan.dims.vocab, input.candidates ?? 0);
  }

  /** Writes the rows' inputs and records every layer over them; returns the activation they end in. */
  #recordRows(rows: readonly Row[], jobs: readonly RouteJob[]): GPUBuffer {
    const queue = this.#device.queue;
    queue.writeBuffer(this.#inputs.positions, 0, Uint32Array.from(rows, (r) => r.position));
    queue.writeBuffer(this.#inputs.rowSlot, 0, Uint32Array.from(rows, (r) => r.slot));
    if (this.#plan.dims.ropeScaling?.type === "dynamic") queue.writeBuffer(this.#inputs.lengths, 0, stepLengths(rows));
    const active = this.#loraActivity(rows, jobs);
    if (active.some((layer) => layer.some(Boolean))) {
      const G = this.#gateStride;
      const gates = new Float32Array(rows.length * G);
      rows.forEach((r, i) => r.gates && gates.set(r.gates, i * G));
      queue.writeBuffer(this.#inputs.rowAdapter, 0, Uint32Array.from(rows, (r) => r.tenantSlot));
      queue.writeBuffer(this.#inputs.gates, 0, gates);
    }
    const x = this.#act(this.#plan.input);
    this.#embed(rows, x);
    const groups = this.#router.prepare(jobs);
    const table = { buffer: this.#inputs.gates, stride: this.#gateStride };
    const routedFfn = this.#routedFeedForward(rows);
    for (let layer = 0; layer < this.#plan.dims.layers; layer++) {
      for (const group of groups) this.#router.route(this.#step, group, layer, x, table);
      this.#layerOps(rows.length, layer, active[layer]!, routedFfn[layer]!);
    }
    return x;
  }

  /**
   * A prompt routed over chunks (one sequence, `jobs` its one prompt route over all rows): its hidden
   * states [rows, hidden] stay whole on the device, so each layer's router pools over the whole prompt
   * before any chunk runs that layer; then each chunk in turn is copied into the step's activation, runs
   * the layer (its keys and values written before the next chunk attends to them) and is copied back.
   * Every chunk's table rows take the layer's decision. Returns the final hidden states.
   */
  #recordByLayer(rows: readonly Row[], chunks: readonly number[], jobs: readonly RouteJob[]): GPUBuffer {
    const [job] = jobs;
    if (jobs.length !== 1 || job!.perRow || job!.first !== 0 || job!.count !== rows.length) throw new Error("a chunked step routes exactly one prompt over all its rows");
    const { hidden, layers } = this.#plan.dims;
    const n = rows.length;
    const widest = Math.max(...chunks);
    const states = this.#promptBuffer("states", n * hidden * 4);
    // Positions, cache slots and (dynamic rope scaling) each chunk's lengths of every row, copied chunk
    // by chunk into the step's inputs.
    const inputs = this.#promptBuffer("inputs", 3 * n * 4);
    const queue = this.#device.queue;
    const dynamic = this.#plan.dims.ropeScaling?.type === "dynamic";
    const lengths = chunks.flatMap((count, c) => {
      const first = chunks.slice(0, c).reduce((a, b) => a + b, 0);
      return dynamic ? [...stepLengths(rows.slice(first, first + count))] : [];
    });
    queue.writeBuffer(inputs, 0, Uint32Array.from([...rows.map((r) => r.position), ...rows.map((r) => r.slot), ...lengths]));
    queue.writeBuffer(this.#inputs.rowAdapter, 0, new Uint32Array(widest).fill(rows[0]!.tenantSlot));
    queue.writeBuffer(this.#inputs.gates, 0, new Float32Array(widest * this.#gateStride));
    const active = this.#loraActivity(rows, jobs);
    this.#embed(rows, states);
    const [group] = this.#router.prepare([{ ...job!, tableRows: widest }]);
    const table = { buffer: this.#inputs.gates, stride: this.#gateStride };
    const x = this.#act(this.#plan.input);
    const step = this.#step;
    for (let layer = 0; layer < layers; layer++) {
      this.#router.route(step, group!, layer, states, table);
      let first = 0;
      for (const count of chunks) {
        step.copy(inputs, first * 4, this.#inputs.positions, 0, count * 4);
        step.copy(inputs, (n + first) * 4, this.#inputs.rowSlot, 0, count * 4);
        if (dynamic) step.copy(inputs, (2 * n + first) * 4, this.#inputs.lengths, 0, count * 4);
        step.copy(states, first * hidden * 4, x, 0, count * hidden * 4);
        this.#layerOps(count, layer, active[layer]!, false);
        step.copy(x, 0, states, first * hidden * 4, count * hidden * 4);
        first += count;
      }
    }
    return states;
  }

  /** Copies each row's token embedding into row r of `x` (scaled, where the family scales it). */
  #embed(rows: readonly Row[], x: GPUBuffer): void {
    const hidden = this.#plan.dims.hidden;
    const embedding = this.#weights.get(this.#plan.embedding);
    rows.forEach((row, r) => {
      const block = blockOf(embedding, row.token);
      this.#step.copy(block.buffer, (row.token - block.firstRow) * hidden * 4, x, r * hidden * 4, hidden * 4);
    });
    const scale = this.#plan.embeddingScale;
    if (scale !== undefined) this.#step.dispatch(this.#kernels.get("scale", scale), { x }, { n: rows.length * hidden });
  }

  /** Records the head on `outRows` (at most maxRows rows of `source`) and the copies its readbacks need. */
  #recordHead(source: GPUBuffer, outRows: readonly number[], input: ForwardStep): void {
    const { hidden, vocab } = this.#plan.dims;
    const { processing } = input;
    const candidates = input.candidates ?? 0;
    const out = outRows.length;
    const step = this.#step;
    const headInput = this.#act(this.#plan.headInput);
    for (const [from, to, count] of runs(outRows)) step.copy(source, from * hidden * 4, headInput, to * hidden * 4, count * hidden * 4);
    this.#device.queue.writeBuffer(this.#inputs.settings, 0, packSamplingSettings(input.settings));
    for (const op of this.#plan.head) {
      // Penalties, bias and min_p write processed logits elsewhere: the raw ones stay for logprobs.
      if (op.op === "sample" && processing) this.#sampleInput = this.#adjustLogits(processing, out);
      this.#dispatch(op, out, 0, []);
      this.#sampleInput = undefined;
    }
    step.copy(this.#inputs.tokens, 0, this.#tokensReadback, 0, out * 4);
    if (input.chosenLogprobs) {
      const p = this.#logitProcessing();
      step.dispatch(p.chosenKernel, { logits: this.#act("logits"), tokens: this.#inputs.tokens, out: p.chosen }, { rows: out });
      step.copy(p.chosen, 0, p.chosenReadback, 0, out * 4);
    }
    if (input.wantLogits) step.copy(this.#act("logits"), 0, this.#logitsStaging(), 0, out * vocab * 4);
    if (candidates > 0) {
      // Beam search needs log-probabilities, and sampling already runs on the device, so the log-softmax
      // and the top candidates do too: k (token, logprob) pairs per row come back instead of vocab logits.
      const c = this.#beamCandidates();
      step.dispatch(c.kernel, { logits: this.#act("logits"), candidates: c.buffer }, { rows: out, k: candidates });
      step.copy(c.buffer, 0, c.readback, 0, out * candidates * BEAM_CANDIDATE_WORDS * 4);
    }
  }

  /** Reads back what #recordHead copied for `out` rows (after the submit). */
  async #readHead(out: number, input: ForwardStep): Promise<HeadPiece> {
    const { vocab } = this.#plan.dims;
    const candidates = input.candidates ?? 0;
    await this.#tokensReadback.mapAsync(GPUMapMode.READ, 0, out * 4);
    const tokens = new Uint32Array(this.#tokensReadback.getMappedRange(0, out * 4).slice(0));
    this.#tokensReadback.unmap();
    let logits: Float32Array | undefined;
    if (input.wantLogits) {
      const staging = this.#logitsStaging();
      await staging.mapAsync(GPUMapMode.READ, 0, out * vocab * 4);
      logits = new Float32Array(staging.getMappedRange(0, out * vocab * 4).slice(0));
      staging.unmap();
    }
    let words: ArrayBuffer | undefined;
    if (candidates > 0) {
      const { readback } = this.#beamCandidates();
      const bytes = out * candidates * BEAM_CANDIDATE_WORDS * 4;
      await readback.mapAsync(GPUMapMode.READ, 0, bytes);
      words = readback.getMappedRange(0, bytes).slice(0);
      readback.unmap();
    }
    let chosen: Float32Array | undefined;
    if (input.chosenLogprobs) {
      const { chosenReadback } = this.#logitProcessing();
      await chosenReadback.mapAsync(GPUMapMode.READ, 0, out * 4);
      chosen = new Float32Array(chosenReadback.getMappedRange(0, out * 4).slice(0));
      chosenReadback.unmap();
    }
    return { tokens, ...(logits ? { logits } : {}), ...(words ? { candidates: words } : {}), ...(chosen ? { chosen } : {}) };
  }

  /** A buffer kept for chunked prompts, grown to at least `bytes` (the longest prompt so far). */
  #promptBuffer(which: "states" | "inputs", bytes: number): GPUBuffer {
    const held = this.#prompt[which];
    if (held && held.size >= bytes) return held;
    held?.destroy();
    const made = createStorage(this.#device, bytes, which === "states" ? "chunked prompt hidden states" : "chunked prompt rows");
    this.#prompt[which] = made;
    return made;
  }

  /** Frees every buffer the encoder made. */
  destroy(): void {
    this.#router.destroy();
    this.#step.destroy();
    for (const b of [...this.#activations.values(), ...Object.values(this.#inputs), this.#tokensReadback]) b.destroy();
    this.#logitsReadback?.destroy();
    this.#gatesReadback?.destroy();
    this.#candidates?.buffer.destroy();
    this.#candidates?.readback.destroy();
    this.#prompt.states?.destroy();
    this.#prompt.inputs?.destroy();
    if (this.#processing) for (const b of [this.#processing.info, this.#processing.entries, this.#processing.work, this.#processing.chosen, this.#processing.chosenReadback]) b.destroy();
  }

  /**
   * Per layer and module, whether any row may need its LoRA: a row with a known non-zero gate, or a
   * row routed on the GPU in this step by an adapter that has the module. Others are not dispatched.
   */
  #loraActivity(rows: readonly Row[], jobs: readonly RouteJob[]): boolean[][] {
    return Array.from({ length: this.#plan.dims.layers }, (_, layer) =>
      EXPERT_MODULES.map((m) => {
        const column = gateColumn(layer, m);
        return rows.some((r) => r.gates !== undefined && r.gates[column] !== 0) || jobs.some((j) => j.tenant.routers.has(layer) && j.tenant.has(layer, m));
      }),
    );
  }

  /**
   * One layer's ops. A per_ffn layer's feed-forward passes after the first come last in the layer (plan.ts
   * feedForwardPasses): when no row's adapter routes this layer's feed-forward, every row's first pass is
   * its whole MLP (weight 1) and the rest are skipped.
   */
  #layerOps(rows: number, layer: number, active: readonly boolean[], routedFfn: boolean): void {
    for (const op of this.#plan.layer) {
      this.#dispatch(op, rows, layer, active);
      if (!routedFfn && op.op === "moe_mix" && op.pass === 0) return;
    }
  }

  /** Per layer, whether some row's adapter has a per_ffn router there. */
  #routedFeedForward(rows: readonly Row[]): boolean[] {
    const { layers } = this.#plan.dims;
    if (this.#plan.moe?.placement !== "per_ffn") return new Array<boolean>(layers).fill(false);
    const slots = new Set(rows.map((r) => r.tenantSlot));
    const tenants = this.#tenants.names().map((n) => this.#tenants.get(n)!).filter((t) => slots.has(t.slot));
    return Array.from({ length: layers }, (_, layer) => tenants.some((t) => t.adapter.moeRouters?.has(moeRouterKey(layer, "ffn"))));
  }

  get #gateStride(): number {
    return this.#plan.dims.layers * MODULES_PER_LAYER;
  }

  /** Records one op; `active` says which of the layer's expert modules run their LoRA (EXPERT_MODULES order). */
  #dispatch(op: PlanOp, rows: number, layer: number, active: readonly boolean[]): void {
    const step = this.#step;
    const act = (name: ActivationName) => this.#act(name);
    const kernel = <F extends KernelFamily>(family: F, key: string) => this.#kernels.get(family, key);
    const cache = { kCache: this.#cache.keys[layer]!, vCache: this.#cache.values[layer]! };
    const { positions, rowSlot, lengths } = this.#inputs;
    switch (op.op) {
      case "rmsnorm":
        return step.dispatch(kernel("rmsnorm", op.kernel), { x: act(op.input), weight: this.#weights.buffer(layerTensor(op.weight, layer)), out: act(op.output) }, { rows });
      case "linear": {
        // Its LoRA's t is there: the lora_shrink op before it ran (it runs when any of its modules is active).
        const lora = op.lora && active[op.lora.gateColumn] ? op.lora : undefined;
        // A decode step runs the LoRA's expand in the matvec's epilogue (one dispatch less per module).
        if (lora?.matvec !== undefined && rows <= this.#plan.matvecMaxRows) return this.#linearWithLora(op, lora, lora.matvec, rows, layer);
        this.#linear(op, rows, layer);
        if (lora) this.#loraExpand(op, lora, rows, layer);
        return;
      }
      case "rope": {
        const rope = kernel("rope", op.kernel);
        const dynamic = rope.bindings.some((b) => b.name === "lengths");
        return step.dispatch(rope, { q: act(op.q), k: act(op.k), positions, ...(dynamic ? { lengths } : {}) }, { rows });
      }
      case "kv_write":
        return step.dispatch(kernel("kv_write", op.kernel), { k: act(op.k), v: act(op.v), ...cache, rowSlot, positions }, { rows });
      case "attention":
        return step.dispatch(kernel("attention", op.kernel), { q: act(op.q), ...cache, rowSlot, positions, out: act(op.output) }, { rows });
      case "bias":
        return step.dispatch(kernel("bias", op.kernel), { bias: this.#weights.buffer(layerTensor(op.weight, layer)), y: act(op.output) }, { n: rows * this.#widths.get(op.output)! });
      case "swiglu":
      case "geglu":
        return step.dispatch(kernel(op.op, op.kernel), { gate: act(op.gate), up: act(op.up), out: act(op.output) }, { n: rows * this.#plan.dims.intermediate });
      case "sample":
        return step.dispatch(kernel("sampling", op.kernel), { logits: this.#sampleInput ?? act(op.logits), settings: this.#inputs.settings, tokens: this.#inputs.tokens }, { rows });
      case "copy":
        return step.copy(act(op.from), 0, act(op.to), 0, rows * this.#widths.get(op.to)! * 4);
      case "lora_shrink":
        if (!op.modules.some((_, i) => active[op.gateColumn + i])) return;
        return this.#loraShrink(op, rows, layer);
      case "lora":
        if (!active[op.lora.gateColumn]) return;
        return this.#loraExpand(op, op.lora, rows, layer);
      case "moe_route": {
        const router = this.#tenants.moeRouter(moeRouterKey(layer, "ffn"))!;
        return step.dispatch(kernel("moe_route", op.kernel), { x: act(op.input), weight: router.weight, routed: router.routed, rowAdapter: this.#inputs.rowAdapter, choice: this.#inputs.choice }, { rows });
      }
      case "moe_mix":
        return step.dispatch(kernel("moe_mix", op.kernel), { x: act(op.input), residual: act(op.residual), choice: this.#inputs.choice, y: act(op.output) }, { n: rows * this.#widths.get(op.output)!, ffnPass: op.pass });
    }
  }

  #linear(op: Extract<PlanOp, { op: "linear" }>, rows: number, layer: number): void {
    const key = rows <= this.#plan.matvecMaxRows ? op.matvec : op.matmul;
    const weight = this.#weights.get(layerTensor(op.weight, layer));
    const io = { x: this.#act(op.input), y: this.#act(op.output), ...(op.residual === undefined ? {} : { residual: this.#act(op.residual) }) };
    const family = rows <= this.#plan.matvecMaxRows ? "matvec" : "matmul";
    if (weight.blocks.length === 1) {
      this.#step.dispatch(this.#kernels.get(family, key), { ...io, w: weight.blocks[0]!.buffer }, { rows });
      return;
    }
    // A split weight: each row block computes its own columns of y in place (residual included).
    for (const block of weight.blocks) this.#step.dispatch(this.#kernels.block(op, family, block.rows), { ...io, w: block.buffer }, { rows, column: block.firstRow });
  }

  /** The module's product and its LoRA in one matvec (the LoRA epilogue, reading its region of t with the row info). */
  #linearWithLora(op: Extract<PlanOp, { op: "linear" }>, lora: PlanLora, key: string, rows: number, layer: number): void {
    const stack = this.#tenants.stack(layer, op.module as ExpertModule);
    const w = this.#weights.get(layerTensor(op.weight, layer)).blocks[0]!.buffer;
    const residual = op.residual === undefined ? {} : { residual: this.#act(op.residual) };
    this.#step.dispatch(this.#kernels.get("matvec", key), { x: this.#act(op.input), w, ...residual, t: this.#tRegion(lora), b: stack.b, dora: stack.dora, y: this.#act(op.output) }, { rows });
  }

  /**
   * t = A x for the rows whose adapter has a non-zero gate on each of the op's modules, one dispatch
   * for the group (module i into region i of t, each row's LoRA info after its values; the MoE
   * variants, groups of one, gate the ranks: per_module routes the row with the module's router,
   * per_ffn reads the pass's expert choices).
   */
  #loraShrink(op: Extract<PlanOp, { op: "lora_shrink" }>, rows: number, layer: number): void {
    const modules = op.modules as readonly ExpertModule[];
    const group = this.#tenants.group(layer, modules);
    const shrink = this.#kernels.get("lora_shrink", op.kernel);
    const bound = new Set(shrink.bindings.map((b) => b.name));
    const router = bound.has("router") ? this.#tenants.moeRouter(moeRouterKey(layer, modules[0]!))! : undefined;
    const moe = { ...(router ? { router: router.weight, routed: router.routed } : {}), ...(bound.has("choice") ? { choice: this.#inputs.choice } : {}) };
    const strides: Record<string, number> = modules.length > 1 ? { aRows: group.aRows, slotStride: group.slotStride, tStride: this.#tWords } : {};
    const params = { rows, gateStride: this.#gateStride, gateIndex: layer * MODULES_PER_LAYER + op.gateColumn, ...strides, ...(op.pass === undefined ? {} : { ffnPass: op.pass }) };
    const select = { rowAdapter: this.#inputs.rowAdapter, gates: this.#inputs.gates };
    this.#step.dispatch(shrink, { x: this.#act(op.input), a: group.a, slots: group.slots, ...select, ...moe, t: this.#inputs.loraT }, params);
  }

  /** The module's region of t (lora.t), which the shrink before it wrote. */
  #tRegion(lora: PlanLora): BufferArg {
    const size = this.#tWords * 4;
    return { buffer: this.#inputs.loraT, offset: lora.t * size, size };
  }

  /**
   * y += g * scaling * B t for the shrink's active rows; for a DoRA slot the expand kernel also scales
   * the module's base product by its factors (lora.ts).
   */
  #loraExpand(op: Extract<PlanOp, { op: "linear" | "lora" }>, lora: PlanLora, rows: number, layer: number): void {
    const stack = this.#tenants.stack(layer, op.module as ExpertModule);
    // Where the base product added a residual, the DoRA term reads it back to recover W x.
    const residual = op.op === "linear" && op.residual !== undefined ? { residual: this.#act(op.residual) } : {};
    const expand = this.#kernels.get("lora_expand", lora.expand);
    this.#step.dispatch(expand, { t: this.#tRegion(lora), b: stack.b, ...this.#loraSelect(stack), dora: stack.dora, ...residual, y: this.#act(op.output) }, this.#loraParams(lora, rows, layer));
  }

  #loraSelect(stack: { readonly slots: BufferArg }) {
    return { slots: stack.slots, rowAdapter: this.#inputs.rowAdapter, gates: this.#inputs.gates };
  }

  #loraParams(lora: PlanLora, rows: number, layer: number) {
    return { rows, gateStride: this.#gateStride, gateIndex: layer * MODULES_PER_LAYER + lora.gateColumn };
  }

  #act(name: ActivationName): GPUBuffer {
    return this.#activations.get(name)!;
  }


  #gatesStaging(): GPUBuffer {
    this.#gatesReadback ??= this.#device.createBuffer({
      label: "gates readback",
      size: this.#maxRows * this.#gateStride * 4,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    return this.#gatesReadback;
  }

  /**
   * The beam candidates kernel (the plan's `beamTopK`) and its buffers, made on first use.
   */
  #beamCandidates() {
    if (!this.#candidates) {
      const kernel = this.#kernels.get("beam_topk", this.#plan.beamTopK);
      this.#pipelines.get(kernel);
      const size = this.#maxRows * MAX_BEAM_CANDIDATES * BEAM_CANDIDATE_WORDS * 4;
      this.#candidates = {
        kernel,
        buffer: createStorage(this.#device, size, "beam candidates"),
        readback: this.#device.createBuffer({ label: "beam candidates readback", size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST }),
      };
    }
    return this.#candidates;
  }

  /** Records the logit processing kernel for `out` rows; returns the buffer of processed logits. */
  #adjustLogits(processing: LogitProcessing, out: number): GPUBuffer {
    const p = this.#logitProcessing();
    const device = this.#device;
    if (processing.entries.byteLength > p.entries.size) {
      p.entries.destroy();
      p.entries = createStorage(device, Math.max(processing.entries.byteLength, 2 * p.entries.size), "logit adjust entries");
    }
    device.queue.writeBuffer(p.info, 0, processing.info);
    device.queue.writeBuffer(p.entries, 0, processing.entries);
    this.#step.dispatch(p.adjustKernel, { logits: this.#act("logits"), info: p.info, entries: p.entries, work: p.work }, { rows: out });
    return p.work;
  }

  #logitProcessing(): LogitProcessingBuffers {
    if (!this.#processing) {
      const device = this.#device;
      const { vocab } = this.#plan.dims;
      const { logitAdjust, chosenLogprob } = this.#plan;
      if (logitAdjust === undefined || chosenLogprob === undefined) {
        throw new EngineError("this plan has no logit processing kernels (penalties, logit bias, min-p, logprobs): it was compiled before they existed; recompile the package");
      }
      const adjustKernel = this.#kernels.get("logit_adjust", logitAdjust);
      const chosenKernel = this.#kernels.get("chosen_logprob", chosenLogprob);
      this.#pipelines.get(adjustKernel);
      this.#pipelines.get(chosenKernel);
      this.#processing = {
        adjustKernel,
        chosenKernel,
        info: createStorage(device, this.#maxRows * ADJUST_ROW_WORDS * 4, "logit adjust rows"),
        entries: createStorage(device, 1024 * ADJUST_ENTRY_WORDS * 4, "logit adjust entries"),
        work: createStorage(device, this.#maxRows * vocab * 4, "processed logits"),
        chosen: createStorage(device, this.#maxRows * 4, "chosen logprobs"),
        chosenReadback: device.createBuffer({ label: "chosen logprobs readback", size: this.#maxRows * 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST }),
      };
    }
    return this.#processing;
  }

  #logitsStaging(): GPUBuffer {
    this.#logitsReadback ??= this.#device.createBuffer({
      label: "logits readback",
      size: this.#maxRows * this.#plan.dims.vocab * 4,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    return this.#logitsReadback;
  }
}

interface LogitProcessingBuffers {
  readonly adjustKernel: KernelSource<FamilyBinding<"logit_adjust">>;
  readonly chosenKernel: KernelSource<FamilyBinding<"chosen_logprob">>;
  readonly info: GPUBuffer;
  entries: GPUBuffer;
  readonly work: GPUBuffer;
  readonly chosen: GPUBuffer;
  readonly chosenReadback: GPUBuffer;
}

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

/** What one head submit read back, and the gates table read with the first. */
interface HeadPiece {
  readonly gates?: Float32Array;
  readonly tokens?: Uint32Array;
  readonly logits?: Float32Array;
  /** (token, logprob) words, BEAM_CANDIDATE_WORDS per candidate. */
  readonly candidates?: ArrayBuffer;
  readonly chosen?: Float32Array;
}

/** The head pieces (each `max` out rows but the last) as one result over all out rows. */
function joinPieces(pieces: readonly HeadPiece[], max: number, vocab: number, candidates: number): ForwardResult {
  const gates = pieces.find((p) => p.gates)?.gates;
  const heads = pieces.filter((p) => p.tokens);
  const at = (i: number) => [heads[Math.floor(i / max)]!, i % max] as const;
  const tokens = new Uint32Array(heads.reduce((n, p) => n + p.tokens!.length, 0));
  heads.forEach((p, k) => tokens.set(p.tokens!, k * max));
  const logits = heads[0]?.logits && ((i: number) => {
    const [p, r] = at(i);
    return p.logits!.subarray(r * vocab, (r + 1) * vocab);
  });
  const picks = heads[0]?.candidates && ((i: number, count: number): BeamCandidates => {
    const [p, r] = at(i);
    const ids = new Uint32Array(p.candidates!);
    const values = new Float32Array(p.candidates!);
    const first = r * candidates * BEAM_CANDIDATE_WORDS;
    return {
      tokens: Uint32Array.from({ length: count }, (_, j) => ids[first + j * BEAM_CANDIDATE_WORDS]!),
      logprobs: Float32Array.from({ length: count }, (_, j) => values[first + j * BEAM_CANDIDATE_WORDS + 1]!),
    };
  });
  let chosen: Float32Array | undefined;
  if (heads[0]?.chosen) {
    chosen = new Float32Array(tokens.length);
    heads.forEach((p, k) => chosen!.set(p.chosen!, k * max));
  }
  return { tokens, logits: logits || undefined, gates, candidates: picks || undefined, chosen };
}

/** Out rows [start, end) of a step's logit processing (the entries stay whole: each row's offset points into them). */
function processingRows(p: LogitProcessing, start: number, end: number): LogitProcessing {
  return { info: p.info.subarray(start * ADJUST_ROW_WORDS, end * ADJUST_ROW_WORDS), entries: p.entries };
}

/** Choices per row a per_ffn plan's router writes (k, or E when dense); 1 otherwise (an unused buffer). */
function moeChoices(plan: Plan): number {
  const moe = plan.moe;
  if (moe?.placement !== "per_ffn") return 1;
  return moe.selection.rule === "top_k" ? moe.selection.k : moe.experts;
}
