// Does it learn? The paper's Table 2 at toy scale: four synthetic tasks whose identity is visible only in
// the prompt (reverse, sort, copy, digit-wise addition mod 10), held-out prompts per task, one frozen
// random base. Plain LoRA and MiLoRA (the paper's router: self-attention pooler, top-2 probabilities,
// balance 0.01; GELU, since the rational unit needs an eval set for its bi-level step) at nearly the same
// trainable-parameter budget, each trained on every task alone and on all four together. Reports
// exact-match accuracy per task (greedy decoding of the held-out prompts by the float64 reference on the
// trained weights), held-out loss, and, for MiLoRA trained on all tasks, the mean gate of each module
// per task and layer: does the router specialise? Writes the table to stdout.
//   node --import tsx bench/train-tasks.ts [--steps 300] [--seed 1]
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { ROUTER_DEFAULTS } from "../compiler/defaults.ts";
import { readHfConfig } from "../compiler/hf-config.ts";
import { EXPERT_MODULES, type Adapter } from "../compiler/model.ts";
import { planBase } from "../compiler/plan.ts";
import { trainKernelResolver } from "../compiler/train-kernels.ts";
import { peftSpec } from "../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { openCheckpoint } from "../runtime/formats/checkpoint.ts";
import { acquireDevice } from "../runtime/gpu/device.ts";
import { uploadWeights } from "../runtime/engine/weights.ts";
import { IGNORE_INDEX, type TrainExample } from "../runtime/training/data.ts";
import { OPTIMIZER_DEFAULTS } from "../runtime/training/optimizer.ts";
import { mulberry32 } from "../runtime/random.ts";
import { initialAdapter } from "../runtime/training/params.ts";
import { Trainer, type TrainSettings } from "../runtime/training/trainer.ts";
import { loadReferenceWeights } from "../test/reference/llama.ts";
import { referenceMiloraLogits } from "../test/reference/milora.ts";

const { values: args } = parseArgs({ options: { steps: { type: "string", default: "300" }, seed: { type: "string", default: "1" } } });
const steps = Number(args.steps);
const seed = Number(args.seed);

// Tokens: 0 BOS, 1 separator, 2..5 the four task markers, 10..19 the digits.
const TASKS = ["reverse", "sort", "copy", "add"] as const;
type Task = (typeof TASKS)[number];
const DIGIT = 10;
const answer: Record<Task, (d: number[]) => number[]> = {
  reverse: (d) => [...d].reverse(),
  sort: (d) => [...d].sort((a, b) => a - b),
  copy: (d) => d,
  add: (d) => [(d[0]! + d[2]!) % 10, (d[1]! + d[3]!) % 10],
};
function example(task: Task, digits: number[]): TrainExample {
  const prompt = [0, 2 + TASKS.indexOf(task), ...digits.map((d) => DIGIT + d), 1];
  const completion = answer[task](digits).map((d) => DIGIT + d);
  return { tokens: [...prompt, ...completion], labels: [...prompt.map(() => IGNORE_INDEX), ...completion], source: task };
}
const random = mulberry32(seed);
const set = (task: Task, n: number) => Array.from({ length: n }, () => example(task, Array.from({ length: 4 }, () => Math.floor(random() * 10))));
const train = new Map(TASKS.map((t) => [t, set(t, 256)]));
const heldOut = new Map(TASKS.map((t) => [t, set(t, 32)]));

const root = mkdtempSync(join(tmpdir(), "milora-tasks-"));
const dir = join(root, "base");
writeRandomCheckpoint(dir, { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 32, maxPositions: 64, seed: 2 });
const base = readHfConfig(dir);
const reference = loadReferenceWeights(dir);
const gpu = await acquireDevice();
const plan = planBase(base, { maxLoraRank: 8 });
const checkpoint = openCheckpoint(dir);
const weights = await uploadWeights(gpu.device, checkpoint, plan, plan.maxBindingBytes);
checkpoint.close();

