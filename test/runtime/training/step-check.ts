// Shared by the device tests of training (graph*.test.ts, *trainer.test.ts): the tiny random checkpoints
// they train on, the batches, one training step's graph run on the device, the dropout mask it draws (for
// the float64 reference), the relative error of a gradient, and the trainer's settings, the float64
// optimizer steps (test/reference/optimizer.ts) and runs of the training loop to compare with them.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { pcg } from "../../../compiler/kernels/sampling.ts";
import { EXPERT_MODULES, type BaseModel, type ExpertModule } from "../../../compiler/model.ts";
import { planBase, type Plan, type PlanOptions } from "../../../compiler/plan.ts";
import { trainKernelResolver } from "../../../compiler/train-kernels.ts";
import { writeRandomCheckpoint, type RandomCheckpointOptions } from "../../../examples/random-checkpoint.ts";
import { uploadWeights, type GpuWeights } from "../../../runtime/engine/weights.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { openCheckpoint } from "../../../runtime/formats/checkpoint.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { PipelineCache, readBuffer } from "../../../runtime/gpu/kernel-runner.ts";
import { IGNORE_INDEX as I, type TrainExample } from "../../../runtime/training/data.ts";
import { TrainingGraph, packBatch, type RunOptions } from "../../../runtime/training/graph.ts";
import { OPTIMIZER_DEFAULTS, type OptimizerSettings } from "../../../runtime/training/optimizer.ts";
import { TrainableParams, type TrainTensor } from "../../../runtime/training/params.ts";
import { Trainer, checkpointAdapter, type TrainSettings } from "../../../runtime/training/trainer.ts";
import { loadReferenceWeights, moduleShape } from "../../reference/llama.ts";
import { adamwStep, clipFactor, globalNorm, sgdStep } from "../../reference/optimizer.ts";
import type { ReferenceTrainAdapter } from "../../reference/train.ts";

/** The tiny GQA model of the training tests (a checkpoint's seed and any other option given). */
export const TINY = { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 61, maxPositions: 64 } as const;

/** A random checkpoint written to `dir`, its base and its float64 weights. */
export function tinyModel(dir: string, options: Partial<RandomCheckpointOptions> & { readonly seed: number }) {
  writeRandomCheckpoint(dir, { ...TINY, ...options });
  return { dir, base: readHfConfig(dir), reference: loadReferenceWeights(dir) };
}

/** The checkpoint in `dir` uploaded for `plan`. */
async function uploadBase(device: GPUDevice, dir: string, plan: Plan): Promise<GpuWeights> {
  const checkpoint = openCheckpoint(dir);
  const weights = await uploadWeights(device, checkpoint, plan, plan.maxBindingBytes);
  checkpoint.close();
  return weights;
}

/** Three sequences of different lengths packed in one batch (the graph tests'; supervised past each prompt). */
export const STEP_BATCH = [
  { tokens: [3, 14, 15, 9, 26, 5, 35], labels: [I, I, I, 9, 26, 5, 35] },
  { tokens: [8, 9, 7, 9, 3], labels: [I, I, 7, 9, 3] },
  { tokens: [2, 7, 18, 28, 18, 28, 45, 59, 60, 12, 1], labels: [I, 7, 18, 28, 18, 28, 45, 59, 60, 12, 1] },
];

/** The device's result of one step: the summed loss over the supervised rows, the balance loss, and the gradients in `params`. */
export interface DeviceStep {
  readonly lossSum: number;
  readonly balanceLoss: number;
  readonly supervised: number;
  readonly params: TrainableParams;
  readonly plan: Plan;
}

/**
 * One training step (forward, fused cross-entropy, backward) of `adapter` on the checkpoint in
 * `model.dir` over `batch`, its loss scaled by 1 / supervised rows, handed to `check`; everything is
 * destroyed afterwards.
 */
export async function stepOnDevice(
  device: GPUDevice,
  model: { readonly dir: string; readonly base: BaseModel },
  adapter: LoadedAdapter,
  batch: readonly { readonly tokens: readonly number[]; readonly labels: readonly number[] }[],
  o: { readonly plan: PlanOptions; readonly maxRows: number; readonly run?: Omit<RunOptions, "backward"> },
  check: (step: DeviceStep) => Promise<void>,
): Promise<void> {
  const plan = planBase(model.base, o.plan);
  const weights = await uploadBase(device, model.dir, plan);
  const params = new TrainableParams(device, adapter);
  const graph = new TrainingGraph({ device, plan, weights, params, kernel: trainKernelResolver(), pipelines: new PipelineCache(device), maxRows: o.maxRows });
  try {
    const packed = packBatch(batch);
    const supervised = packed.supervisedRows.length;
    const { lossSum, balanceLoss } = await graph.run(packed, 1 / supervised, { backward: true, ...o.run });
    await check({ lossSum, balanceLoss, supervised, params, plan });
  } finally {
    graph.destroy();
    params.destroy();
    weights.destroy();
  }
}

