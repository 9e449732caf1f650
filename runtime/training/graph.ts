// One training step on the device: the forward pass of a packed batch of whole sequences through the
// frozen base with the adapter's LoRA (keeping what the backward pass reads), the fused cross-entropy
// on the supervised rows, then the backward pass layer by layer down to the first layer's input,
// accumulating the gradient of every trainable tensor. Everything is recorded into one StepEncoder and
// submitted once; only the per-row losses come back.
//
// Per layer l the forward keeps: x_l (the layer's input), xn (input norm), q and k after RoPE, v, the
// attention output and its log-sum-exp, h (after the attention residual), xn2, gate, up, act, and each
// adapted module's shrink output t = A x. The backward recomputes nothing and stores no [rows, rows] or
// [rows, vocab] gradient beside the logits (the cross-entropy kernel overwrites them with their gradient).
import { sequenceBounds, sequencePositions } from "../../compiler/kernels/attention-train.ts";
import { dropoutParams } from "../../compiler/kernels/dropout.ts";
import { pcg } from "../../compiler/kernels/sampling.ts";
import { EXPERT_MODULES, type ExpertModule } from "../../compiler/model.ts";
import type { Plan, PlanTensor } from "../../compiler/plan.ts";
import { StepEncoder, createStorage, type PipelineCache } from "../gpu/kernel-runner.ts";
import type { GpuTensor, GpuWeights } from "../engine/weights.ts";
import { IGNORE_INDEX } from "./data.ts";
import type { TrainKernelRequest, TrainKernelResolver } from "./kernels.ts";
import type { TrainLora, TrainableParams } from "./params.ts";

/** Sequences packed row after row, as the step runs them. */
export interface PackedBatch {
  readonly rows: number;
  readonly lengths: readonly number[];
  readonly tokens: Uint32Array;
  readonly positions: Uint32Array;
  /** Per row [first row, one past the last row] of its sequence (attention-train.ts's layout). */
  readonly sequences: Uint32Array;
  /** The rows whose next token is supervised, and that token. */
  readonly supervisedRows: Uint32Array;
  readonly targets: Uint32Array;
}

/** Packs examples (tokens and HF labels) into one batch. */
export function packBatch(examples: readonly { readonly tokens: readonly number[]; readonly labels: readonly number[] }[]): PackedBatch {
  const lengths = examples.map((e) => e.tokens.length);
  const tokens = Uint32Array.from(examples.flatMap((e) => e.tokens));
  const supervised: number[] = [];
  const targets: number[] = [];
  let row = 0;
  for (const e of examples) {
    for (let t = 0; t + 1 < e.tokens.length; t++) {
      const label = e.labels[t + 1]!;
      if (label !== IGNORE_INDEX) {
        supervised.push(row + t);
        targets.push(label);
      }
    }
    row += e.tokens.length;
  }
  return {
    rows: tokens.length,
    lengths,
    tokens,
    positions: sequencePositions(lengths),
    sequences: sequenceBounds(lengths),
    supervisedRows: Uint32Array.from(supervised),
    targets: Uint32Array.from(targets),
  };
}

type Saved = "x" | "xn" | "q" | "k" | "v" | "attn" | "lse" | "h" | "xn2" | "gate" | "up" | "act";

/** Linear modules in forward order with their input and output activation names. */
const LINEAR_IO: readonly { readonly module: ExpertModule; readonly input: Saved; readonly output: Saved }[] = [
  { module: "q_proj", input: "xn", output: "q" },
  { module: "k_proj", input: "xn", output: "k" },
  { module: "v_proj", input: "xn", output: "v" },
  { module: "o_proj", input: "attn", output: "h" },
  { module: "gate_proj", input: "xn2", output: "gate" },
  { module: "up_proj", input: "xn2", output: "up" },
  { module: "down_proj", input: "act", output: "x" },
];

export interface TrainingGraphOptions {
  readonly device: GPUDevice;
  readonly plan: Plan;
  readonly weights: GpuWeights;
  readonly params: TrainableParams;
  readonly kernel: TrainKernelResolver;
  readonly pipelines: PipelineCache;
  /** Rows of the largest batch a step runs (sum of its sequences' lengths). */
  readonly maxRows: number;
}

