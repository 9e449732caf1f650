// `milora train SPEC --adapter NAME --base DIR --data train.jsonl --out DIR`: fine-tunes one adapter of a
// spec over a frozen Hugging Face base on the GPU. Writes OUT/adapter (the best eval checkpoint, else the
// last weights), OUT/best, OUT/checkpoint (resumable: --resume OUT), OUT/metrics.jsonl and
// OUT/training_args.json. Ctrl-C saves a checkpoint and exits; a second Ctrl-C exits at once.
import { SingleBar } from "cli-progress";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { planBase } from "../../compiler/plan.ts";
import { rationalInit } from "../../compiler/rational.ts";
import { trainKernelResolver } from "../../compiler/train-kernels.ts";
import type { Adapter } from "../../compiler/model.ts";
import { loadAdapter } from "../../runtime/formats/adapter.ts";
import { openCheckpoint } from "../../runtime/formats/checkpoint.ts";
import { acquireDevice, adapterSummary, type GpuContext } from "../../runtime/gpu/device.ts";
import { userError } from "../../runtime/errors.ts";
import { ChatTemplate } from "../../runtime/serving/http/chat-template.ts";
import { Tokenizer } from "../../runtime/text/tokenizer.ts";
import { loadTrainData, type LoadDataOptions } from "../../runtime/training/data.ts";
import { OPTIMIZER_DEFAULTS } from "../../runtime/training/optimizer.ts";
import { initialAdapter, refuseUntrainable } from "../../runtime/training/params.ts";
import { Trainer, checkpointAdapter, type TrainSettings } from "../../runtime/training/trainer.ts";
import { uploadWeights } from "../../runtime/engine/weights.ts";
import { requireHealthyDevice } from "./self-test.ts";
import { adapterSpecOf, modelSource } from "./model-source.ts";
import { largestStoredRank, weightsFlag, weightsFor } from "../engine-plan.ts";

export interface TrainCommandOptions {
  readonly adapter?: string;
  readonly base: string;
  readonly data: string;
  readonly eval?: string;
  readonly out: string;
  readonly init?: string;
  readonly resume?: string;
  readonly epochs: string;
  readonly steps?: string;
  readonly batchSize: string;
  readonly gradAccum: string;
  readonly lr: string;
  readonly lrSchedule: "linear" | "cosine" | "constant";
  readonly warmup: string;
  readonly optimizer: "adamw" | "sgd";
  readonly weightDecay: string;
  readonly maxGradNorm: string;
  readonly maxLength: string;
  readonly seed: string;
  readonly shuffle: boolean;
  readonly evalEvery: string;
  readonly patience: string;
  readonly saveEvery: string;
  readonly activationLr: string;
  readonly chatTemplate?: string;
  /** `--weights f32|f16|q8|q4`: how the frozen base is stored (and read, forward and backward) on the device. */
  readonly weights?: string;
  readonly backend?: string;
  readonly json?: boolean;
}

function number(name: string, text: string, check: (x: number) => boolean, what: string): number {
  const x = Number(text);
  if (text.trim() === "" || !Number.isFinite(x) || !check(x)) throw userError("usage", `--${name} must be ${what}, got "${text}"`);
  return x;
}
const positiveInt = (x: number) => Number.isInteger(x) && x >= 1;
const count = (x: number) => Number.isInteger(x) && x >= 0;