/**
 * The LoRA dropout the graph draws for `batch` packed with dropout seed `seed`, as the reference takes it
 * (none when p = 0): module stream from (seed, layer, module), element row * in + column of the module's
 * input kept when pcg(stream ^ pcg(element)) >= round(p * 2^32), the dropout kernels' rule.
 */
export function deviceDropout(base: BaseModel, batch: readonly { readonly tokens: readonly number[] }[], seed: number, p: number): Pick<ReferenceTrainAdapter, "dropout"> {
  if (p === 0) return {};
  const offsets = batch.map((_, i) => batch.slice(0, i).reduce((n, e) => n + e.tokens.length, 0));
  const keeps = (layer: number, module: ExpertModule, example: number, position: number, column: number) => {
    const stream = pcg((pcg(seed) ^ (layer * 8 + EXPERT_MODULES.indexOf(module) + 1)) >>> 0);
    const i = (offsets[example]! + position) * moduleShape(base, module)[1] + column;
    return pcg(((stream >>> 0) ^ pcg(i >>> 0)) >>> 0) >= Math.min(0xffffffff, Math.round(p * 2 ** 32));
  };
  return { dropout: { p, keeps } };
}

/** ||got - want|| / ||want|| (L2 over a tensor); a tensor whose reference gradient is zero (nothing routed to it) must be zero too: then ||got||. */
export function relative(got: Float32Array, want: Float64Array): number {
  let d = 0;
  let n = 0;
  for (let i = 0; i < want.length; i++) {
    d += (got[i]! - want[i]!) ** 2;
    n += want[i]! ** 2;
  }
  return n === 0 ? Math.sqrt(d) : Math.sqrt(d / n);
}

/** The relative error of a trainable tensor's gradient on the device against the reference's. */
export async function gradError(device: GPUDevice, tensor: Pick<TrainTensor, "grad" | "count">, want: Float64Array): Promise<number> {
  return relative(await readBuffer(device, tensor.grad, 0, tensor.count * 4), want);
}

// ---------------------------------------------------------------------------------------------------
// The training loop

/** The trainer tests' data set: three examples, each step's batch when batchSize is 3. */
export const TRAIN_DATA: TrainExample[] = [
  { tokens: [3, 14, 15, 9, 26, 5], labels: [I, I, I, 9, 26, 5], source: "a" },
  { tokens: [8, 9, 7, 9, 3, 2, 38], labels: [I, I, 7, 9, 3, 2, 38], source: "b" },
  { tokens: [2, 7, 18, 28, 18], labels: [I, 7, 18, 28, 18], source: "c" },
];

/** Three steps of the whole data set, unshuffled, at a constant lr 0.01 with `optimizer`, unless `over` says otherwise. */
export const trainSettings = (optimizer: Partial<OptimizerSettings>, over: Partial<TrainSettings> = {}): TrainSettings => ({
  epochs: 1,
  steps: 3,
  batchSize: 3,
  gradAccum: 1,
  lr: 0.01,
  schedule: "constant",
  warmup: 0,
  optimizer: { ...OPTIMIZER_DEFAULTS, ...optimizer },
  maxLength: 64,
  seed: 1,
  shuffle: false,
  evalEvery: 0,
  patience: 0,
  saveEvery: 0,
  activationLr: 1e-6,
  ...over,
});

/**
 * The trainer tests' checkpoint (TINY, seed 8) in a fresh temporary folder, uploaded for a plan of LoRA
 * rank up to `maxLoraRank`; `trainer` trains on TRAIN_DATA into a folder `out` of it; `close` frees it all.
 */
export async function trainerBed(name: string, maxLoraRank: number) {
  const root = mkdtempSync(join(tmpdir(), `milora-${name}-`));
  const { dir, base, reference } = tinyModel(join(root, "tiny"), { seed: 8 });
  const gpu = await acquireDevice();
  const plan = planBase(base, { maxLoraRank });
  const weights = await uploadBase(gpu.device, dir, plan);
  return {
    root,
    base,
    reference,
    trainer: (adapter: LoadedAdapter, settings: TrainSettings, out: string) =>
      new Trainer({ device: gpu.device, plan, weights, adapter, kernel: trainKernelResolver(), settings, train: TRAIN_DATA, out: join(root, out) }),
    close() {
      weights.destroy();
      gpu.destroy();
      rmSync(root, { recursive: true, force: true });
    },
  };
}
export type TrainerBed = Awaited<ReturnType<typeof trainerBed>>;

