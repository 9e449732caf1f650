// Does it learn? The paper's Tables 1 and 2 at toy scale: four synthetic tasks whose identity is visible
// only in the prompt (reverse, sort, copy, digit-wise addition mod 10), held-out prompts per task, one
// frozen random base. Four methods with the same LoRA parameters (rank 8 on all seven modules): plain
// LoRA; MiLoRA (the paper's router: self-attention pooler, top-2 probabilities, balance 0.01; GELU, since
// the rational unit needs an eval set for its bi-level step); MOELoRA / MoLoRA (`placement per_module`,
// each module's rank 8 split into 8 experts of rank 1, its own token router, top 4 renormalised, the
// MiLoRA paper's MOELoRA setting scaled down); MixLoRA (`placement per_ffn`, attention modules rank 8,
// each MLP module 8 experts of rank 1, one token router per layer, top 2 renormalised: the same LoRA
// parameters, as the example spec's llama2_mixlora is to rank-32 LoRA). Each trained on every task alone
// and on all tasks together. Reports exact-match accuracy per task (greedy decoding of the held-out
// prompts by the float64 references on the trained weights), held-out loss, the trainable parameters
// (compiler/budget.ts, what `milora check` prints), and for the routed methods trained on all tasks:
// MiLoRA's mean gate of each module per task and layer, and MixLoRA's share of each expert among the
// kept (token, expert) picks of the prompt tokens per task and layer: does the router specialise?
// Writes the tables to stdout, each run's time to stderr.
//   node --import tsx bench/train-tasks.ts [--steps 300] [--seed 1] [--methods lora,milora,moelora,mixlora] [--tasks reverse,sort,copy,add]
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { ROUTER_DEFAULTS } from "../compiler/defaults.ts";
import { readHfConfig } from "../compiler/hf-config.ts";
import { computeBudget } from "../compiler/budget.ts";
import { EXPERT_MODULES, FFN_MODULES, type Adapter } from "../compiler/model.ts";
import { planBase } from "../compiler/plan.ts";
import { trainKernelResolver } from "../compiler/train-kernels.ts";
import { peftSpec } from "../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { loraSlot } from "../runtime/formats/adapter-config.ts";
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
import { referenceMoeLogits } from "../test/reference/moe-lora.ts";

const { values: args } = parseArgs({
  options: {
    steps: { type: "string", default: "300" },
    seed: { type: "string", default: "1" },
    methods: { type: "string", default: "lora,milora,moelora,mixlora" },
    tasks: { type: "string", default: "reverse,sort,copy,add" },
  },
});
const steps = Number(args.steps);
const seed = Number(args.seed);

