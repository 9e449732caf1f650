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
//
// A per_module adapter (MOELoRA, compiler/kernels/moe-train.ts) routes every row of each module's input
// with the module's own router (router-train.ts in token routing over its E experts), keeps the route
// record (P, the gates) per module, gates t rank by rank by the row's expert gates (t_gated, recomputed
// in the backward from t and the record), and sums the load-balancing loss over every module's rows at
// once after the forward; its gradient on P reaches each router's backward through the record.
//
// A per_ffn adapter (MixLoRA, compiler/kernels/moe-train.ts) routes every row of each routed layer's MLP
// input u = xn2 with the layer's router (the same kernels, hidden = hidden), then runs one feed-forward
// pass per kept expert: pass p takes each row's p-th kept expert (in index order) as a one-hot mask that
// gates the stacked LoRA's t rank by rank, so G_p = Wg u + s Bg (mask * Ag u) and U_p likewise (the base
// products and the shrinks Ag u, Au u run once: every expert reads the same u), H_p = silu(G_p) U_p,
// D_p = Wd H_p + s Bd (mask * Ad H_p), and the layer's output is h + sum_p g_p D_p. The forward keeps
// only what every pass shares (u, Wg u, Wu u, Ag u, Au u and the route record): the backward recomputes
// G_p, U_p and H_p per pass (copies, gated expands, SwiGLU and the down LoRA's shrink; no base product),
// and needs no D_p: dg_p = dy . D_p = v . H_p + s (dy Bd) . (mask * Ad H_p) with v = dy Wd, which is
// computed once (every expert's D_e sees the same dy). The passes' gate and up gradients are summed
// before their base input-gradient products (one each per layer), their LoRA gradients are taken pass
// by pass (each pass touches its experts' ranks only).
import { sequenceBounds, sequencePositions } from "../../compiler/kernels/attention-train.ts";
import { dropoutParams } from "../../compiler/kernels/dropout.ts";
import { routerScratchLength } from "../../compiler/kernels/router-train-backward.ts";
import { routeRecordLength, routerSpans, type RouterTrainConstants } from "../../compiler/kernels/router-train.ts";
import { moeBalanceLength } from "../../compiler/kernels/moe-train.ts";
import { ropeConstants } from "../../compiler/kernels/rope.ts";
import { pcg } from "../../compiler/kernels/sampling.ts";
import { EXPERT_MODULES, type ExpertModule } from "../../compiler/model.ts";
import type { Plan, PlanTensor } from "../../compiler/plan.ts";
import { StepEncoder, createStorage, type PipelineCache } from "../gpu/kernel-runner.ts";
import type { GpuTensor, GpuWeights } from "../engine/weights.ts";
import { IGNORE_INDEX } from "./data.ts";
import type { TrainKernelRequest, TrainKernelResolver } from "./kernels.ts";
import type { TrainLora, TrainRouter, TrainTensor, TrainableParams } from "./params.ts";

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
  /** Per sequence, the prompt MiLoRA's router reads: its leading unsupervised positions (at least one). */
  readonly promptLengths: readonly number[];
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
    promptLengths: examples.map((e) => {
      let n = 0;
      while (n < e.labels.length && e.labels[n] === IGNORE_INDEX) n++;
      return Math.max(1, Math.min(n, e.tokens.length));
    }),
  };
}

/** How one run of the graph goes: training (backward, with dropout and the balance loss) or evaluation. */
export interface RunOptions {
  readonly backward: boolean;
  /** Seeds this micro-batch's dropout masks; no dropout without it. */
  readonly dropoutSeed?: number;
  /**
   * MiLoRA: balance / (routed layers x micro-batches of the step), the weight of each layer's eq. 4-5
   * loss; per_module: balance / micro-batches, the weight of the micro-batch's one joint balance loss.
   */
  readonly balanceCoef?: number;
}

/** A per_module (MOELoRA) module: its router's constants (token routing over E experts) and its route record [maxRows, 3E]. */
interface MoeModule {
  readonly lora: TrainLora;
  readonly constants: RouterTrainConstants;
  readonly route: GPUBuffer;
}

/**
 * A per_ffn (MixLoRA) layer: its router W [E, hidden] (token routing over E experts), its route record
 * [maxRows, 3E], and its adapted MLP modules (each E experts stacked to rank E r).
 */
interface FfnLayer {
  readonly layer: number;
  readonly router: TrainTensor;
  readonly constants: RouterTrainConstants;
  readonly route: GPUBuffer;
  /** Feed-forward passes per row: top_k's k, or E for dense. */
  readonly passes: number;
  readonly gate?: TrainLora;
  readonly up?: TrainLora;
  readonly down?: TrainLora;
}