export class TrainingGraph {
  readonly #device: GPUDevice;
  readonly #plan: Plan;
  readonly #weights: GpuWeights;
  readonly #params: TrainableParams;
  readonly #kernel: TrainKernelResolver;
  readonly #step: StepEncoder;
  readonly maxRows: number;
  /** Saved activations per layer, and x of layer L (the last layer's output). */
  readonly #saved: Map<Saved, GPUBuffer>[] = [];
  /** Shrink outputs t [maxRows, rank] per adapted module. */
  readonly #t = new Map<TrainLora, GPUBuffer>();
  readonly #scratch: Record<
    "dX" | "dXn" | "dAttn" | "dQ" | "dK" | "dV" | "dAct" | "dGate" | "dUp" | "stats" | "dt" | "dGates" | "headIn" | "final" | "logits" | "loss" | "dropped" | "dDropped",
    GPUBuffer
  >;
  /** The step's dropout seed; undefined in evaluation (no dropout). */
  #dropoutSeed: number | undefined;
  readonly #inputs: Record<"positions" | "sequences" | "rowAdapter" | "gates" | "targets", GPUBuffer>;
  readonly #lossReadback: GPUBuffer;
  readonly #gateStride: number;

  constructor(o: TrainingGraphOptions) {
    this.#device = o.device;
    this.#plan = o.plan;
    this.#weights = o.weights;
    this.#params = o.params;
    this.#kernel = o.kernel;
    this.maxRows = o.maxRows;
    this.#step = new StepEncoder(o.device, o.pipelines);
    const { hidden, qWidth, kvWidth, intermediate, heads, layers, vocab } = o.plan.dims;
    const R = o.maxRows;
    const f32 = (floats: number, label: string) => createStorage(o.device, Math.max(4, floats * 4), label);
    const widths: Record<Saved, number> = { x: hidden, xn: hidden, q: qWidth, k: kvWidth, v: kvWidth, attn: qWidth, lse: heads, h: hidden, xn2: hidden, gate: intermediate, up: intermediate, act: intermediate };
    for (let l = 0; l <= layers; l++) {
      const names: Saved[] = l === layers ? ["x"] : (Object.keys(widths) as Saved[]);
      this.#saved.push(new Map(names.map((n) => [n, f32(R * widths[n], `layer ${l} ${n}`)])));
    }
    const maxRank = Math.max(1, ...o.params.lora.map((l) => l.rank));
    const maxIn = Math.max(1, ...o.params.lora.filter((l) => l.dropout > 0).map((l) => l.inFeatures));
    for (const l of o.params.lora) this.#t.set(l, f32(R * l.rank, `layer ${l.layer} ${l.module} t`));
    this.#gateStride = layers * EXPERT_MODULES.length;
    this.#scratch = {
      dX: f32(R * hidden, "dX"),
      dXn: f32(R * hidden, "dXn"),
      dAttn: f32(R * qWidth, "dAttn"),
      dQ: f32(R * qWidth, "dQ"),
      dK: f32(R * kvWidth, "dK"),
      dV: f32(R * kvWidth, "dV"),
      dAct: f32(R * intermediate, "dAct"),
      dGate: f32(R * intermediate, "dGate"),
      dUp: f32(R * intermediate, "dUp"),
      stats: f32(R * heads * 2, "attention stats"),
      dt: f32(R * maxRank, "dt"),
      dGates: f32(R * this.#gateStride, "dGates"),
      headIn: f32(R * hidden, "head input"),
      final: f32(R * hidden, "final norm"),
      logits: f32(R * vocab, "logits"),
      loss: f32(R, "loss"),
      // A module's LoRA input after dropout and its gradient, regenerated per use from the mask's hash.
      dropped: f32(R * maxIn, "dropped LoRA input"),
      dDropped: f32(R * maxIn, "dropped LoRA input gradient"),
    };
    this.#inputs = {
      positions: f32(R, "positions"),
      sequences: f32(R * 2, "sequences"),
      rowAdapter: createStorage(o.device, new Uint32Array(R), "row adapter"), // every row uses slot 0
      gates: f32(R * this.#gateStride, "gates"),
      targets: f32(R, "targets"),
    };
    this.#lossReadback = o.device.createBuffer({ label: "loss readback", size: Math.max(4, R * 4), usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  }

  /**
   * Forward and backward for `batch`: adds each trainable tensor's gradient of
   * lossScale * (sum of the batch's per-token cross-entropies) into its grad buffer. Returns that sum
   * (unscaled), for reporting. With `backward: false`, the forward and the loss only (evaluation).
   */
  async run(batch: PackedBatch, lossScale: number, options: { readonly backward: boolean; readonly dropoutSeed?: number } = { backward: true }): Promise<{ lossSum: number }> {
    if (batch.rows > this.maxRows) throw new Error(`a batch of ${batch.rows} rows exceeds the graph's ${this.maxRows}`);
    this.#dropoutSeed = options.backward ? options.dropoutSeed : undefined;
    const queue = this.#device.queue;
    queue.writeBuffer(this.#inputs.positions, 0, batch.positions);
    queue.writeBuffer(this.#inputs.sequences, 0, batch.sequences);
    queue.writeBuffer(this.#inputs.targets, 0, batch.targets);
    queue.writeBuffer(this.#inputs.gates, 0, this.#plainGates(batch.rows));
    this.#forward(batch);
    const supervised = batch.supervisedRows.length;
    this.#head(batch, lossScale, options.backward);
    if (options.backward) this.#backward(batch);
    if (supervised > 0) this.#step.copy(this.#scratch.loss, 0, this.#lossReadback, 0, supervised * 4);
    this.#step.submit();
    if (supervised === 0) return { lossSum: 0 };
    await this.#lossReadback.mapAsync(GPUMapMode.READ, 0, supervised * 4);
    const losses = new Float32Array(this.#lossReadback.getMappedRange(0, supervised * 4).slice(0));
    this.#lossReadback.unmap();
    let lossSum = 0;
    for (const l of losses) lossSum += l;
    return { lossSum };
  }

  /** Gate 1 on every adapted module of every row: plain LoRA. */
  #plainGates(rows: number): Float32Array {
    const gates = new Float32Array(rows * this.#gateStride);
    for (const l of this.#params.lora) {
      const column = l.layer * EXPERT_MODULES.length + EXPERT_MODULES.indexOf(l.module);
      for (let r = 0; r < rows; r++) gates[r * this.#gateStride + column] = 1;
    }
    return gates;
  }

  #k(request: TrainKernelRequest) {
    return this.#kernel(request);
  }

  #tensor(role: PlanTensor["role"], layer?: number, module?: ExpertModule): GpuTensor {
    const t = this.#plan.tensors.find((x) => x.role === role && x.layer === layer && x.module === module);
    if (!t) throw new Error(`training: the plan has no ${role} tensor${layer === undefined ? "" : ` for layer ${layer}`}${module ? ` ${module}` : ""}`);
    return this.#weights.get(t.name);
  }

  #headTensor(): GpuTensor {
    return this.#plan.dims.tiedEmbeddings ? this.#weights.get(this.#plan.embedding) : this.#tensor("lm_head");
  }

  /** y = x W^T (+ residual), W possibly split into row blocks that each write their columns in place. */
  #linear(weight: GpuTensor, x: GPUBuffer, y: GPUBuffer, rows: number, residual?: GPUBuffer): void {
    const [N, K] = weight.shape as [number, number];
    const io = { x, y, ...(residual ? { residual } : {}) };
    if (weight.blocks.length === 1) {
      this.#step.dispatch(this.#k({ family: "matmul", constants: { K, N, residual: residual !== undefined } }), { ...io, w: weight.blocks[0]!.buffer }, { rows });
      return;
    }
    for (const b of weight.blocks) {
      const kernel = this.#k({ family: "matmul", constants: { K, N: b.rows, residual: residual !== undefined, stride: N } });
      this.#step.dispatch(kernel, { ...io, w: b.buffer }, { rows, column: b.firstRow });
    }
  }

  /** dx (+)= dy W, block by block for a split W (the blocks after the first accumulate). */
  #linearBackward(weight: GpuTensor, dy: GPUBuffer, dx: GPUBuffer, rows: number, accumulate: boolean): void {
    const [N, K] = weight.shape as [number, number];
    if (weight.blocks.length === 1) {
      this.#step.dispatch(this.#k({ family: "matmul_input_grad", constants: { K, N, accumulate } }), { dy, w: weight.blocks[0]!.buffer, dx }, { rows });
      return;
    }
    weight.blocks.forEach((b, i) => {
      const kernel = this.#k({ family: "matmul_input_grad", constants: { K, N: b.rows, accumulate: accumulate || i > 0, stride: N } });
      this.#step.dispatch(kernel, { dy, w: b.buffer, dx }, { rows, column: b.firstRow });
    });
  }

  #loraParams(l: TrainLora, rows: number) {
    return { rows, gateStride: this.#gateStride, gateIndex: l.layer * EXPERT_MODULES.length + EXPERT_MODULES.indexOf(l.module) };
  }

  /** The dropout mask stream of a module in this step, or undefined when it has no dropout now. */
  #dropout(l: TrainLora, rows: number): Record<string, number> | undefined {
    if (l.dropout === 0 || this.#dropoutSeed === undefined) return undefined;
    const stream = pcg((pcg(this.#dropoutSeed >>> 0) ^ (l.layer * 8 + EXPERT_MODULES.indexOf(l.module) + 1)) >>> 0);
    return dropoutParams(l.dropout, rows * l.inFeatures, stream);
  }

  /** y += g * s * B (A dropout(x)) for an adapted module, keeping t = A dropout(x). */
  #loraForward(l: TrainLora, input: GPUBuffer, y: GPUBuffer, rows: number): void {
    const constants = { inFeatures: l.inFeatures, outFeatures: l.outFeatures, maxRank: l.rank };
    const select = { slots: l.slots, rowAdapter: this.#inputs.rowAdapter, gates: this.#inputs.gates };
    const t = this.#t.get(l)!;
    const dropout = this.#dropout(l, rows);
    if (dropout) this.#step.dispatch(this.#k({ family: "dropout", constants: {} }), { x: input, out: this.#scratch.dropped }, dropout);
    const x = dropout ? this.#scratch.dropped : input;
    this.#step.dispatch(this.#k({ family: "lora_shrink", constants }), { x, a: l.a.value, ...select, t }, this.#loraParams(l, rows));
    this.#step.dispatch(this.#k({ family: "lora_expand", constants }), { t, b: l.b.value, ...select, y }, this.#loraParams(l, rows));
  }

  /**
   * The LoRA's part of the backward: dx += dt A (through the dropout mask, regenerated), and dA, dB
   * accumulated.
   */
  #loraBackward(l: TrainLora, input: GPUBuffer, dy: GPUBuffer, dx: GPUBuffer, rows: number): void {
    const constants = { inFeatures: l.inFeatures, outFeatures: l.outFeatures, maxRank: l.rank };
    const select = { slots: l.slots, rowAdapter: this.#inputs.rowAdapter, gates: this.#inputs.gates };
    const params = { ...this.#loraParams(l, rows), slot: 0 };
    const { dt, dGates, dropped, dDropped } = this.#scratch;
    const t = this.#t.get(l)!;
    const dropout = this.#dropout(l, rows);
    if (dropout) this.#step.dispatch(this.#k({ family: "dropout", constants: {} }), { x: input, out: dropped }, dropout);
    const x = dropout ? dropped : input;
    // With dropout, dt A goes to dDropped (zero: dropout_grad leaves it so) and then through the mask.
    this.#step.dispatch(this.#k({ family: "lora_backward_input", constants }), { dy, t, a: l.a.value, b: l.b.value, ...select, dt, dGates, dx: dropout ? dDropped : dx }, params);
    this.#step.dispatch(this.#k({ family: "lora_grad_b", constants: { ...constants, accumulate: true } }), { dy, t, ...select, dB: l.b.grad }, params);
    this.#step.dispatch(this.#k({ family: "lora_grad_a", constants: { ...constants, accumulate: true } }), { x, dt, ...select, dA: l.a.grad }, params);
    if (dropout) this.#step.dispatch(this.#k({ family: "dropout_grad", constants: {} }), { g: dDropped, acc: dx }, dropout);
  }

  #forward(batch: PackedBatch): void {
    const { hidden, layers, heads, kvHeads, headDim, ropeTheta, rmsNormEps } = this.#plan.dims;
    const rows = batch.rows;
    const step = this.#step;
    const embedding = this.#weights.get(this.#plan.embedding);
    const x0 = this.#saved[0]!.get("x")!;
    batch.tokens.forEach((token, r) => {
      const block = embedding.blocks.find((b) => token >= b.firstRow && token < b.firstRow + b.rows)!;
      step.copy(block.buffer, (token - block.firstRow) * hidden * 4, x0, r * hidden * 4, hidden * 4);
    });
    const norm = this.#k({ family: "rmsnorm", constants: { hidden, eps: rmsNormEps } });
    const rope = this.#k({ family: "rope", constants: { heads, kvHeads, headDim, theta: ropeTheta } });
    const attention = this.#k({ family: "attention_train", constants: { heads, kvHeads, headDim } });
    const swiglu = this.#k({ family: "swiglu", constants: {} });
    for (let l = 0; l < layers; l++) {
      const s = this.#saved[l]!;
      const next = this.#saved[l + 1]!.get("x")!;
      const act = (name: Saved) => s.get(name)!;
      step.dispatch(norm, { x: act("x"), weight: this.#tensor("attn_norm", l).blocks[0]!.buffer, out: act("xn") }, { rows });
      for (const { module, input, output } of LINEAR_IO) {
        if (module === "o_proj") {
          step.dispatch(rope, { q: act("q"), k: act("k"), positions: this.#inputs.positions }, { rows });
          step.dispatch(attention, { q: act("q"), k: act("k"), v: act("v"), sequences: this.#inputs.sequences, out: act("attn"), lse: act("lse") }, { rows });
        }
        if (module === "gate_proj") step.dispatch(norm, { x: act("h"), weight: this.#tensor("mlp_norm", l).blocks[0]!.buffer, out: act("xn2") }, { rows });
        if (module === "down_proj") step.dispatch(swiglu, { gate: act("gate"), up: act("up"), out: act("act") }, { n: rows * this.#plan.dims.intermediate });
        const y = output === "x" ? next : act(output);
        const residual = module === "o_proj" ? act("x") : module === "down_proj" ? act("h") : undefined;
        this.#linear(this.#tensor("linear", l, module), act(input), y, rows, residual);
        const lora = this.#params.loraOf(l, module);
        if (lora) this.#loraForward(lora, act(input), y, rows);
      }
    }
  }

  /** Final norm, lm_head and the fused cross-entropy on the supervised rows; dX = their gradient. */
  #head(batch: PackedBatch, lossScale: number, backward: boolean): void {
    const { hidden, layers, vocab, rmsNormEps } = this.#plan.dims;
    const step = this.#step;
    const { headIn, final, logits, loss, dX } = this.#scratch;
    const last = this.#saved[layers]!.get("x")!;
    const S = batch.supervisedRows.length;
    // dX starts at zero: rows that predict nothing get no gradient from the head.
    this.#device.queue.writeBuffer(dX, 0, new Float32Array(batch.rows * hidden));
    if (S === 0) return;
    for (const [from, to, count] of runs(batch.supervisedRows)) step.copy(last, from * hidden * 4, headIn, to * hidden * 4, count * hidden * 4);
    const normWeight = this.#tensor("final_norm").blocks[0]!.buffer;
    step.dispatch(this.#k({ family: "rmsnorm", constants: { hidden, eps: rmsNormEps } }), { x: headIn, weight: normWeight, out: final }, { rows: S });
    const head = this.#headTensor();
    this.#linear(head, final, logits, S);
    step.dispatch(this.#k({ family: "cross_entropy", constants: { vocab } }), { logits, labels: this.#inputs.targets, loss }, { rows: S, lossScale });
    if (!backward) return;
    // dFinal = dLogits W_head, then the final norm's input gradient, scattered back to the rows.
    this.#linearBackward(head, logits, final, S, false);
    step.dispatch(this.#k({ family: "rmsnorm_backward", constants: { hidden, eps: rmsNormEps, accumulate: false } }), { x: headIn, weight: normWeight, dy: final, dx: this.#scratch.dXn }, { rows: S });
    for (const [from, to, count] of runs(batch.supervisedRows)) step.copy(this.#scratch.dXn, to * hidden * 4, dX, from * hidden * 4, count * hidden * 4);
  }

  #backward(batch: PackedBatch): void {
    const { hidden, layers, heads, kvHeads, headDim, ropeTheta, rmsNormEps, intermediate } = this.#plan.dims;
    const rows = batch.rows;
    const step = this.#step;
    const sc = this.#scratch;
    const attentionConstants = { heads, kvHeads, headDim };
    const normBackward = this.#k({ family: "rmsnorm_backward", constants: { hidden, eps: rmsNormEps, accumulate: true } });
    for (let l = layers - 1; l >= 0; l--) {
      const s = this.#saved[l]!;
      const act = (name: Saved) => s.get(name)!;
      const lora = (module: ExpertModule) => this.#params.loraOf(l, module);
      const linearBack = (module: ExpertModule, input: Saved, dy: GPUBuffer, dx: GPUBuffer, accumulate: boolean) => {
        this.#linearBackward(this.#tensor("linear", l, module), dy, dx, rows, accumulate);
        const adapted = lora(module);
        if (adapted) this.#loraBackward(adapted, act(input), dy, dx, rows);
      };
      // dX holds d(layer output) = d(h) too: the MLP's residual passes it through unchanged.
      linearBack("down_proj", "act", sc.dX, sc.dAct, false);
      step.dispatch(this.#k({ family: "swiglu_backward", constants: {} }), { gate: act("gate"), up: act("up"), dAct: sc.dAct, dGate: sc.dGate, dUp: sc.dUp }, { n: rows * intermediate });
      linearBack("gate_proj", "xn2", sc.dGate, sc.dXn, false);
      linearBack("up_proj", "xn2", sc.dUp, sc.dXn, true);
      step.dispatch(normBackward, { x: act("h"), weight: this.#tensor("mlp_norm", l).blocks[0]!.buffer, dy: sc.dXn, dx: sc.dX }, { rows });
      // dX = d(h); the attention's residual passes it to x as well.
      linearBack("o_proj", "attn", sc.dX, sc.dAttn, false);
      step.dispatch(this.#k({ family: "attention_backward_stats", constants: attentionConstants }), { dOut: sc.dAttn, out: act("attn"), lse: act("lse"), stats: sc.stats }, { rows });
      const common = { q: act("q"), k: act("k"), v: act("v"), dOut: sc.dAttn, stats: sc.stats, sequences: this.#inputs.sequences };
      step.dispatch(this.#k({ family: "attention_backward_query", constants: attentionConstants }), { ...common, dQ: sc.dQ }, { rows });
      step.dispatch(this.#k({ family: "attention_backward_kv", constants: attentionConstants }), { ...common, dK: sc.dK, dV: sc.dV }, { rows });
      step.dispatch(this.#k({ family: "rope_backward", constants: { heads, kvHeads, headDim, theta: ropeTheta } }), { dq: sc.dQ, dk: sc.dK, positions: this.#inputs.positions }, { rows });
      linearBack("q_proj", "xn", sc.dQ, sc.dXn, false);
      linearBack("k_proj", "xn", sc.dK, sc.dXn, true);
      linearBack("v_proj", "xn", sc.dV, sc.dXn, true);
      step.dispatch(normBackward, { x: act("x"), weight: this.#tensor("attn_norm", l).blocks[0]!.buffer, dy: sc.dXn, dx: sc.dX }, { rows });
      // dX = d(x_l): the next (lower) layer's output gradient.
    }
  }

  destroy(): void {
    for (const m of this.#saved) for (const b of m.values()) b.destroy();
    for (const b of this.#t.values()) b.destroy();
    for (const b of [...Object.values(this.#scratch), ...Object.values(this.#inputs), this.#lossReadback]) b.destroy();
    this.#step.destroy();
  }
}

/** Runs of consecutive rows as [from row, to index, count]. */
function runs(rows: Uint32Array): [number, number, number][] {
  const out: [number, number, number][] = [];
  rows.forEach((r, i) => {
    const last = out.at(-1);
    if (last && last[0] + last[2] === r) last[2]++;
    else out.push([r, i, 1]);
  });
  return out;
}

