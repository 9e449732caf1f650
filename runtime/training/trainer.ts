// The training loop: seeded epochs of shuffled examples, micro-batches accumulated into optimizer
// steps (the loss is the mean over every supervised token of the accumulated batch), the learning-rate
// schedule, evaluation with early stopping on the eval loss (the best checkpoint is kept, as the paper
// does), resumable checkpoints, and a metrics log. The order of examples is a function of (seed, epoch)
// alone, so a resumed run sees exactly the batches the uninterrupted one would.
import { appendFileSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Plan } from "../../compiler/plan.ts";
import { loadAdapter, writeAdapter, type LoadedAdapter } from "../formats/adapter.ts";
import { PipelineCache, readBuffer } from "../gpu/kernel-runner.ts";
import { CheckpointError, SafetensorsFile, writeSafetensors } from "../formats/safetensors.ts";
import type { GpuWeights } from "../engine/weights.ts";
import { IGNORE_INDEX, type TrainExample } from "./data.ts";
import { TrainingGraph, packBatch, untrainable } from "./graph.ts";
import { userError } from "../errors.ts";
import type { TrainKernelResolver } from "./kernels.ts";
import { Optimizer, type OptimizerSettings } from "./optimizer.ts";
import { mulberry32 } from "../random.ts";
import { TrainableParams } from "./params.ts";
import { learningRate, warmupSteps, type ScheduleKind } from "./schedule.ts";

export interface TrainSettings {
  /** Passes over the data; ignored when `steps` is given. */
  readonly epochs: number;
  /** Optimizer steps to run; by default epochs x steps per epoch. */
  readonly steps?: number;
  readonly batchSize: number;
  readonly gradAccum: number;
  readonly lr: number;
  readonly schedule: ScheduleKind;
  /** A ratio of the steps (< 1) or a step count. */
  readonly warmup: number;
  readonly optimizer: OptimizerSettings;
  readonly maxLength: number;
  readonly seed: number;
  readonly shuffle: boolean;
  /** Evaluate every this many optimizer steps (and at the end); 0 only at the end. */
  readonly evalEvery: number;
  /** Stop after this many evaluations without a better eval loss; 0 never stops early. */
  readonly patience: number;
  /** Write a resumable checkpoint every this many steps; 0 only at the end or on interrupt. */
  readonly saveEvery: number;
  /**
   * Learning rate of the rational activation's coefficients, trained bi-level as in the paper (DARTS-style
   * alternation): after each step on the training batches, one step on an eval batch updates them alone.
   * Without eval data they stay at their initialisation.
   */
  readonly activationLr: number;
}

/** One line of metrics.jsonl. */
export interface StepMetrics {
  readonly step: number;
  readonly epoch: number;
  readonly loss: number;
  readonly lm_loss: number;
  readonly balance_loss: number;
  readonly lr: number;
  readonly grad_norm: number;
  readonly tokens_per_s: number;
  readonly eval_loss?: number;
}

export interface TrainEvents {
  onStep?(m: StepMetrics, total: number): void;
  onEval?(m: { step: number; eval_loss: number; perplexity: number; best: boolean }): void;
}

export interface TrainSummary {
  readonly steps: number;
  readonly interrupted: boolean;
  readonly stoppedEarly: boolean;
  readonly lastLoss: number;
  readonly bestEvalLoss?: number;
  readonly bestStep?: number;
  readonly seconds: number;
}

/** What a checkpoint records besides the weights and moments. */
interface TrainerState {
  readonly format: 1;
  readonly step: number;
  readonly bestEvalLoss: number | null;
  readonly bestStep: number | null;
  readonly badEvals: number;
  readonly archStep: number;
  readonly archBatch: number;
  readonly settings: TrainSettings;
}

const CHECKPOINT_DIR = "checkpoint";
const BEST_DIR = "best";
const STATE_FILE = "trainer_state.json";
const MOMENTS_FILE = "optimizer.safetensors";
export const METRICS_FILE = "metrics.jsonl";

export interface TrainerOptions {
  readonly device: GPUDevice;
  readonly plan: Plan;
  readonly weights: GpuWeights;
  /** The adapter to start from: fresh (initialAdapter), an existing one (--init), or a checkpoint's. */
  readonly adapter: LoadedAdapter;
  readonly kernel: TrainKernelResolver;
  readonly settings: TrainSettings;
  readonly train: readonly TrainExample[];
  readonly eval?: readonly TrainExample[];
  /** Where the adapter, checkpoints and metrics go. */
  readonly out: string;
}