interface RoutedLayer {
  readonly router: TrainRouter;
  readonly constants: RouterTrainConstants;
  readonly pooled: GPUBuffer;
  readonly attn: GPUBuffer;
  readonly route: GPUBuffer;
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
    | "dX" | "dXn" | "dAttn" | "dQ" | "dK" | "dV" | "dAct" | "dGate" | "dUp" | "stats" | "dt" | "dGates" | "headIn" | "final" | "logits" | "loss"
    | "tGated" | "dExpertGates" | "moeTable" | "moeBalance"
    | "ffnGate" | "ffnUp" | "ffnAct" | "ffnDAct" | "ffnSumGate" | "ffnSumUp" | "ffnOut" | "ffnMask" | "ffnPassGate" | "ffnLoraGate" | "ffnDGates" | "zeros"
    | "dropped" | "dDropped" | "routerScratch" | "balance",
    GPUBuffer
  >;
  /** The step's dropout seed; undefined in evaluation (no dropout). */
  #dropoutSeed: number | undefined;
  readonly #inputs: Record<"positions" | "sequences" | "rowAdapter" | "gates" | "targets" | "spans", GPUBuffer>;
  readonly #lossReadback: GPUBuffer;
  readonly #gateStride: number;
  /** Bytes of every buffer the graph allocated: the saved activations and the backward's scratch. */
  readonly bytes: number;
  /** Each routed layer's router: its kernel constants and what its forward keeps for the backward. */
  readonly #routers: readonly RoutedLayer[];
  /** Per layer, the gate column of each adapted module (its index among the layer's adapted modules). */
  readonly #columns: ReadonlyMap<string, number>;
  /** The balance coefficient of this step's decisions (balance / (routed layers x micro-batches)). */
  #balanceCoef = 0;
  /** per_module modules in forward order (layer, then module), and by their LoRA. */
  readonly #moeModules: readonly MoeModule[];
  readonly #moe: ReadonlyMap<TrainLora, MoeModule>;
  /** per_ffn layers by layer. */
  readonly #ffn: ReadonlyMap<number, FfnLayer>;
  /** Whether the forward has not yet summed a per_module or per_ffn router's balance statistics this run. */
  #moeFirst = true;

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
    const ffnLayers = new Set(o.params.ffnRouters.keys());
    for (let l = 0; l <= layers; l++) {
      // A per_ffn layer keeps no act: its passes' H_p are recomputed in the backward ("gate" and "up" hold Wg u and Wu u).
      const names: Saved[] = l === layers ? ["x"] : (Object.keys(widths) as Saved[]).filter((n) => n !== "act" || !ffnLayers.has(l));
      this.#saved.push(new Map(names.map((n) => [n, f32(R * widths[n], `layer ${l} ${n}`)])));
    }
    const maxRank = Math.max(1, ...o.params.lora.map((l) => l.rank));
    const maxIn = Math.max(1, ...o.params.lora.filter((l) => l.dropout > 0).map((l) => l.inFeatures));
    for (const l of o.params.lora) this.#t.set(l, f32(R * l.rank, `layer ${l.layer} ${l.module} t`));
    this.#gateStride = layers * EXPERT_MODULES.length;
    const columns = new Map<string, number>();
    for (let l = 0; l < layers; l++) {
      const adapted = EXPERT_MODULES.filter((m) => o.params.loraOf(l, m));
      adapted.forEach((m, i) => columns.set(`${l}.${m}`, l * EXPERT_MODULES.length + i));
    }
    this.#columns = columns;
    const config = o.params.adapter.spec.router;
    this.#routers = [...o.params.routers.values()].map((router) => {
      if (!config) throw new Error("training: routers without a router configuration");
      const sel = config.selection;
      const constants: RouterTrainConstants = {
        hidden,
        experts: router.experts.length,
        when: config.when,
        pooling: config.pooling,
        activation: config.activation,
        ...(config.rational ? { rational: config.rational } : {}),
        selection: sel.rule === "top_k" ? { rule: "top_k", k: sel.k } : sel.rule === "threshold" ? { rule: "threshold", threshold: sel.threshold } : { rule: "dense" },
        renormalize: sel.rule === "dense" ? false : sel.renormalize,
      };
      const decisions = R; // at most one per row (token routing), one per sequence otherwise
      return {
        router,
        constants,
        pooled: f32(decisions * hidden, `layer ${router.layer} router pooled`),
        attn: f32(R, `layer ${router.layer} router attention`),
        route: f32(routeRecordLength(constants, decisions), `layer ${router.layer} router record`),
      };
    });
    const moeSpec = o.params.adapter.spec.moe;
    const byLayer = (a: TrainLora, b: TrainLora) => a.layer - b.layer || EXPERT_MODULES.indexOf(a.module) - EXPERT_MODULES.indexOf(b.module);
    this.#moeModules = [...o.params.lora]
      .filter((l) => l.moe)
      .sort(byLayer)
      .map((l) => {
        const sel = moeSpec!.selection;
        const constants: RouterTrainConstants = {
          hidden: l.inFeatures,
          experts: l.moe!.experts,
          when: "token",
          pooling: "last",
          activation: "none",
          selection: sel.rule === "top_k" ? { rule: "top_k", k: sel.k } : { rule: "dense" },
          renormalize: sel.rule === "top_k" && sel.renormalize,
        };
        return { lora: l, constants, route: f32(routeRecordLength(constants, R), `layer ${l.layer} ${l.module} router record`) };
      });
    this.#moe = new Map(this.#moeModules.map((m) => [m.lora, m]));
    this.#ffn = new Map(
      [...o.params.ffnRouters].map(([layer, router]): [number, FfnLayer] => {
        const sel = moeSpec!.selection;
        const constants: RouterTrainConstants = {
          hidden,
          experts: moeSpec!.experts,
          when: "token",
          pooling: "last",
          activation: "none",
          selection: sel.rule === "top_k" ? { rule: "top_k", k: sel.k } : { rule: "dense" },
          renormalize: sel.rule === "top_k" && sel.renormalize,
        };
        const mlp = (m: ExpertModule) => {
          const l = o.params.loraOf(layer, m);
          return l ? { [m === "gate_proj" ? "gate" : m === "up_proj" ? "up" : "down"]: l } : {};
        };
        return [
          layer,
          {
            layer,
            router,
            constants,
            route: f32(routeRecordLength(constants, R), `layer ${layer} ffn router record`),
            passes: sel.rule === "top_k" ? sel.k : moeSpec!.experts,
            ...mlp("gate_proj"),
            ...mlp("up_proj"),
            ...mlp("down_proj"),
          },
        ];
      }),
    );
    const ffnAll = [...this.#ffn.values()];
    const maxExperts = Math.max(1, ...this.#moeModules.map((m) => m.constants.experts), ...ffnAll.map((f) => f.constants.experts));
    const moeRows = this.#moeModules.length + ffnAll.length > 0 ? R : 0;
    const ffnRows = ffnAll.length > 0 ? R : 0;
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
      routerScratch: f32(Math.max(1, ...[...this.#routers, ...this.#moeModules, ...ffnAll].map((r) => routerScratchLength(r.constants, R, R))), "router scratch"),
      balance: f32(layers, "balance loss per layer"),
      // per_module: a module's t gated by its experts, the gates' gradient, the router's (unread) gate table, the balance sums.
      tGated: f32(moeRows * maxRank, "gated LoRA shrink output"),
      dExpertGates: f32(moeRows * maxExperts, "expert gate gradients"),
      moeTable: f32(moeRows * maxExperts, "expert gate table"),
      moeBalance: f32(moeBalanceLength(maxExperts), "balance sums"),
      // per_ffn, shared by the layers: the pass's G_p, U_p, H_p, d(H_p), the passes' summed dG and dU,
      // D_p, the one-hot mask of the pass's experts, their gates, the down LoRA's part of dg, every
      // kept expert's dg, and zeros (for du's start).
      ffnGate: f32(ffnRows * intermediate, "feed-forward pass gate"),
      ffnUp: f32(ffnRows * intermediate, "feed-forward pass up"),
      ffnAct: f32(ffnRows * intermediate, "feed-forward pass act"),
      ffnDAct: f32(ffnRows * intermediate, "feed-forward pass act gradient"),
      ffnSumGate: f32(ffnRows * intermediate, "feed-forward passes' gate gradient"),
      ffnSumUp: f32(ffnRows * intermediate, "feed-forward passes' up gradient"),
      ffnOut: f32(ffnRows * hidden, "feed-forward pass output"),
      ffnMask: f32(ffnRows * maxExperts, "feed-forward pass experts"),
      ffnPassGate: f32(ffnRows, "feed-forward pass gates"),
      ffnLoraGate: f32(ffnRows, "feed-forward pass down LoRA gate gradient"),
      ffnDGates: f32(ffnRows * maxExperts, "feed-forward expert gate gradients"),
      zeros: f32(ffnRows * hidden, "zeros"),
    };
    this.#inputs = {
      positions: f32(R, "positions"),
      sequences: f32(R * 2, "sequences"),
      rowAdapter: createStorage(o.device, new Uint32Array(R), "row adapter"), // every row uses slot 0
      gates: f32(R * this.#gateStride, "gates"),
      targets: f32(R, "targets"),
      spans: f32(R * 3, "router spans"),
    };
    const all = [
      ...this.#saved.flatMap((m) => [...m.values()]),
      ...this.#t.values(),
      ...Object.values(this.#scratch),
      ...Object.values(this.#inputs),
      ...this.#routers.flatMap((r) => [r.pooled, r.attn, r.route]),
      ...this.#moeModules.map((m) => m.route),
      ...ffnAll.map((f) => f.route),
    ];
    this.bytes = all.reduce((n, b) => n + b.size, 0);
    this.#lossReadback = o.device.createBuffer({ label: "loss readback", size: (R + layers) * 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  }

  /**
   * Forward and backward for `batch`: adds each trainable tensor's gradient of
   * lossScale * (sum of the batch's per-token cross-entropies) into its grad buffer. Returns that sum
   * (unscaled), for reporting. With `backward: false`, the forward and the loss only (evaluation).
   */
  async run(batch: PackedBatch, lossScale: number, options: RunOptions = { backward: true }): Promise<{ lossSum: number; balanceLoss: number }> {
    if (batch.rows > this.maxRows) throw new Error(`a batch of ${batch.rows} rows exceeds the graph's ${this.maxRows}`);
    this.#dropoutSeed = options.backward ? options.dropoutSeed : undefined;
    this.#balanceCoef = options.backward ? (options.balanceCoef ?? 0) : 0;
    const queue = this.#device.queue;
    queue.writeBuffer(this.#inputs.positions, 0, batch.positions);
    queue.writeBuffer(this.#inputs.sequences, 0, batch.sequences);
    queue.writeBuffer(this.#inputs.targets, 0, batch.targets);
    // Routed layers' gates are written by their routers during the step; a plain adapter's are all 1.
    queue.writeBuffer(this.#inputs.gates, 0, this.#routers.length > 0 ? new Float32Array(batch.rows * this.#gateStride) : this.#plainGates(batch.rows));
    if (this.#routers.length > 0) queue.writeBuffer(this.#inputs.spans, 0, routerSpans(batch.lengths, batch.promptLengths));
    this.#forward(batch);
    const supervised = batch.supervisedRows.length;
    this.#head(batch, lossScale, options.backward);
    if (options.backward) this.#backward(batch);
    const layers = this.#plan.dims.layers;
    this.#step.copy(this.#scratch.balance, 0, this.#lossReadback, 0, layers * 4);
    if (supervised > 0) this.#step.copy(this.#scratch.loss, 0, this.#lossReadback, layers * 4, supervised * 4);
    this.#step.submit();
    const bytes = (layers + supervised) * 4;
    await this.#lossReadback.mapAsync(GPUMapMode.READ, 0, bytes);
    const values = new Float32Array(this.#lossReadback.getMappedRange(0, bytes).slice(0));
    this.#lossReadback.unmap();
    let lossSum = 0;
    for (const l of values.subarray(layers)) lossSum += l;
    // per_module: the one balance loss over every module's rows (index 0).
    if (this.#moeModules.length + this.#ffn.size > 0) return { lossSum, balanceLoss: values[0]! };
    // Eq. 4-5: the balance loss of each routed layer, averaged over them (reported; its gradient is in).
    const balance = this.#routers.reduce((sum, r) => sum + values[r.router.layer]!, 0);
    return { lossSum, balanceLoss: this.#routers.length > 0 ? balance / this.#routers.length : 0 };
  }

  /** Gate 1 on every adapted module of every row: plain LoRA. */
  #plainGates(rows: number): Float32Array {
    const gates = new Float32Array(rows * this.#gateStride);
    for (const l of this.#params.lora) {
      const column = this.#columns.get(`${l.layer}.${l.module}`)!;
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
    const format = packedFormat(weight);
    if (weight.blocks.length === 1) {
      this.#step.dispatch(this.#k({ family: "matmul", constants: { K, N, residual: residual !== undefined, ...format } }), { ...io, w: weight.blocks[0]!.buffer }, { rows });
      return;
    }
    for (const b of weight.blocks) {
      const kernel = this.#k({ family: "matmul", constants: { K, N: b.rows, residual: residual !== undefined, stride: N, ...format } });
      this.#step.dispatch(kernel, { ...io, w: b.buffer }, { rows, column: b.firstRow });
    }
  }

  /** dx (+)= dy W, block by block for a split W (the blocks after the first accumulate). */
  #linearBackward(weight: GpuTensor, dy: GPUBuffer, dx: GPUBuffer, rows: number, accumulate: boolean): void {
    const [N, K] = weight.shape as [number, number];
    const format = packedFormat(weight);
    if (weight.blocks.length === 1) {
      this.#step.dispatch(this.#k({ family: "matmul_input_grad", constants: { K, N, accumulate, ...format } }), { dy, w: weight.blocks[0]!.buffer, dx }, { rows });
      return;
    }
    weight.blocks.forEach((b, i) => {
      const kernel = this.#k({ family: "matmul_input_grad", constants: { K, N: b.rows, accumulate: accumulate || i > 0, stride: N, ...format } });
      this.#step.dispatch(kernel, { dy, w: b.buffer, dx }, { rows, column: b.firstRow });
    });
  }

  #loraParams(l: TrainLora, rows: number) {
    return { rows, gateStride: this.#gateStride, gateIndex: this.#columns.get(`${l.layer}.${l.module}`)! };
  }

  /** The dropout mask stream of a module in this step, or undefined when it has no dropout now. */
  #dropout(l: TrainLora, rows: number): Record<string, number> | undefined {
    if (l.dropout === 0 || this.#dropoutSeed === undefined) return undefined;
    const stream = pcg((pcg(this.#dropoutSeed >>> 0) ^ (l.layer * 8 + EXPERT_MODULES.indexOf(l.module) + 1)) >>> 0);
    return dropoutParams(l.dropout, rows * l.inFeatures, stream);
  }

  /**
   * y += g * s * B (A dropout(x)) for an adapted module, keeping t = A dropout(x). per_module: the
   * module's router first routes each row of x (without dropout, which is the LoRA branch's), and the
   * expand reads t gated rank by rank by the row's expert gates.
   */
  #loraForward(l: TrainLora, input: GPUBuffer, y: GPUBuffer, rows: number): void {
    const constants = { inFeatures: l.inFeatures, outFeatures: l.outFeatures, maxRank: l.rank };
    const select = { slots: l.slots, rowAdapter: this.#inputs.rowAdapter, gates: this.#inputs.gates };
    const t = this.#t.get(l)!;
    const moe = this.#moe.get(l);
    if (moe) this.#moeRouteForward(moe.constants, moe.lora.moe!.router, moe.route, input, rows);
    this.#shrink(l, input, rows);
    const expandInput = moe ? this.#gateRanks(moe, rows) : t;
    this.#step.dispatch(this.#k({ family: "lora_expand", constants }), { t: expandInput, b: l.b.value, ...select, y }, this.#loraParams(l, rows));
  }

  /** t = A dropout(x) of an adapted module into its t buffer (the dropped input left in the `dropped` scratch). */
  #shrink(l: TrainLora, input: GPUBuffer, rows: number): void {
    const constants = { inFeatures: l.inFeatures, outFeatures: l.outFeatures, maxRank: l.rank };
    const select = { slots: l.slots, rowAdapter: this.#inputs.rowAdapter, gates: this.#inputs.gates };
    const dropout = this.#dropout(l, rows);
    if (dropout) this.#step.dispatch(this.#k({ family: "dropout", constants: {} }), { x: input, out: this.#scratch.dropped }, dropout);
    const x = dropout ? this.#scratch.dropped : input;
    this.#step.dispatch(this.#k({ family: "lora_shrink", constants }), { x, a: l.a.value, ...select, t: this.#t.get(l)! }, this.#loraParams(l, rows));
  }

  /**
   * per_module (a module's router) or per_ffn (a layer's): the router on its input rows (its record: P
   * and the gates), and its rows' share of the balance sums.
   */
  #moeRouteForward(c: RouterTrainConstants, router: TrainTensor, route: GPUBuffer, input: GPUBuffer, rows: number): void {
    this.#step.dispatch(
      this.#k({ family: "router_train_forward", constants: c }),
      { x: input, weight: router.value, route, table: this.#scratch.moeTable },
      { decisions: rows, gateStride: c.experts, gateIndex0: 0 },
    );
    this.#step.dispatch(this.#k({ family: "moe_balance_sums", constants: { experts: c.experts } }), { route, balance: this.#scratch.moeBalance }, { decisions: rows, first: this.#moeFirst ? 1 : 0 });
    this.#moeFirst = false;
  }

  /** t_gated = t with each rank times its expert's gate (from the module's record), into the tGated scratch. */
  #gateRanks(moe: MoeModule, rows: number): GPUBuffer {
    const { lora: l, constants: c } = moe;
    this.#step.dispatch(
      this.#k({ family: "lora_rank_gate", constants: { rank: l.rank, experts: c.experts } }),
      { t: this.#t.get(l)!, gates: moe.route, out: this.#scratch.tGated },
      { n: rows * l.rank, gateStride: 3 * c.experts, gateOffset: c.experts },
    );
    return this.#scratch.tGated;
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
    const moe = this.#moe.get(l);
    // With dropout, dt A goes to dDropped (zero: dropout_grad leaves it so) and then through the mask.
    const dxLora = dropout ? dDropped : dx;
    if (moe) {
      // dt = s h_e(j) (dy B)_j, the experts' gate gradients, dx; dB from t_gated, dA from dt.
      const E = moe.constants.experts;
      const tGated = this.#gateRanks(moe, rows);
      this.#step.dispatch(
        this.#k({ family: "lora_backward_input", constants: { ...constants, experts: E } }),
        { dy, t, a: l.a.value, b: l.b.value, ...select, expertGates: moe.route, dt, dGates, dExpertGates: this.#scratch.dExpertGates, dx: dxLora },
        { ...params, expertStride: 3 * E, expertOffset: E },
      );
      this.#step.dispatch(this.#k({ family: "lora_grad_b", constants: { ...constants, accumulate: true } }), { dy, t: tGated, ...select, dB: l.b.grad }, params);
    } else {
      this.#step.dispatch(this.#k({ family: "lora_backward_input", constants }), { dy, t, a: l.a.value, b: l.b.value, ...select, dt, dGates, dx: dxLora }, params);
      this.#step.dispatch(this.#k({ family: "lora_grad_b", constants: { ...constants, accumulate: true } }), { dy, t, ...select, dB: l.b.grad }, params);
    }
    this.#step.dispatch(this.#k({ family: "lora_grad_a", constants: { ...constants, accumulate: true } }), { x, dt, ...select, dA: l.a.grad }, params);
    if (dropout) this.#step.dispatch(this.#k({ family: "dropout_grad", constants: {} }), { g: dDropped, acc: dx }, dropout);
    if (moe) this.#moeRouteBackward(moe.constants, moe.lora.moe!.router, moe.route, input, dx, rows);
  }

  /**
   * per_module (and per_ffn, a layer's router): the balance loss's gradient on P into the record, then its router's backward
   * (the expert gates' gradient through the selection and softmax) adding into the module's input
   * gradient dx, and W's gradient accumulated.
   */
  #moeRouteBackward(c: RouterTrainConstants, router: TrainTensor, route: GPUBuffer, input: GPUBuffer, dx: GPUBuffer, rows: number, dGates = this.#scratch.dExpertGates): void {
    const E = c.experts;
    const scratch = this.#scratch.routerScratch;
    this.#step.dispatch(this.#k({ family: "moe_balance_grad", constants: { experts: E } }), { balance: this.#scratch.moeBalance, route }, { n: rows * E });
    this.#step.dispatch(
      this.#k({ family: "router_train_backward", constants: c }),
      { x: input, weight: router.value, route, dGates, scratch, dx },
      { decisions: rows, gateStride: E, gateIndex0: 0 },
    );
    this.#step.dispatch(this.#k({ family: "router_train_grad", constants: { ...c, accumulate: true } }), { x: input, scratch, dWeight: router.grad }, { decisions: rows });
  }

  #forward(batch: PackedBatch): void {
    const { hidden, layers, heads, kvHeads, headDim, rmsNormEps } = this.#plan.dims;
    const rows = batch.rows;
    const step = this.#step;
    const embedding = this.#weights.get(this.#plan.embedding);
    const x0 = this.#saved[0]!.get("x")!;
    batch.tokens.forEach((token, r) => {
      const block = embedding.blocks.find((b) => token >= b.firstRow && token < b.firstRow + b.rows)!;
      step.copy(block.buffer, (token - block.firstRow) * hidden * 4, x0, r * hidden * 4, hidden * 4);
    });
    const norm = this.#k({ family: "rmsnorm", constants: { hidden, eps: rmsNormEps } });
    const rope = this.#k({ family: "rope", constants: ropeConstants(this.#plan.dims) });
    const attention = this.#k({ family: "attention_train", constants: { heads, kvHeads, headDim } });
    const swiglu = this.#k({ family: "swiglu", constants: {} });
    this.#moeFirst = true;
    for (let l = 0; l < layers; l++) {
      const s = this.#saved[l]!;
      const next = this.#saved[l + 1]!.get("x")!;
      const act = (name: Saved) => s.get(name)!;
      const routed = this.#routers.find((r) => r.router.layer === l);
      if (routed) this.#routeForward(routed, act("x"), batch);
      step.dispatch(norm, { x: act("x"), weight: this.#tensor("attn_norm", l).blocks[0]!.buffer, out: act("xn") }, { rows });
      for (const { module, input, output } of LINEAR_IO) {
        if (module === "o_proj") {
          step.dispatch(rope, { q: act("q"), k: act("k"), positions: this.#inputs.positions }, { rows });
          step.dispatch(attention, { q: act("q"), k: act("k"), v: act("v"), sequences: this.#inputs.sequences, out: act("attn"), lse: act("lse") }, { rows });
        }
        if (module === "gate_proj") {
          step.dispatch(norm, { x: act("h"), weight: this.#tensor("mlp_norm", l).blocks[0]!.buffer, out: act("xn2") }, { rows });
          const ffn = this.#ffn.get(l);
          if (ffn) {
            this.#ffnForward(ffn, s, next, rows);
            break;
          }
        }
        if (module === "down_proj") step.dispatch(swiglu, { gate: act("gate"), up: act("up"), out: act("act") }, { n: rows * this.#plan.dims.intermediate });
        const y = output === "x" ? next : act(output);
        const residual = module === "o_proj" ? act("x") : module === "down_proj" ? act("h") : undefined;
        this.#linear(this.#tensor("linear", l, module), act(input), y, rows, residual);
        const lora = this.#params.loraOf(l, module);
        if (lora) this.#loraForward(lora, act(input), y, rows);
      }
    }
    const routed = [...this.#moeModules, ...this.#ffn.values()];
    if (routed.length > 0) {
      // The joint balance loss over every module's (per_ffn: routed layer's) rows (T = rows x routers), and its gradient on P.
      const experts = routed[0]!.constants.experts;
      this.#step.dispatch(
        this.#k({ family: "moe_balance", constants: { experts } }),
        { balance: this.#scratch.moeBalance, loss: this.#scratch.balance },
        { decisions: rows * routed.length, lossIndex: 0, coef: this.#balanceCoef },
      );
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
    const { hidden, layers, heads, kvHeads, headDim, rmsNormEps, intermediate } = this.#plan.dims;
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
      const ffn = this.#ffn.get(l);
      if (ffn) this.#ffnBackward(ffn, s, rows);
      else {
        linearBack("down_proj", "act", sc.dX, sc.dAct, false);
        step.dispatch(this.#k({ family: "swiglu_backward", constants: {} }), { gate: act("gate"), up: act("up"), dAct: sc.dAct, dGate: sc.dGate, dUp: sc.dUp }, { n: rows * intermediate });
        linearBack("gate_proj", "xn2", sc.dGate, sc.dXn, false);
        linearBack("up_proj", "xn2", sc.dUp, sc.dXn, true);
      }
      step.dispatch(normBackward, { x: act("h"), weight: this.#tensor("mlp_norm", l).blocks[0]!.buffer, dy: sc.dXn, dx: sc.dX }, { rows });
      // dX = d(h); the attention's residual passes it to x as well.
      linearBack("o_proj", "attn", sc.dX, sc.dAttn, false);
      step.dispatch(this.#k({ family: "attention_backward_stats", constants: attentionConstants }), { dOut: sc.dAttn, out: act("attn"), lse: act("lse"), stats: sc.stats }, { rows });
      const common = { q: act("q"), k: act("k"), v: act("v"), dOut: sc.dAttn, stats: sc.stats, sequences: this.#inputs.sequences };
      step.dispatch(this.#k({ family: "attention_backward_query", constants: attentionConstants }), { ...common, dQ: sc.dQ }, { rows });
      step.dispatch(this.#k({ family: "attention_backward_kv", constants: attentionConstants }), { ...common, dK: sc.dK, dV: sc.dV }, { rows });
      step.dispatch(this.#k({ family: "rope_backward", constants: ropeConstants(this.#plan.dims) }), { dq: sc.dQ, dk: sc.dK, positions: this.#inputs.positions }, { rows });
      linearBack("q_proj", "xn", sc.dQ, sc.dXn, false);
      linearBack("k_proj", "xn", sc.dK, sc.dXn, true);
      linearBack("v_proj", "xn", sc.dV, sc.dXn, true);
      step.dispatch(normBackward, { x: act("x"), weight: this.#tensor("attn_norm", l).blocks[0]!.buffer, dy: sc.dXn, dx: sc.dX }, { rows });
      // The router read x_l too: its gradient (through the gates the LoRA backward left in dGates) joins dX.
      const routed = this.#routers.find((r) => r.router.layer === l);
      if (routed) this.#routeBackward(routed, act("x"), batch);
      // dX = d(x_l): the next (lower) layer's output gradient.
    }
  }

  #routerBuffers(r: RoutedLayer, x: GPUBuffer) {
    const c = r.constants;
    return {
      x,
      ...(c.when === "prompt" ? { spans: this.#inputs.spans, pooled: r.pooled } : {}),
      weight: r.router.gate.value,
      ...(c.pooling === "attention" && c.when === "prompt" ? { pooler: r.router.pooler!.value, attn: r.attn } : {}),
      ...(c.activation === "rational" ? { rational: r.router.rational!.value } : {}),
      route: r.route,
    };
  }

  #decisions(r: RoutedLayer, batch: PackedBatch): number {
    return r.constants.when === "prompt" ? batch.lengths.length : batch.rows;
  }

  /** Paper eq. 2-3 (and 8, 6): the layer's gates into the gate table, the balance loss of eq. 4-5 and its gradient. */
  #routeForward(r: RoutedLayer, x: GPUBuffer, batch: PackedBatch): void {
    const decisions = this.#decisions(r, batch);
    const gateIndex0 = r.router.layer * EXPERT_MODULES.length;
    this.#step.dispatch(this.#k({ family: "router_train_forward", constants: r.constants }), { ...this.#routerBuffers(r, x), table: this.#inputs.gates }, { decisions, gateStride: this.#gateStride, gateIndex0 });
    this.#step.dispatch(
      this.#k({ family: "router_balance", constants: { experts: r.constants.experts } }),
      { route: r.route, loss: this.#scratch.balance },
      { decisions, lossIndex: r.router.layer, coef: this.#balanceCoef },
    );
  }

  /** The router's backward: dx += its input gradient, and W_r, w_sa and the rational coefficients' gradients accumulated. */
  #routeBackward(r: RoutedLayer, x: GPUBuffer, batch: PackedBatch): void {
    const decisions = this.#decisions(r, batch);
    const c = r.constants;
    const gateIndex0 = r.router.layer * EXPERT_MODULES.length;
    const scratch = this.#scratch.routerScratch;
    this.#step.dispatch(
      this.#k({ family: "router_train_backward", constants: c }),
      { ...this.#routerBuffers(r, x), dGates: this.#scratch.dGates, scratch, dx: this.#scratch.dX },
      { decisions, gateStride: this.#gateStride, gateIndex0 },
    );
    const source: Record<string, GPUBuffer> = c.when === "prompt" ? { pooled: r.pooled } : { x };
    this.#step.dispatch(
      this.#k({ family: "router_train_grad", constants: { ...c, accumulate: true } }),
      {
        ...source,
        ...(c.activation === "rational" ? { rational: r.router.rational!.value, dRational: r.router.rational!.grad } : {}),
        scratch,
        dWeight: r.router.gate.grad,
        ...(c.pooling === "attention" && c.when === "prompt" ? { dPooler: r.router.pooler!.grad } : {}),
      },
      { decisions },
    );
  }

  /**
   * per_ffn: a routed layer's MLP (see the top of the file): the router on u = xn2, the base gate and up
   * products and the stacked shrinks once, then each pass's experts' G_p, U_p, H_p and D_p, mixed into
   * the layer's output `next` = h + sum_p g_p D_p.
   */
  #ffnForward(f: FfnLayer, s: Map<Saved, GPUBuffer>, next: GPUBuffer, rows: number): void {
    const { intermediate } = this.#plan.dims;
    const sc = this.#scratch;
    const step = this.#step;
    const u = s.get("xn2")!;
    this.#moeRouteForward(f.constants, f.router, f.route, u, rows);
    this.#linear(this.#tensor("linear", f.layer, "gate_proj"), u, s.get("gate")!, rows);
    this.#linear(this.#tensor("linear", f.layer, "up_proj"), u, s.get("up")!, rows);
    for (const l of [f.gate, f.up]) if (l) this.#shrink(l, u, rows);
    const swiglu = this.#k({ family: "swiglu", constants: {} });
    const mix = this.#k({ family: "moe_ffn_mix", constants: { width: this.#plan.dims.hidden } });
    for (let p = 0; p < f.passes; p++) {
      const { gate, up } = this.#ffnPassInputs(f, s, p, rows);
      step.dispatch(swiglu, { gate, up, out: sc.ffnAct }, { n: rows * intermediate });
      this.#linear(this.#tensor("linear", f.layer, "down_proj"), sc.ffnAct, sc.ffnOut, rows);
      if (f.down) {
        this.#shrink(f.down, sc.ffnAct, rows);
        this.#expand(f.down, this.#maskRanks(f, f.down, rows), sc.ffnOut, rows);
      }
      step.dispatch(mix, { x: sc.ffnOut, residual: s.get("h")!, gate: sc.ffnPassGate, y: next }, { n: rows * this.#plan.dims.hidden, first: p === 0 ? 1 : 0 });
    }
  }

  /**
   * Pass p's experts (mask and gates) and its G_p and U_p: Wg u (saved) plus s Bg (mask * Ag u), into the
   * pass scratch, or Wg u itself for a module the adapter lacks; likewise U_p.
   */
  #ffnPassInputs(f: FfnLayer, s: Map<Saved, GPUBuffer>, p: number, rows: number): { gate: GPUBuffer; up: GPUBuffer } {
    const sc = this.#scratch;
    const E = f.constants.experts;
    this.#step.dispatch(this.#k({ family: "moe_ffn_pass", constants: { experts: E } }), { route: f.route, mask: sc.ffnMask, gate: sc.ffnPassGate }, { rows, ffnPass: p });
    const bytes = rows * this.#plan.dims.intermediate * 4;
    const expert = (l: TrainLora | undefined, base: GPUBuffer, into: GPUBuffer) => {
      if (!l) return base;
      this.#step.copy(base, 0, into, 0, bytes);
      this.#expand(l, this.#maskRanks(f, l, rows), into, rows);
      return into;
    };
    return { gate: expert(f.gate, s.get("gate")!, sc.ffnGate), up: expert(f.up, s.get("up")!, sc.ffnUp) };
  }

  /** y += s B t_gated (gate 1) for an adapted module. */
  #expand(l: TrainLora, t: GPUBuffer, y: GPUBuffer, rows: number): void {
    const constants = { inFeatures: l.inFeatures, outFeatures: l.outFeatures, maxRank: l.rank };
    const select = { slots: l.slots, rowAdapter: this.#inputs.rowAdapter, gates: this.#inputs.gates };
    this.#step.dispatch(this.#k({ family: "lora_expand", constants }), { t, b: l.b.value, ...select, y }, this.#loraParams(l, rows));
  }

  /** t_gated = the module's t with the ranks of experts other than the row's pass expert zeroed (the mask), into tGated. */
  #maskRanks(f: FfnLayer, l: TrainLora, rows: number): GPUBuffer {
    const E = f.constants.experts;
    this.#step.dispatch(
      this.#k({ family: "lora_rank_gate", constants: { rank: l.rank, experts: E } }),
      { t: this.#t.get(l)!, gates: this.#scratch.ffnMask, out: this.#scratch.tGated },
      { n: rows * l.rank, gateStride: E, gateOffset: 0 },
    );
    return this.#scratch.tGated;
  }

  /**
   * per_ffn: a routed layer's MLP backward from dy = dX (the layer output's gradient) into du = dXn
   * (the MLP input's), with every LoRA's and the router's gradients (see the top of the file).
   */
  #ffnBackward(f: FfnLayer, s: Map<Saved, GPUBuffer>, rows: number): void {
    const { hidden, intermediate } = this.#plan.dims;
    const sc = this.#scratch;
    const step = this.#step;
    const u = s.get("xn2")!;
    const E = f.constants.experts;
    // v = dy Wd: every expert's D_e sees the same dy, so the down product's input gradient runs once.
    this.#linearBackward(this.#tensor("linear", f.layer, "down_proj"), sc.dX, sc.dAct, rows, false);
    // du starts at zero: the passes' LoRA input gradients add into it, then the base products and the router.
    step.copy(sc.zeros, 0, sc.dXn, 0, rows * hidden * 4);
    const swiglu = this.#k({ family: "swiglu", constants: {} });
    const n = rows * intermediate;
    for (let p = 0; p < f.passes; p++) {
      const { gate, up } = this.#ffnPassInputs(f, s, p, rows);
      step.dispatch(swiglu, { gate, up, out: sc.ffnAct }, { n });
      // d(H_p) = g_p v + the down LoRA's part; dg_p = v . H_p + s (dy Bd) . t_gated.
      step.dispatch(this.#k({ family: "moe_ffn_scale", constants: { width: intermediate } }), { v: sc.dAct, gate: sc.ffnPassGate, out: sc.ffnDAct }, { n });
      if (f.down) this.#ffnLoraBackward(f, f.down, sc.ffnAct, sc.dX, sc.ffnDAct, rows, true);
      step.dispatch(
        this.#k({ family: "moe_ffn_gate_grad", constants: { width: intermediate, experts: E, lora: f.down !== undefined } }),
        { v: sc.dAct, h: sc.ffnAct, mask: sc.ffnMask, ...(f.down ? { lora: sc.ffnLoraGate } : {}), dGates: sc.ffnDGates },
        { rows },
      );
      step.dispatch(
        this.#k({ family: "swiglu_backward_sum", constants: {} }),
        { gate, up, dAct: sc.ffnDAct, dGate: sc.dGate, dUp: sc.dUp, sumGate: sc.ffnSumGate, sumUp: sc.ffnSumUp },
        { n, first: p === 0 ? 1 : 0 },
      );
      if (f.gate) this.#ffnLoraBackward(f, f.gate, u, sc.dGate, sc.dXn, rows, false);
      if (f.up) this.#ffnLoraBackward(f, f.up, u, sc.dUp, sc.dXn, rows, false);
    }
    // du += (sum_p dG_p) Wg + (sum_p dU_p) Wu: the base products' input gradients, once each.
    this.#linearBackward(this.#tensor("linear", f.layer, "gate_proj"), sc.ffnSumGate, sc.dXn, rows, true);
    this.#linearBackward(this.#tensor("linear", f.layer, "up_proj"), sc.ffnSumUp, sc.dXn, rows, true);
    this.#moeRouteBackward(f.constants, f.router, f.route, u, sc.dXn, rows, sc.ffnDGates);
  }

  /**
   * One pass's backward of an MLP module's stacked LoRA, its t gated by the pass's mask: dt = coef *
   * mask * (dy B), dx += dt A (through the dropout mask), dB += coef dy^T t_gated, dA += dt^T x. For
   * gate_proj and up_proj (`down` false) coef = s and t = A dropout(u) is the forward's; for down_proj
   * coef = g_p s (its output is weighted by the pass's gate), t = A dropout(H_p) is recomputed from
   * `input`, and the LoRA's part of dg_p, s (dy B) . t_gated, goes to ffnLoraGate.
   */
  #ffnLoraBackward(f: FfnLayer, l: TrainLora, input: GPUBuffer, dy: GPUBuffer, dx: GPUBuffer, rows: number, down: boolean): void {
    const sc = this.#scratch;
    const E = f.constants.experts;
    const constants = { inFeatures: l.inFeatures, outFeatures: l.outFeatures, maxRank: l.rank };
    const select = { slots: l.slots, rowAdapter: this.#inputs.rowAdapter, gates: down ? sc.ffnPassGate : this.#inputs.gates };
    const params = down ? { rows, gateStride: 1, gateIndex: 0, slot: 0 } : { ...this.#loraParams(l, rows), slot: 0 };
    const dropout = this.#dropout(l, rows);
    if (down) this.#shrink(l, input, rows);
    else if (dropout) this.#step.dispatch(this.#k({ family: "dropout", constants: {} }), { x: input, out: sc.dropped }, dropout);
    const x = dropout ? sc.dropped : input;
    const dxLora = dropout ? sc.dDropped : dx;
    const t = this.#t.get(l)!;
    const tGated = this.#maskRanks(f, l, rows);
    this.#step.dispatch(
      this.#k({ family: "lora_backward_input", constants: { ...constants, experts: E } }),
      { dy, t, a: l.a.value, b: l.b.value, ...select, expertGates: sc.ffnMask, dt: sc.dt, dGates: down ? sc.ffnLoraGate : sc.dGates, dExpertGates: sc.dExpertGates, dx: dxLora },
      { ...params, expertStride: E, expertOffset: 0 },
    );
    this.#step.dispatch(this.#k({ family: "lora_grad_b", constants: { ...constants, accumulate: true } }), { dy, t: tGated, ...select, dB: l.b.grad }, params);
    this.#step.dispatch(this.#k({ family: "lora_grad_a", constants: { ...constants, accumulate: true } }), { x, dt: sc.dt, ...select, dA: l.a.grad }, params);
    if (dropout) this.#step.dispatch(this.#k({ family: "dropout_grad", constants: {} }), { g: sc.dDropped, acc: dx }, dropout);
  }

  destroy(): void {
    for (const r of this.#routers) for (const b of [r.pooled, r.attn, r.route]) b.destroy();
    for (const m of this.#moeModules) m.route.destroy();
    for (const f of this.#ffn.values()) f.route.destroy();
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

/**
 * What of a plan this graph's forward and backward do not implement (it writes LLaMA's layer out): the
 * biases, GeGLU, (1 + w) norms and embedding scale of qwen2 and gemma, and a sliding window shorter than
 * the longest example (a window at least that long masks nothing, so mistral bases train).
 */
export function untrainable(plan: Plan, longest: number): string[] {
  const ops = [...plan.layer, ...plan.head];
  const kernel = (key: string) => plan.kernels.find((k) => k.key === key)?.constants as Record<string, unknown> | undefined;
  const problems: string[] = [];
  if (ops.some((op) => op.op === "bias")) problems.push("linear biases");
  if (ops.some((op) => op.op === "geglu")) problems.push("the GeGLU MLP");
  if (ops.some((op) => op.op === "rmsnorm" && kernel(op.kernel)?.offset !== undefined)) problems.push("RMSNorm by (1 + w)");
  if (plan.embeddingScale !== undefined) problems.push("scaled embeddings");
  // In transformers a dynamic rope_scaling's frequencies in training follow each batch's longest sequence.
  if (plan.dims.ropeScaling?.type === "dynamic") problems.push("dynamic rope scaling (linear and llama3 train)");
  const window = ops.flatMap((op) => (op.op === "attention" ? [kernel(op.kernel)?.window] : []))[0];
  if (typeof window === "number" && window < longest) problems.push(`a sliding window of ${window} positions, shorter than the longest example's ${longest} tokens (train on examples within the window)`);
  return problems;
}

/** The `weights` constant of a linear kernel over `t`: its packed format (f16, q8, q4), none for f32. */
function packedFormat(t: GpuTensor): { readonly weights?: Exclude<GpuTensor["format"], "f32"> } {
  return t.format === "f32" ? {} : { weights: t.format };
}
