// `milora train` on the per-token baselines end to end, as a user runs it (a child process on a tiny
// random checkpoint and a JSONL file, as test/bin/commands/train.test.ts does for LoRA and MiLoRA), for a
// per_module (MOELoRA) and a per_ffn (MixLoRA) adapter: the loss falls, every step's loss is lm_loss +
// balance x balance_loss, and the adapter it writes loads (per_module: runtime/formats/adapter.ts's
// layout, a router tensor per module; per_ffn: MoE-PEFT's MixLoRA layout, a moe_gate per layer and each
// expert's LoRA) into the engine, whose logits, each token routed afresh in every module or every
// layer's feed-forward block, give the eval loss the trainer reported; the float64 per-token reference
// gives it too, and milora run takes the directory as it is.
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkSource } from "../../../compiler/check.ts";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import type { Adapter } from "../../../compiler/model.ts";
import { plannedEngine } from "../../../bin/engine-plan.ts";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { Engine } from "../../../runtime/engine/engine.ts";
import { loadAdapter, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { loadReferenceWeights } from "../../reference/llama.ts";
import { referenceMoeLogits } from "../../reference/moe-lora.ts";
import type { Placement } from "./reference-adapters.ts";

const root = mkdtempSync(join(tmpdir(), "milora-moe-train-"));
const model = join(root, "tiny");
writeRandomCheckpoint(model, { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 64, maxPositions: 64, seed: 3 });
const milora = new URL("../../../bin/milora.js", import.meta.url).pathname;
test.after(() => rmSync(root, { recursive: true, force: true }));

// The copy task of train.test.ts: after the prompt [1, a, b, c, 9], repeat a, b, c.
const examples = Array.from({ length: 12 }, (_, i) => {
  const abc = [10 + i, 30 + ((i * 7) % 20), 50 + ((i * 3) % 10)];
  return { input_ids: [1, ...abc, 9, ...abc], labels: [-100, -100, -100, -100, -100, ...abc] };
});
const data = join(root, "train.jsonl");
writeFileSync(data, examples.map((e) => JSON.stringify(e)).join("\n") + "\n");
const dev = join(root, "dev.jsonl");
const devExamples = examples.slice(0, 4);
writeFileSync(dev, devExamples.map((e) => JSON.stringify(e)).join("\n") + "\n");

async function milorun(command: string, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [milora, command, ...args], { timeout: 300_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code?: number; stdout: string; stderr: string };
    return { code: err.code ?? -1, stdout: err.stdout, stderr: err.stderr };
  }
}

/** Mean cross-entropy of the dev examples' supervised positions from each example's logits rows. */
function devLoss(logitsOf: (i: number) => readonly ArrayLike<number>[]): number {
  let total = 0;
  let count = 0;
  devExamples.forEach((e, i) => {
    const logits = logitsOf(i);
    for (let t = 0; t + 1 < e.input_ids.length; t++) {
      const label = e.labels[t + 1]!;
      if (label === -100) continue;
      const row = Array.from(logits[t]!);
      const max = Math.max(...row);
      total += max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0)) - row[label]!;
      count++;
    }
  });
  return total / count;
}

/** One placement's run: the adapter's name and experts, the engine's stacked rank, and the checks of the layout it was written in. */
interface Run {
  readonly placement: Placement;
  readonly name: string;
  readonly experts: string;
  readonly maxLoraRank: number;
  layout(trained: LoadedAdapter, spec: Adapter, dir: string): void;
}