export class Trainer {
  readonly #o: TrainerOptions;
  readonly #params: TrainableParams;
  readonly #graph: TrainingGraph;
  readonly #optimizer: Optimizer;
  readonly stepsPerEpoch: number;
  readonly totalSteps: number;
  #step = 0;
  /** Steps the architecture parameters have taken (their AdamW counter), and the next eval batch they use. */
  #archStep = 0;
  #archBatch = 0;
  #bestEvalLoss: number | null = null;
  #bestStep: number | null = null;
  #badEvals = 0;

  constructor(o: TrainerOptions) {
    this.#o = o;
    const s = o.settings;
    if (o.train.length === 0) throw new Error("training needs at least one example");
    this.stepsPerEpoch = Math.max(1, Math.ceil(o.train.length / (s.batchSize * s.gradAccum)));
    this.totalSteps = s.steps ?? s.epochs * this.stepsPerEpoch;
    const longest = Math.max(...[...o.train, ...(o.eval ?? [])].map((e) => e.tokens.length));
    const unsupported = untrainable(o.plan, longest);
    if (unsupported.length > 0) throw userError("unsupported", `training on base ${o.plan.base} (family ${o.plan.family}) is not implemented: ${unsupported.join("; ")}`);
    const pipelines = new PipelineCache(o.device);
    this.#params = new TrainableParams(o.device, o.adapter);
    this.#graph = new TrainingGraph({ device: o.device, plan: o.plan, weights: o.weights, params: this.#params, kernel: o.kernel, pipelines, maxRows: s.batchSize * longest });
    this.#optimizer = new Optimizer(o.device, pipelines, o.kernel, this.#params.tensors, s.optimizer);
  }

  get step(): number {
    return this.#step;
  }