/** The settings the flags give, checked. */
export function trainSettings(o: TrainCommandOptions): TrainSettings {
  return {
    epochs: number("epochs", o.epochs, positiveInt, "a positive integer"),
    ...(o.steps === undefined ? {} : { steps: number("steps", o.steps, positiveInt, "a positive integer") }),
    batchSize: number("batch-size", o.batchSize, positiveInt, "a positive integer"),
    gradAccum: number("grad-accum", o.gradAccum, positiveInt, "a positive integer"),
    lr: number("lr", o.lr, (x) => x > 0, "a positive number"),
    schedule: o.lrSchedule,
    warmup: number("warmup", o.warmup, (x) => x >= 0 && (x < 1 || Number.isInteger(x)), "a ratio in [0, 1) or a whole number of steps"),
    optimizer: {
      ...OPTIMIZER_DEFAULTS,
      kind: o.optimizer,
      weightDecay: number("weight-decay", o.weightDecay, (x) => x >= 0, "a number >= 0"),
      maxGradNorm: number("max-grad-norm", o.maxGradNorm, (x) => x >= 0, "a number >= 0 (0 turns clipping off)"),
    },
    maxLength: number("max-length", o.maxLength, (x) => Number.isInteger(x) && x >= 2, "an integer >= 2"),
    seed: number("seed", o.seed, count, "an integer >= 0"),
    shuffle: o.shuffle,
    evalEvery: number("eval-every", o.evalEvery, count, "an integer >= 0"),
    patience: number("patience", o.patience, count, "an integer >= 0"),
    saveEvery: number("save-every", o.saveEvery, count, "an integer >= 0"),
    activationLr: number("activation-lr", o.activationLr, (x) => x >= 0, "a number >= 0"),
  };
}

/** Notices about spec settings training does not follow exactly, printed before it starts. */
function trainingNotices(spec: Adapter, hasEval: boolean): string[] {
  const notices: string[] = [];
  const router = spec.router;
  if (!router) return notices;
  if (router.noise) notices.push("`noise true`: noisy gating (the authors' code, not the paper) is not implemented in training; routers train without noise");
  if (router.activation === "rational" && !hasEval) {
    notices.push("`activation rational` is trained bi-level on eval batches (--activation-lr); without --eval its coefficients stay at their GELU fit");
  }
  return notices;
}

