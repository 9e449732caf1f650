// `milora train` end to end, as a user runs it: a child process on a tiny random checkpoint and a JSONL
// file; the adapter it writes then runs in `milora run`, whose logits give the loss the trainer reported.
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { loadAdapter } from "../../../runtime/formats/adapter.ts";
import { loadReferenceWeights } from "../../reference/llama.ts";
import { referenceMiloraLogits } from "../../reference/milora.ts";

const root = mkdtempSync(join(tmpdir(), "milora-train-"));
const model = join(root, "tiny");
writeRandomCheckpoint(model, { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 64, maxPositions: 64, seed: 3 });
const milora = new URL("../../../bin/milora.js", import.meta.url).pathname;
test.after(() => rmSync(root, { recursive: true, force: true }));

const spec = join(root, "tiny.milora");
writeFileSync(
  spec,
  `base tiny from "${model}"\n\nadapter copycat on tiny {\n  experts q_proj, v_proj, o_proj, down_proj { rank 4 alpha 8 }\n  router off\n}\n\n` +
    `adapter routed on tiny {\n  experts all { rank 4 alpha 8 }\n  router { pooling attention  select top_k 2  activation rational  when prompt  noise false  balance 0.01 }\n}\n`,
);
// A task the base cannot do: after the prompt [1, a, b, c, 9], repeat a, b, c.
const examples = Array.from({ length: 12 }, (_, i) => {
  const abc = [10 + i, 30 + ((i * 7) % 20), 50 + ((i * 3) % 10)];
  return { input_ids: [1, ...abc, 9, ...abc], labels: [-100, -100, -100, -100, -100, ...abc] };
});
const data = join(root, "train.jsonl");
writeFileSync(data, examples.map((e) => JSON.stringify(e)).join("\n") + "\n");
const dev = join(root, "dev.jsonl");
writeFileSync(dev, examples.slice(0, 4).map((e) => JSON.stringify(e)).join("\n") + "\n");

async function milorun(command: string, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [milora, command, ...args], { timeout: 120_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code?: number; stdout: string; stderr: string };
    return { code: err.code ?? -1, stdout: err.stdout, stderr: err.stderr };
  }
}

test("trains a LoRA adapter: the loss falls, metrics.jsonl has every step, and milora run reproduces the eval loss", async () => {
  const out = join(root, "run1");
  const { code, stderr } = await milorun("train", spec, "--adapter", "copycat", "--base", model, "--data", data, "--eval", dev, "--out", out, "--steps", "60", "--batch-size", "4", "--lr", "2e-2", "--warmup", "0", "--eval-every", "20", "--seed", "1");
  assert.is(code, 0, stderr);
  const metrics = readFileSync(join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, number>);
  assert.equal(metrics.map((m) => m.step), Array.from({ length: 60 }, (_, i) => i + 1));
  for (const key of ["loss", "lm_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "epoch"]) assert.type(metrics[0]![key], "number", key);
  const [first, last] = [metrics[0]!.loss!, metrics.at(-1)!.loss!];
  assert.ok(last < 0.5 * first, `loss ${first} -> ${last}`);
  const evals = metrics.filter((m) => m.eval_loss !== undefined);
  assert.equal(evals.map((m) => m.step), [20, 40, 60]);
  assert.ok(existsSync(join(out, "adapter", "adapter_model.safetensors")) && existsSync(join(out, "checkpoint", "trainer_state.json")));
  assert.match(stderr, /best eval loss/);

  // The adapter it wrote (the best eval checkpoint) gives, through milora run, the eval loss it reported.
  await assertRunLoss("copycat", join(out, "adapter"), Math.min(...evals.map((m) => m.eval_loss!)));
});

async function assertRunLoss(adapter: string, dir: string, best: number): Promise<void> {
  let total = 0;
  let count = 0;
  for (const e of examples.slice(0, 4)) {
    const r = await milorun("run", spec, "--base", model, "--adapter", `${adapter}=${dir}`, "--tokens", e.input_ids.join(","), "--max-tokens", "0", "--json", "--logits", "all");
    assert.is(r.code, 0, r.stderr);
    const logits = (JSON.parse(r.stdout.trim().split("\n")[0]!) as { logits: number[][] }).logits;
    for (let t = 0; t + 1 < e.input_ids.length; t++) {
      const label = e.labels[t + 1]!;
      if (label === -100) continue;
      const row = logits[t]!;
      const max = Math.max(...row);
      total += max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0)) - row[label]!;
      count++;
    }
  }
  assert.ok(Math.abs(total / count - best) / best < 1e-4, `milora run's loss ${total / count} vs the trainer's eval loss ${best}`);
}