// Tokens: 0 BOS, 1 separator, 2..5 the four task markers, 10..19 the digits.
const ALL_TASKS = ["reverse", "sort", "copy", "add"] as const;
type Task = (typeof ALL_TASKS)[number];
const TASKS = args.tasks.split(",").map((t) => {
  if (!(ALL_TASKS as readonly string[]).includes(t)) throw new Error(`--tasks: unknown task ${t} (${ALL_TASKS.join(", ")})`);
  return t as Task;
});
const DIGIT = 10;
const answer: Record<Task, (d: number[]) => number[]> = {
  reverse: (d) => [...d].reverse(),
  sort: (d) => [...d].sort((a, b) => a - b),
  copy: (d) => d,
  add: (d) => [(d[0]! + d[2]!) % 10, (d[1]! + d[3]!) % 10],
};
function example(task: Task, digits: number[]): TrainExample {
  const prompt = [0, 2 + ALL_TASKS.indexOf(task), ...digits.map((d) => DIGIT + d), 1];
  const completion = answer[task](digits).map((d) => DIGIT + d);
  return { tokens: [...prompt, ...completion], labels: [...prompt.map(() => IGNORE_INDEX), ...completion], source: task };
}
const random = mulberry32(seed);
const set = (task: Task, n: number) => Array.from({ length: n }, () => example(task, Array.from({ length: 4 }, () => Math.floor(random() * 10))));
const train = new Map(ALL_TASKS.map((t) => [t, set(t, 256)]));
const heldOut = new Map(ALL_TASKS.map((t) => [t, set(t, 32)]));

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
// `router { placement per_module num_experts 8 select top_k 4 renormalize }`: rank 8 = 8 experts of rank 1.
const moelora: Adapter = { ...lora, name: "moelora", moe: { placement: "per_module", experts: 8, selection: { rule: "top_k", k: 4, renormalize: true }, balance: 0.01 } };
// `router { placement per_ffn num_experts 8 select top_k 2 renormalize }` with `experts mlp.* { rank 1 alpha 2 }`:
// 8 experts of rank 1 per MLP module (stacked rank 8, scaling 2 as LoRA's), attention at rank 8.
const mixlora: Adapter = {
  ...lora,
  name: "mixlora",
  experts: lora.experts.map((e) => (FFN_MODULES.includes(e.module) ? loraSlot(base, e.layer, e.module, { rank: 1, alpha: 2, dropout: 0, rslora: false }) : e)),
  moe: { placement: "per_ffn", experts: 8, selection: { rule: "top_k", k: 2, renormalize: true }, balance: 0.01 },
};
const METHODS = new Map([lora, milora, moelora, mixlora].map((s) => [s.name, s]));
const specs = args.methods.split(",").map((m) => {
  const spec = METHODS.get(m);
  if (!spec) throw new Error(`--methods: unknown method ${m} (${[...METHODS.keys()].join(", ")})`);
  return spec;
});
const LABEL: Record<string, string> = { lora: "LoRA", milora: "MiLoRA", moelora: "MOELoRA (per_module)", mixlora: "MixLoRA (per_ffn)" };
const settings: TrainSettings = {
  epochs: 1, steps, batchSize: 16, gradAccum: 1, lr: 3e-3, schedule: "linear", warmup: 0.06,
  optimizer: { ...OPTIMIZER_DEFAULTS, maxGradNorm: 1 }, maxLength: 64, seed, shuffle: true, evalEvery: 0, patience: 0, saveEvery: 0, activationLr: 0,
};

interface Result {
  readonly accuracy: Map<Task, number>;
  readonly loss: Map<Task, number>;
  /** MiLoRA: mean gate per layer and module; MixLoRA: share of each expert among the prompt tokens' kept picks, per layer. */
  readonly gates?: Map<Task, number[][]>;
}

async function run(spec: Adapter, tasks: readonly Task[]): Promise<Result> {
  const started = performance.now();
  const adapter = initialAdapter({ ...spec, experts: spec.experts.map((e) => ({ ...e, dropout: 0 })) }, seed);
  const trainer = new Trainer({ device: gpu.device, plan, weights, adapter, kernel: trainKernelResolver(), settings, train: tasks.flatMap((t) => train.get(t)!), out: join(root, `${spec.name}-${tasks.join("+")}`) });
  for (let i = 0; i < steps; i++) await trainer.trainStep();
  const trained = await trainer.weights();
  const loss = new Map<Task, number>();
  for (const t of tasks) loss.set(t, await trainer.evalLoss(heldOut.get(t)!));
  trainer.destroy();
  const trainedAt = performance.now();
  const accuracy = new Map<Task, number>();
  const gates = new Map<Task, number[][]>();
  const experts = spec.moe?.experts ?? 0;
  for (const t of tasks) {
    let right = 0;
    const n = heldOut.get(t)!.length;
    const sums = Array.from({ length: base.layers }, () => new Array<number>(spec.moe ? experts : 7).fill(0));
    for (const ex of heldOut.get(t)!) {
      const prompt = ex.tokens.slice(0, ex.labels.findIndex((l) => l !== IGNORE_INDEX));
      const want = ex.tokens.slice(prompt.length);
      const got: number[] = [];
      for (let k = 0; k < want.length; k++) {
        let row: Float64Array;
        if (spec.moe) {
          const step = referenceMoeLogits(base, reference.weights, trained, [...prompt, ...got]);
          row = step.logits.at(-1)!;
          // MixLoRA's expert use: the kept picks of the prompt's tokens, per layer (each token keeps k of E).
          if (k === 0 && spec.moe.placement === "per_ffn")
            for (const d of step.experts) for (const e of d.experts) sums[d.layer]![e] = sums[d.layer]![e]! + 1 / (n * prompt.length * d.experts.length);
        } else {
          const step = referenceMiloraLogits(base, reference.weights, trained, prompt, got);
          row = step.logits.at(-1)!;
          if (k === 0) for (const d of step.routing) EXPERT_MODULES.forEach((m, e) => (sums[d.layer]![e] = sums[d.layer]![e]! + (d.experts[m] ?? 0) / n));
        }
        got.push(row.indexOf(Math.max(...row)));
      }
      if (got.every((g, i) => g === want[i])) right++;
    }
    accuracy.set(t, right / n);
    gates.set(t, sums);
  }
  const seconds = (ms: number) => (ms / 1000).toFixed(0);
  console.error(`${spec.name} on ${tasks.join("+")}: trained in ${seconds(trainedAt - started)} s, decoded in ${seconds(performance.now() - trainedAt)} s`);
  return { accuracy, loss, ...(spec.router || spec.moe?.placement === "per_ffn" ? { gates } : {}) };
}