/** Trains; a user error is thrown as a MiloraError (bin/cli.ts prints it). */
export async function trainCommand(specPath: string, opts: TrainCommandOptions): Promise<number> {
  let gpu: GpuContext | undefined;
  try {
    const settings = trainSettings(opts);
    const dir = opts.base;
    if (!existsSync(dir) || !statSync(dir).isDirectory()) throw userError("usage", `no model directory ${dir}`);
    const source = modelSource(specPath, dir);
    if (source.package) throw userError("usage", `${specPath} is a compiled package: train from its .milora spec`);
    const spec = adapterSpecOf(source, opts.adapter, opts.out);
    if (!spec) throw userError("spec", `${specPath} declares no adapter to train`);
    // before the data and the base are read: TrainableParams refuses it too, whoever calls the trainer
    refuseUntrainable(spec);
    for (const n of trainingNotices(spec, opts.eval !== undefined)) process.stderr.write(`milora train: note: ${n}\n`);

    const tokenizer = await Tokenizer.load(dir);
    const chat = opts.chatTemplate ? chatTemplateFile(opts.chatTemplate, dir) : tokenizer ? ChatTemplate.load(dir) : undefined;
    const dataOptions: LoadDataOptions = {
      vocabSize: source.base.vocabSize,
      maxLength: Math.min(settings.maxLength, source.base.maxPositions),
      ...(tokenizer ? { tokenizer } : {}),
      ...(chat ? { chat } : {}),
    };
    const train = loadTrainData(opts.data, dataOptions);
    const evalData = opts.eval ? loadTrainData(opts.eval, dataOptions) : undefined;
    for (const [name, d] of [["data", train], ["eval", evalData]] as const) {
      if (d && d.truncated > 0) process.stderr.write(`milora train: ${d.truncated} ${name} examples cut to ${dataOptions.maxLength} tokens${d.dropped > 0 ? `, ${d.dropped} of them dropped (nothing supervised left)` : ""}\n`);
    }

    // The base as run and serve store it by default, so the trained adapter meets the same weights there.
    const storage = weightsFlag(opts.weights) ?? weightsFor(source.base, dir);
    gpu = await acquireDevice(opts.backend === undefined ? {} : { backend: opts.backend });
    await requireHealthyDevice(gpu);
    const plan = planBase(source.base, { maxLoraRank: largestStoredRank([spec]) ?? 1, weights: storage });
    const checkpoint = openCheckpoint(dir);
    const weights = await uploadWeights(gpu.device, checkpoint, plan, Math.min(plan.maxBindingBytes, gpu.report.limits.maxStorageBufferBindingSize ?? plan.maxBindingBytes));
    checkpoint.close();

    const fresh = initialAdapter(spec, settings.seed, spec.router?.rational ? rationalInit(spec.router.rational) : undefined);
    const adapter = opts.resume
      ? checkpointAdapter(opts.resume, fresh)
      : opts.init
        ? loadAdapter(opts.init, { name: spec.name, base: source.base, spec })
        : fresh;
    mkdirSync(opts.out, { recursive: true });
    writeFileSync(join(opts.out, "training_args.json"), `${JSON.stringify({ spec: specPath, adapter: spec.name, base: dir, data: opts.data, eval: opts.eval ?? null, init: opts.init ?? null, ...settings }, null, 2)}\n`);
    const trainer = new Trainer({ device: gpu.device, plan, weights, adapter, kernel: trainKernelResolver(), settings, train: train.examples, ...(evalData ? { eval: evalData.examples } : {}), out: opts.out });
    if (opts.resume) trainer.restore(opts.resume);
    const mib = (b: number) => (b / 1024 / 1024).toFixed(1);
    const memory = trainer.bytes;
    process.stderr.write(
      `milora train: ${spec.name} on ${source.base.name}, ${train.examples.length} examples${evalData ? ` (${evalData.examples.length} eval)` : ""}, ` +
        `${trainer.totalSteps} steps from step ${trainer.step}; device ${adapterSummary(gpu.report)}\n` +
        `  GPU memory: base ${mib(weights.bytes)} MiB, activations and scratch ${mib(memory.activations)} MiB, parameters with gradients and moments ${mib(memory.parameters)} MiB\n`,
    );

    const abort = new AbortController();
    const onSignal = () => {
      if (abort.signal.aborted) process.exit(130);
      process.stderr.write("\nmilora train: interrupted, saving a checkpoint (Ctrl-C again to exit at once)\n");
      abort.abort();
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
    const bar = new SingleBar({
      format: "step {value}/{total} | epoch {epoch} | loss {loss} | lr {lr} | {tps} tok/s | ETA {eta_formatted}",
      stream: process.stderr,
      noTTYOutput: false,
      hideCursor: true,
    });
    const showBar = !opts.json && process.stderr.isTTY;
    if (showBar) bar.start(trainer.totalSteps, trainer.step, { epoch: "0", loss: "-", lr: "-", tps: "-" });
    let summary;
    try {
      summary = await trainer.run(abort.signal, {
        onStep: (m) => {
          if (opts.json) process.stdout.write(`${JSON.stringify(m)}\n`);
          if (showBar) bar.update(m.step, { epoch: m.epoch.toFixed(2), loss: m.loss.toFixed(4), lr: m.lr.toExponential(2), tps: m.tokens_per_s.toFixed(0) });
        },
        onEval: (e) => {
          const line = `eval at step ${e.step}: loss ${e.eval_loss.toFixed(4)}, perplexity ${e.perplexity.toFixed(2)}${e.best ? " (best)" : ""}`;
          if (showBar) bar.stop();
          if (!opts.json) process.stderr.write(`${line}\n`);
          if (showBar) bar.start(trainer.totalSteps, e.step);
        },
      });
    } finally {
      if (showBar) bar.stop();
      process.off("SIGINT", onSignal);
      process.off("SIGTERM", onSignal);
      trainer.destroy();
      weights.destroy();
    }
    const where = summary.interrupted ? `checkpoint in ${join(opts.out, "checkpoint")} (continue with --resume ${opts.out})` : `adapter in ${join(opts.out, "adapter")}`;
    process.stderr.write(
      `milora train: ${summary.steps} steps in ${summary.seconds.toFixed(1)} s, last loss ${summary.lastLoss.toFixed(4)}` +
        (summary.bestEvalLoss === undefined ? "" : `, best eval loss ${summary.bestEvalLoss.toFixed(4)} at step ${summary.bestStep}`) +
        `${summary.stoppedEarly ? " (stopped early)" : ""}; ${where}\n`,
    );
    return summary.interrupted ? 130 : 0;
  } finally {
    gpu?.destroy();
  }
}

/** A Jinja chat template file given with --chat-template. */
function chatTemplateFile(path: string, dir: string): ChatTemplate {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw userError("usage", `--chat-template ${path}: cannot be read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  return ChatTemplate.fromText(text, path, dir);
}