const lora = peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name: "lora" });
const milora: Adapter = { ...lora, name: "milora", router: { ...ROUTER_DEFAULTS, pooling: "attention", activation: "gelu", noise: false, balance: 0.01 } };
const params = (spec: Adapter) => spec.experts.reduce((n, e) => n + e.rank * (e.inFeatures + e.outFeatures), 0) + (spec.router ? spec.layers.length * (7 * base.hiddenSize + base.hiddenSize) : 0);
const settings: TrainSettings = {
  epochs: 1, steps, batchSize: 16, gradAccum: 1, lr: 3e-3, schedule: "linear", warmup: 0.06,
  optimizer: { ...OPTIMIZER_DEFAULTS, maxGradNorm: 1 }, maxLength: 64, seed, shuffle: true, evalEvery: 0, patience: 0, saveEvery: 0, activationLr: 0,
};

interface Result {
  readonly accuracy: Map<Task, number>;
  readonly loss: Map<Task, number>;
  readonly gates?: Map<Task, number[][]>;
}

async function run(spec: Adapter, tasks: readonly Task[]): Promise<Result> {
  const adapter = initialAdapter({ ...spec, experts: spec.experts.map((e) => ({ ...e, dropout: 0 })) }, seed);
  const trainer = new Trainer({ device: gpu.device, plan, weights, adapter, kernel: trainKernelResolver(), settings, train: tasks.flatMap((t) => train.get(t)!), out: join(root, `${spec.name}-${tasks.join("+")}`) });
  for (let i = 0; i < steps; i++) await trainer.trainStep();
  const trained = await trainer.weights();
  const loss = new Map<Task, number>();
  for (const t of tasks) loss.set(t, await trainer.evalLoss(heldOut.get(t)!));
  trainer.destroy();
  const accuracy = new Map<Task, number>();
  const gates = new Map<Task, number[][]>();
  for (const t of tasks) {
    let right = 0;
    const sums = Array.from({ length: base.layers }, () => new Array<number>(7).fill(0));
    for (const ex of heldOut.get(t)!) {
      const prompt = ex.tokens.slice(0, ex.labels.findIndex((l) => l !== IGNORE_INDEX));
      const want = ex.tokens.slice(prompt.length);
      const got: number[] = [];
      for (let k = 0; k < want.length; k++) {
        const { logits, routing } = referenceMiloraLogits(base, reference.weights, trained, prompt, got);
        const row = logits.at(-1)!;
        got.push(row.indexOf(Math.max(...row)));
        if (k === 0) for (const d of routing) EXPERT_MODULES.forEach((m, e) => (sums[d.layer]![e] = sums[d.layer]![e]! + (d.experts[m] ?? 0) / heldOut.get(t)!.length));
      }
      if (got.every((g, i) => g === want[i])) right++;
    }
    accuracy.set(t, right / heldOut.get(t)!.length);
    gates.set(t, sums);
  }
  return { accuracy, loss, ...(spec.router ? { gates } : {}) };
}

console.log(`base: random LLaMA, hidden 64, 2 layers, frozen; ${steps} steps of batch 16; trainable: LoRA ${params(lora)}, MiLoRA ${params(milora)} parameters`);
const rows: string[] = ["| adapter | trained on | " + TASKS.map((t) => `${t} exact / loss`).join(" | ") + " |", "| --- | --- |" + TASKS.map(() => " ---: |").join("")];
let routingTable: Map<Task, number[][]> | undefined;
for (const spec of [lora, milora]) {
  const single = new Map<Task, Result>();
  for (const t of TASKS) single.set(t, await run(spec, [t]));
  rows.push(`| ${spec.name} | each task alone | ${TASKS.map((t) => `${(100 * single.get(t)!.accuracy.get(t)!).toFixed(0)}% / ${single.get(t)!.loss.get(t)!.toFixed(3)}`).join(" | ")} |`);
  const multi = await run(spec, TASKS);
  rows.push(`| ${spec.name} | all four | ${TASKS.map((t) => `${(100 * multi.accuracy.get(t)!).toFixed(0)}% / ${multi.loss.get(t)!.toFixed(3)}`).join(" | ")} |`);
  if (spec.router) routingTable = multi.gates;
}
console.log(rows.join("\n"));
if (routingTable) {
  console.log("\nMiLoRA trained on all four: mean gate per module (q k v o gate up down), by task and layer, on held-out prompts");
  for (const t of TASKS) for (let l = 0; l < base.layers; l++) console.log(`${t.padEnd(8)} layer ${l}: ${routingTable.get(t)![l]!.map((g) => g.toFixed(2)).join(" ")}`);
}
weights.destroy();
gpu.destroy();
rmSync(root, { recursive: true, force: true });