const benchStarted = performance.now();
const budget = (spec: Adapter) => {
  const b = computeBudget(spec);
  return `${LABEL[spec.name]} ${b.trainableParams} (LoRA ${b.loraParams} + routers ${b.routerParams})`;
};
console.log(`base: random LLaMA, hidden 64, 2 layers, frozen; ${steps} steps of batch 16; tasks ${TASKS.join(", ")}; trainable parameters: ${specs.map(budget).join(", ")}`);
const rows: string[] = ["| adapter | trained on | " + TASKS.map((t) => `${t} exact / loss`).join(" | ") + " | mean exact |", "| --- | --- |" + TASKS.map(() => " ---: |").join("") + " ---: |"];
const cells = (r: Result) => {
  const mean = TASKS.reduce((a, t) => a + r.accuracy.get(t)!, 0) / TASKS.length;
  return `${TASKS.map((t) => `${(100 * r.accuracy.get(t)!).toFixed(0)}% / ${r.loss.get(t)!.toFixed(3)}`).join(" | ")} | ${(100 * mean).toFixed(1)}% |`;
};
const together = TASKS.length === 2 ? "both" : `all ${TASKS.length}`;
const routing = new Map<string, Map<Task, number[][]>>();
for (const spec of specs) {
  const single: Result = { accuracy: new Map(), loss: new Map() };
  for (const t of TASKS) {
    const r = await run(spec, [t]);
    single.accuracy.set(t, r.accuracy.get(t)!);
    single.loss.set(t, r.loss.get(t)!);
  }
  rows.push(`| ${LABEL[spec.name]} | each task alone | ${cells(single)}`);
  if (TASKS.length > 1) {
    const multi = await run(spec, TASKS);
    rows.push(`| ${LABEL[spec.name]} | ${together} | ${cells(multi)}`);
    if (multi.gates) routing.set(spec.name, multi.gates);
  }
}
console.log(rows.join("\n"));
const print = (title: string, table: Map<Task, number[][]>) => {
  console.log(`\n${title}`);
  for (const t of TASKS) for (let l = 0; l < base.layers; l++) console.log(`${t.padEnd(8)} layer ${l}: ${table.get(t)![l]!.map((g) => g.toFixed(2)).join(" ")}`);
};
if (routing.has("milora")) print(`MiLoRA trained on ${together}: mean gate per module (q k v o gate up down), by task and layer, on held-out prompts`, routing.get("milora")!);
if (routing.has("mixlora")) print(`MixLoRA trained on ${together}: share of experts 0..7 among the kept picks of the held-out prompts' tokens, by task and layer`, routing.get("mixlora")!);
console.error(`total ${((performance.now() - benchStarted) / 60000).toFixed(1)} min`);
weights.destroy();
gpu.destroy();
rmSync(root, { recursive: true, force: true });