async function trainAndServe(r: Run): Promise<void> {
  const specPath = join(root, `${r.name}.milora`);
  const specText =
    `base tiny from "${model}"\n\n` +
    `adapter ${r.name} on tiny {\n  experts all { ${r.experts} }\n  router { placement ${r.placement} num_experts 4 select top_k 2 renormalize balance 0.01 }\n}\n`;
  writeFileSync(specPath, specText);
  const out = join(root, r.name);
  const { code, stderr } = await milorun("train", specPath, "--adapter", r.name, "--base", model, "--data", data, "--eval", dev, "--out", out, "--steps", "40", "--batch-size", "4", "--lr", "2e-2", "--warmup", "0", "--eval-every", "20", "--seed", "1");
  assert.is(code, 0, stderr);
  const metrics = readFileSync(join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, number>);
  assert.equal(metrics.map((m) => m.step), Array.from({ length: 40 }, (_, i) => i + 1));
  const [first, last] = [metrics[0]!, metrics.at(-1)!];
  assert.ok(last.lm_loss! < 0.5 * first.lm_loss!, `lm loss ${first.lm_loss} -> ${last.lm_loss}`);
  // Top-2 of 4: the joint balance loss is about k = 2 when balanced (between 2 and 4 here).
  for (const m of metrics) assert.ok(m.balance_loss! > 1 && m.balance_loss! <= 4 && Math.abs(m.loss! - m.lm_loss! - 0.01 * m.balance_loss!) < 1e-6, `step ${m.step}: loss = lm_loss + 0.01 balance_loss (${m.balance_loss})`);
  const evals = metrics.filter((m) => m.eval_loss !== undefined);
  assert.equal(evals.map((m) => m.step), [20, 40]);
  const best = Math.min(...evals.map((m) => m.eval_loss!));
  assert.ok(existsSync(join(out, "adapter", "adapter_model.safetensors")) && existsSync(join(out, "checkpoint", "trainer_state.json")));
  console.log(`${r.placement}: lm loss ${first.lm_loss!.toFixed(4)} -> ${last.lm_loss!.toFixed(4)}, balance loss ${first.balance_loss!.toFixed(4)} -> ${last.balance_loss!.toFixed(4)}, best eval loss ${best.toFixed(6)}`);

  // The adapter as the engine loads it.
  const { program } = checkSource(specText, specPath);
  const spec = program.adapters.find((a) => a.name === r.name)!;
  const { base, weights } = loadReferenceWeights(model);
  const trained = loadAdapter(join(out, "adapter"), { name: r.name, base, spec });
  r.layout(trained, spec, join(out, "adapter"));
  const gpu = await acquireDevice();
  const engine = await Engine.load(plannedEngine({ base: readHfConfig(model), checkpointDir: model, gpu, ctx: 64, maxSequences: 4, maxAdapters: 2, maxLoraRank: r.maxLoraRank, adapter: spec }));
  try {
    engine.loadAdapter(r.name, trained);
    const engineLogits: Float32Array[][] = [];
    for (const e of devExamples) {
      const seq = engine.createSequence(e.input_ids, { adapter: r.name });
      seq.logits = "all";
      engineLogits.push([...(await engine.prefill([seq])).get(seq)!.logits!]);
      engine.release(seq);
    }
    const references = devExamples.map((e) => referenceMoeLogits(base, weights, trained, e.input_ids));
    // Every routing call of the trained routers is clear of f32 rounding, so the engine routes as the trainer did.
    const gaps = references.flatMap((x) => x.experts.map((d) => (d.margin === Infinity ? Infinity : Math.min(...d.experts.map((e) => d.logits[e]!)) - Math.max(...d.logits.filter((_, e) => !d.experts.includes(e))))));
    assert.ok(Math.min(...gaps) > 1e-5, `closest routing call ${Math.min(...gaps)}`);
    const engineLoss = devLoss((i) => engineLogits[i]!);
    const referenceLoss = devLoss((i) => references[i]!.logits);
    console.log(`eval loss: trainer ${best.toFixed(6)}, engine ${engineLoss.toFixed(6)} (${(Math.abs(engineLoss - best) / best).toExponential(1)} relative), float64 reference ${referenceLoss.toFixed(6)} (${(Math.abs(referenceLoss - best) / best).toExponential(1)}); closest routing call ${Math.min(...gaps).toExponential(1)}`);
    assert.ok(Math.abs(engineLoss - best) / best < 1e-4, `the engine's loss ${engineLoss} vs the trainer's eval loss ${best}`);
    assert.ok(Math.abs(referenceLoss - best) / best < 1e-4, `the float64 reference's loss ${referenceLoss} vs the trainer's eval loss ${best}`);
  } finally {
    engine.destroy();
    gpu.destroy();
  }
  // And milora run takes the directory as it is.
  const run = await milorun("run", specPath, "--base", model, "--adapter", `${r.name}=${join(out, "adapter")}`, "--tokens", examples[0]!.input_ids.slice(0, 5).join(","), "--max-tokens", "3", "--json");
  assert.is(run.code, 0, run.stderr);
}

const RUNS: readonly Run[] = [
  {
    placement: "per_module",
    name: "moelora",
    experts: "rank 8 alpha 16",
    maxLoraRank: 8,
    // A router per module.
    layout: (trained, spec) => assert.is(trained.moeRouters!.size, spec.experts.length),
  },
  {
    placement: "per_ffn",
    name: "mixlora",
    experts: "rank 4 alpha 8",
    maxLoraRank: 16,
    // MoE-PEFT's MixLoRA layout, a router per layer, moved from its N(0, 0.02^2) start.
    layout: (trained, _spec, dir) => {
      const config = JSON.parse(readFileSync(join(dir, "adapter_config.json"), "utf8")) as Record<string, unknown>;
      assert.is(config.peft_type, "MIXLORA");
      assert.equal([...trained.moeRouters!.keys()].sort(), ["0.ffn", "1.ffn"]);
      for (const w of trained.moeRouters!.values()) {
        const std = Math.sqrt(w.reduce((a, v) => a + v * v, 0) / w.length);
        assert.ok(std > 0.005 && std < 1, `router weights' size ${std}`);
      }
      assert.is(trained.lora.get("0.down_proj")!.rank, 16, "4 experts of rank 4 stacked");
    },
  },
];

for (const r of RUNS) {
  test(`trains a ${r.placement} adapter: the loss falls, the balance loss is in it, and the engine's logits reproduce the eval loss`, async () => {
    await trainAndServe(r);
  });
}

test.run();