test("trains a MiLoRA adapter as in the paper (routers, self-attention pooler, rational activation bi-level on the eval set)", async () => {
  const out = join(root, "milora");
  const { code, stderr } = await milorun("train", spec, "--adapter", "routed", "--base", model, "--data", data, "--eval", dev, "--out", out, "--steps", "60", "--batch-size", "4", "--lr", "3e-2", "--warmup", "0", "--eval-every", "30", "--activation-lr", "1e-3");
  assert.is(code, 0, stderr);
  const metrics = readFileSync(join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, number>);
  const [first, last] = [metrics[0]!, metrics.at(-1)!];
  assert.ok(last.lm_loss! < 0.7 * first.lm_loss!, `lm loss ${first.lm_loss} -> ${last.lm_loss}`);
  for (const m of metrics) assert.ok(m.balance_loss! > 0 && Math.abs(m.loss! - m.lm_loss! - 0.01 * m.balance_loss!) < 1e-6, `step ${m.step}: loss = lm_loss + 0.01 balance_loss`);
  // The trainer routes each sequence on its prompt (the leading unsupervised tokens), as inference does:
  // the float64 MiLoRA reference, routing on the prompt and teacher-forcing the rest, gives its eval loss.
  const best = Math.min(...metrics.filter((m) => m.eval_loss !== undefined).map((m) => m.eval_loss!));
  const { base, weights } = loadReferenceWeights(model);
  const trained = loadAdapter(join(out, "adapter"), { name: "routed", base });
  let total = 0;
  let count = 0;
  for (const e of examples.slice(0, 4)) {
    const prompt = e.labels.findIndex((l) => l !== -100);
    const { logits } = referenceMiloraLogits(base, weights, trained, e.input_ids.slice(0, prompt), e.input_ids.slice(prompt));
    for (let t = prompt - 1; t + 1 < e.input_ids.length; t++) {
      const row = logits[t]!;
      const max = Math.max(...row);
      total += max + Math.log(row.reduce((a, v) => a + Math.exp(v - max), 0)) - row[e.labels[t + 1]!]!;
      count++;
    }
  }
  assert.ok(Math.abs(total / count - best) / best < 1e-4, `reference loss ${total / count} vs the trainer's eval loss ${best}`);
  // And milora run takes the adapter as it is, reporting each layer's routing.
  const r = await milorun("run", spec, "--base", model, "--adapter", `routed=${join(out, "adapter")}`, "--tokens", examples[0]!.input_ids.slice(0, 5).join(","), "--max-tokens", "3", "--json");
  assert.is(r.code, 0, r.stderr);
  assert.is((JSON.parse(r.stdout.trim().split("\n")[0]!) as { routing: unknown[] }).routing.length, 2);
});

test("bad data is refused before any training, naming the line; bad flags are usage errors", async () => {
  const bad = join(root, "bad.jsonl");
  writeFileSync(bad, `${JSON.stringify(examples[0])}\n{"input_ids": [1, 2, 500]}\n`);
  const r = await milorun("train", spec, "--adapter", "copycat", "--base", model, "--data", bad, "--out", join(root, "bad-out"));
  assert.is(r.code, 7, "a data error");
  assert.match(r.stderr, `${bad}:2: token 500 at position 2 is outside the vocabulary (0..63)`);
  assert.not.ok(existsSync(join(root, "bad-out", "metrics.jsonl")));
  const usage = await milorun("train", spec, "--adapter", "copycat", "--base", model, "--data", data, "--out", join(root, "x"), "--batch-size", "0");
  assert.is(usage.code, 2);
  assert.match(usage.stderr, "--batch-size must be a positive integer");
});

test("a DoRA adapter is refused before anything is read: milora train does not train DoRA", async () => {
  const doraSpec = join(root, "dora.milora");
  writeFileSync(doraSpec, `base tiny from "${model}"\n\nadapter d on tiny {\n  experts all { rank 4 alpha 8 dora true }\n  router off\n}\n`);
  const r = await milorun("train", doraSpec, "--adapter", "d", "--base", model, "--data", data, "--out", join(root, "dora-out"));
  assert.is(r.code, 11, "an unsupported error");
  assert.match(r.stderr, "adapter d uses DoRA (layer 0 q_proj and the rest): milora train does not train DoRA yet");
  assert.not.ok(existsSync(join(root, "dora-out")));
});

test.run();