  /** Device memory the trainer holds besides the frozen base: activations kept for the backward, scratch, parameters with their gradients and moments. */
  get bytes(): { readonly activations: number; readonly parameters: number } {
    return { activations: this.#graph.bytes, parameters: this.#params.bytes };
  }

  /** The adapter's current weights. */
  weights(): Promise<LoadedAdapter> {
    return this.#params.toAdapter();
  }

  /** The examples of optimizer step `step` (from 0): a slice of the epoch's seeded permutation. */
  #examplesOf(step: number): TrainExample[][] {
    const s = this.#o.settings;
    const perStep = s.batchSize * s.gradAccum;
    const n = this.#o.train.length;
    const micro: TrainExample[][] = [];
    for (let m = 0; m < s.gradAccum; m++) {
      const batch: TrainExample[] = [];
      for (let b = 0; b < s.batchSize; b++) {
        const flat = step * perStep + m * s.batchSize + b;
        const epoch = Math.floor(flat / (this.stepsPerEpoch * perStep));
        const within = flat - epoch * this.stepsPerEpoch * perStep;
        if (within >= n) continue; // the epoch's last step is short
        batch.push(this.#o.train[this.#order(epoch)[within]!]!);
      }
      if (batch.length > 0) micro.push(batch);
    }
    return micro;
  }

  #orders = new Map<number, number[]>();

  /** The epoch's permutation of the training set (identity without shuffling). */
  #order(epoch: number): number[] {
    let order = this.#orders.get(epoch);
    if (!order) {
      order = Array.from(this.#o.train, (_, i) => i);
      if (this.#o.settings.shuffle) {
        const random = mulberry32((this.#o.settings.seed * 1000003 + epoch) >>> 0);
        for (let i = order.length - 1; i > 0; i--) {
          const j = Math.floor(random() * (i + 1));
          [order[i], order[j]] = [order[j]!, order[i]!];
        }
      }
      this.#orders.clear();
      this.#orders.set(epoch, order);
    }
    return order;
  }

  /** One optimizer step: forward and backward over each micro-batch, then the update. */
  async trainStep(): Promise<StepMetrics> {
    const s = this.#o.settings;
    const started = performance.now();
    const micro = this.#examplesOf(this.#step);
    const supervised = micro.flat().reduce((n, e) => n + supervisedCount(e), 0);
    const { router, moe } = this.#o.adapter.spec;
    const routed = this.#params.routers.size;
    // Eq. 4-5 per micro-batch (its decisions are the micro-batch's sequences), averaged over them and the
    // routed layers; per_module: one balance loss per micro-batch over all its modules' rows, averaged.
    const balance = router?.balance ?? moe?.balance ?? 0;
    const balanceCoef = moe ? balance / micro.length : router && routed > 0 ? router.balance / (routed * micro.length) : 0;
    let lossSum = 0;
    let balanceSum = 0;
    let tokens = 0;
    for (const [m, batch] of micro.entries()) {
      const packed = packBatch(batch);
      // Each micro-batch draws its own dropout masks, fixed by (seed, step, micro-batch) so a resumed run draws the same.
      const dropoutSeed = (Math.imul(s.seed + 1, 0x9e3779b1) ^ Math.imul(this.#step + 1, 0x85ebca6b) ^ m) >>> 0;
      const out = await this.#graph.run(packed, 1 / supervised, { backward: true, dropoutSeed, balanceCoef });
      lossSum += out.lossSum;
      balanceSum += out.balanceLoss;
      tokens += packed.rows;
    }
    const lr = learningRate({ kind: s.schedule, lr: s.lr, warmup: warmupSteps(s.warmup, this.totalSteps), total: this.totalSteps }, this.#step);
    const architecture = this.#params.tensors.filter((t) => t.architecture);
    const { gradNorm } = await this.#optimizer.update(this.#step + 1, lr, 1, (t) => !t.architecture);
    // The rational coefficients learn from eval batches only (bi-level): drop what the training batches gave them.
    this.#optimizer.clear(architecture);
    if (architecture.length > 0 && this.#o.eval && this.#o.eval.length > 0 && s.activationLr > 0) await this.#architectureStep();
    this.#step++;
    const lmLoss = lossSum / supervised;
    const balanceLoss = balanceSum / micro.length;
    const seconds = (performance.now() - started) / 1000;
    const epoch = (this.#step * s.batchSize * s.gradAccum) / this.#o.train.length;
    return {
      step: this.#step,
      epoch: +epoch.toFixed(4),
      loss: lmLoss + balance * balanceLoss,
      lm_loss: lmLoss,
      balance_loss: balanceLoss,
      lr,
      grad_norm: gradNorm,
      tokens_per_s: tokens / seconds,
    };
  }

  /** One step of the architecture parameters (the rational activation) on the next eval batch. */
  async #architectureStep(): Promise<void> {
    const s = this.#o.settings;
    const data = this.#o.eval!;
    const batch = Array.from({ length: Math.min(s.batchSize, data.length) }, (_, i) => data[(this.#archBatch + i) % data.length]!);
    this.#archBatch = (this.#archBatch + batch.length) % data.length;
    const supervised = batch.reduce((n, e) => n + supervisedCount(e), 0);
    const router = this.#o.adapter.spec.router!;
    await this.#graph.run(packBatch(batch), 1 / supervised, { backward: true, balanceCoef: router.balance / this.#params.routers.size });
    this.#archStep++;
    await this.#optimizer.update(this.#archStep, s.activationLr, 1, (t) => t.architecture);
    this.#optimizer.clear(this.#params.tensors.filter((t) => !t.architecture));
  }

  /** Mean cross-entropy over every supervised token of `examples` (no gradient kept). */
  async evalLoss(examples: readonly TrainExample[]): Promise<number> {
    const s = this.#o.settings;
    let lossSum = 0;
    let supervised = 0;
    for (let i = 0; i < examples.length; i += s.batchSize) {
      const batch = examples.slice(i, i + s.batchSize);
      lossSum += (await this.#graph.run(packBatch(batch), 0, { backward: false })).lossSum;
      supervised += batch.reduce((n, e) => n + supervisedCount(e), 0);
    }
    return lossSum / supervised;
  }

  /**
   * Runs to the last step (or until `signal` aborts, or early stopping), writing metrics.jsonl, the
   * checkpoints, and the adapter (the best by eval loss when evaluating, else the last) to `out`.
   */
  async run(signal: AbortSignal, events: TrainEvents = {}): Promise<TrainSummary> {
    const { out, settings: s } = this.#o;
    mkdirSync(out, { recursive: true });
    const started = performance.now();
    let last = Number.NaN;
    let stoppedEarly = false;
    while (this.#step < this.totalSteps && !signal.aborted) {
      let m = await this.trainStep();
      last = m.loss;
      const evaluate = this.#o.eval && ((s.evalEvery > 0 && this.#step % s.evalEvery === 0) || this.#step === this.totalSteps);
      if (evaluate) {
        const evalLoss = await this.evalLoss(this.#o.eval!);
        m = { ...m, eval_loss: evalLoss };
        const best = this.#bestEvalLoss === null || evalLoss < this.#bestEvalLoss;
        if (best) {
          this.#bestEvalLoss = evalLoss;
          this.#bestStep = this.#step;
          this.#badEvals = 0;
          writeAdapter(join(out, BEST_DIR), await this.#params.toAdapter());
        } else this.#badEvals++;
        events.onEval?.({ step: this.#step, eval_loss: evalLoss, perplexity: Math.exp(evalLoss), best });
      }
      appendFileSync(join(out, METRICS_FILE), `${JSON.stringify(m)}\n`);
      events.onStep?.(m, this.totalSteps);
      if (s.patience > 0 && this.#badEvals >= s.patience) {
        stoppedEarly = true;
        break;
      }
      if (s.saveEvery > 0 && this.#step % s.saveEvery === 0) await this.saveCheckpoint();
    }
    const interrupted = signal.aborted && this.#step < this.totalSteps;
    await this.saveCheckpoint();
    // The adapter the run gives: the best eval checkpoint when there was one, else the last weights.
    const final = this.#bestStep !== null ? loadBest(join(out, BEST_DIR), this.#o.adapter) : await this.#params.toAdapter();
    if (!interrupted) writeAdapter(join(out, "adapter"), final);
    return {
      steps: this.#step,
      interrupted,
      stoppedEarly,
      lastLoss: last,
      ...(this.#bestEvalLoss === null ? {} : { bestEvalLoss: this.#bestEvalLoss, bestStep: this.#bestStep! }),
      seconds: (performance.now() - started) / 1000,
    };
  }

  /** Writes out/checkpoint (adapter, optimizer moments, trainer state) atomically. */
  async saveCheckpoint(): Promise<void> {
    const dir = join(this.#o.out, CHECKPOINT_DIR);
    const temp = `${dir}.tmp-${process.pid}`;
    rmSync(temp, { recursive: true, force: true });
    mkdirSync(temp, { recursive: true });
    writeAdapter(join(temp, "adapter"), await this.#params.toAdapter());
    const device = this.#o.device;
    const moments = [];
    for (const t of this.#params.tensors) {
      moments.push({ name: `${t.name}.m`, dtype: "F32" as const, shape: [t.count], data: await readBuffer(device, t.m, 0, t.count * 4) });
      moments.push({ name: `${t.name}.v`, dtype: "F32" as const, shape: [t.count], data: await readBuffer(device, t.v, 0, t.count * 4) });
    }
    writeSafetensors(join(temp, MOMENTS_FILE), moments);
    const state: TrainerState = { format: 1, step: this.#step, bestEvalLoss: this.#bestEvalLoss, bestStep: this.#bestStep, badEvals: this.#badEvals, archStep: this.#archStep, archBatch: this.#archBatch, settings: this.#o.settings };
    writeFileSync(join(temp, STATE_FILE), `${JSON.stringify(state, null, 2)}\n`);
    const old = `${dir}.old-${process.pid}`;
    if (existsSync(dir)) renameSync(dir, old);
    renameSync(temp, dir);
    rmSync(old, { recursive: true, force: true });
  }

  /** Continues from a checkpoint this trainer's settings wrote: step, moments, best so far. */
  restore(checkpointRoot: string): void {
    const dir = join(checkpointRoot, CHECKPOINT_DIR);
    const state = JSON.parse(readFileSync(join(dir, STATE_FILE), "utf8")) as TrainerState;
    if (state.format !== 1) throw new CheckpointError(`${join(dir, STATE_FILE)}: unknown checkpoint format ${state.format}`);
    this.#step = state.step;
    this.#bestEvalLoss = state.bestEvalLoss;
    this.#bestStep = state.bestStep;
    this.#badEvals = state.badEvals;
    this.#archStep = state.archStep;
    this.#archBatch = state.archBatch;
    const file = SafetensorsFile.open(join(dir, MOMENTS_FILE));
    try {
      for (const t of this.#params.tensors) {
        this.#o.device.queue.writeBuffer(t.m, 0, file.readF32(`${t.name}.m`));
        this.#o.device.queue.writeBuffer(t.v, 0, file.readF32(`${t.name}.v`));
      }
    } finally {
      file.close();
    }
  }

  destroy(): void {
    this.#graph.destroy();
    this.#optimizer.destroy();
    this.#params.destroy();
  }
}

/** The adapter weights of a checkpoint directory written by Trainer (for --resume). */
export function checkpointAdapter(root: string, like: LoadedAdapter): LoadedAdapter {
  return loadBest(join(root, CHECKPOINT_DIR, "adapter"), like);
}

function loadBest(dir: string, like: LoadedAdapter): LoadedAdapter {
  return loadAdapter(dir, { name: like.name, base: like.spec.base, spec: like.spec });
}

function supervisedCount(e: TrainExample): number {
  let n = 0;
  for (let t = 1; t < e.labels.length; t++) if (e.labels[t] !== IGNORE_INDEX) n++;
  return n;
}