/** The trainable tensors of a reference adapter or of its gradients, by name: `${key}.a`, `${key}.b` of each LoRA, `${key}.router` of each router. */
export function byName(lora: ReadonlyMap<string, { readonly a: Float64Array; readonly b: Float64Array }>, routers: ReadonlyMap<string, Float64Array> = new Map()): Map<string, Float64Array> {
  const named = new Map<string, Float64Array>();
  for (const [key, l] of lora) named.set(`${key}.a`, l.a).set(`${key}.b`, l.b);
  for (const [key, w] of routers) named.set(`${key}.router`, w);
  return named;
}

/**
 * `s.steps` float64 steps of s.optimizer on `params` (by name, updated in place) as the trainer takes
 * them: step t's gradients from `gradients()` (by the same names), clipped as clip_grad_norm_ over all of
 * them, then SGD or AdamW.
 */
export function referenceSteps(params: ReadonlyMap<string, Float64Array>, s: TrainSettings, gradients: () => ReadonlyMap<string, Float64Array>): void {
  const o = s.optimizer;
  const moments = new Map([...params].map(([name, p]) => [name, { m: new Float64Array(p.length), v: new Float64Array(p.length) }]));
  for (let t = 1; t <= s.steps!; t++) {
    const grads = gradients();
    const clip = clipFactor(globalNorm([...params.keys()].map((name) => grads.get(name)!)), o.maxGradNorm);
    for (const [name, p] of params) {
      const g = grads.get(name)!.map((x) => x * clip);
      if (o.kind === "sgd") sgdStep(p, g, s.lr);
      else adamwStep(p, g, moments.get(name)!.m, moments.get(name)!.v, { lr: s.lr, beta1: o.beta1, beta2: o.beta2, eps: o.eps, weightDecay: o.weightDecay }, t);
    }
  }
}

/**
 * How far the device's steps are from the reference's, measured against the size of the update, not of
 * the weights (the steps themselves must agree): ||got - want|| / ||want - before||; with the update's
 * squared size `moved` and the weights' norm `size`.
 */
export function updateError(got: ArrayLike<number>, want: Float64Array, before: ArrayLike<number>): { error: number; moved: number; size: number } {
  let diff = 0;
  let moved = 0;
  let size = 0;
  for (let i = 0; i < want.length; i++) {
    diff += (got[i]! - want[i]!) ** 2;
    moved += (want[i]! - before[i]!) ** 2;
    size += want[i]! ** 2;
  }
  return { error: Math.sqrt(diff / moved), moved, size: Math.sqrt(size) };
}

/**
 * A run of `s` from `start()` left whole, the same run interrupted after step `stopAt` and then resumed
 * from its checkpoint: asserts the cut and the resumed run's step counts and that the resumed run ends
 * with the whole run's weights, LoRA and routers, bit for bit; returns the whole run's weights.
 */
export async function checkResume(bed: TrainerBed, what: string, s: TrainSettings, start: () => LoadedAdapter, stopAt: number): Promise<LoadedAdapter> {
  const run = async (out: string, adapter: LoadedAdapter, stop?: number, resume?: string) => {
    const trainer = bed.trainer(adapter, s, out);
    if (resume) trainer.restore(resume);
    const abort = new AbortController();
    const summary = await trainer.run(abort.signal, { onStep: (m) => m.step === stop && abort.abort() });
    const result = await trainer.weights();
    trainer.destroy();
    return { summary, result };
  };
  const cutDir = join(bed.root, `${what}-cut`);
  const whole = await run(`${what}-whole`, start());
  const cut = await run(`${what}-cut`, start(), stopAt);
  assert.ok(cut.summary.interrupted && cut.summary.steps === stopAt);
  const resumed = await run(`${what}-cut`, checkpointAdapter(cutDir, start()), undefined, cutDir);
  assert.is(resumed.summary.steps, s.steps);
  for (const [key, w] of whole.result.lora) {
    const r = resumed.result.lora.get(key)!;
    assert.equal(Array.from(r.a), Array.from(w.a), `${key} lora_A`);
    assert.equal(Array.from(r.b), Array.from(w.b), `${key} lora_B`);
  }
  for (const [key, w] of whole.result.moeRouters ?? []) assert.equal(Array.from(resumed.result.moeRouters!.get(key)!), Array.from(w), `${key} router`);
  return whole.result;
}
