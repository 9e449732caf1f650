// `milora run` end to end, as a user runs it: a child process on a tiny random checkpoint.
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles } from "../../../compiler/check.ts";
import { EXPERT_MODULES } from "../../../compiler/model.ts";
import { writeRandomAdapter, writeRandomPeftAdapter } from "../../../examples/random-adapter.ts";
import { PRESETS, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { loadReferenceWeights, referenceGreedy, referenceLogits } from "../../reference/llama.ts";
import { referenceMiloraLogits } from "../../reference/milora.ts";

const root = mkdtempSync(join(tmpdir(), "milora-run-"));
const model = join(root, "tiny");
writeRandomCheckpoint(model, PRESETS.tiny);
const milora = new URL("../../../bin/milora.js", import.meta.url).pathname;

test.after(() => rmSync(root, { recursive: true, force: true }));

async function run(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [milora, "run", ...args], { timeout: 60_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code?: number; stdout: string; stderr: string };
    return { code: err.code ?? -1, stdout: err.stdout, stderr: err.stderr };
  }
}

/** stderr without Dawn's start-up warnings about drivers it did not find. */
function problems(stderr: string): string[] {
  return stderr.split("\n").filter((l) => l.startsWith("milora"));
}

test("--json prints the generated tokens, every prompt position's logits, timings and the device", async () => {
  const prompt = [1, 72, 101, 108, 108, 111];
  const { code, stdout, stderr } = await run("--base", model, "--tokens", prompt.join(","), "--max-tokens", "5", "--json", "--logits", "all");
  assert.is(code, 0, stderr);
  const out = JSON.parse(stdout) as { tokens: number[]; logits: number[][]; timings: Record<string, number>; device: string };
  const { base, weights } = loadReferenceWeights(model);
  assert.equal(out.tokens, referenceGreedy(base, weights, prompt, 5).slice(0, out.tokens.length));
  assert.ok(out.tokens.length === 5 || out.tokens.at(-1) === 2, "stops early only at the end-of-sequence token");
  const want = referenceLogits(base, weights, prompt);
  assert.is(out.logits.length, prompt.length);
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => row.forEach((w, i) => ((diff += (out.logits[r]![i]! - w) ** 2), (norm += w * w))));
  assert.ok(Math.sqrt(diff / norm) < 1e-4, `logits relative error ${Math.sqrt(diff / norm)}`);
  assert.is(out.timings.prefillTokens, prompt.length);
  assert.ok(out.timings.prefillTokensPerSecond! > 0);
  assert.match(out.device, /\((vulkan|metal|d3d12|opengles), /);
});

test("--prompt goes through the model's tokenizer and the text comes back", async () => {
  const { code, stdout, stderr } = await run("--base", model, "--prompt", "hello world", "--max-tokens", "4", "--temperature", "0.8", "--seed", "3", "--json");
  assert.is(code, 0, stderr);
  const out = JSON.parse(stdout) as { tokens: number[]; text: string };
  assert.type(out.text, "string");
  assert.ok(out.tokens.length >= 1 && out.tokens.length <= 4);
});

test("a spec whose base disagrees with the checkpoint is refused, naming both values", async () => {
  const spec = join(root, "wrong.milora");
  writeFileSync(spec, "base other: llama {\n  hidden_size 128\n  layers 2\n  heads 4\n  kv_heads 2\n  intermediate_size 176\n  vocab_size 512\n  max_positions 256\n}\n");
  const { code, stderr } = await run(spec, "--base", model, "--tokens", "1,2");
  assert.is(code, 4, "a checkpoint error");
  const config = join(model, "config.json");
  assert.equal(problems(stderr), [
    `milora run: base other of ${spec} does not match ${model}: hidden_size 128 in the spec, 64 in ${config}; head_dim 32 in the spec, 16 in ${config}`,
  ]);
});

test("user errors are one line without a stack, and their kind's exit status", async () => {
  const missing = await run("--base", join(root, "nowhere"), "--tokens", "1");
  assert.is(missing.code, 2, "a path given that is not there is a usage error");
  assert.not.match(missing.stderr, /\n\s+at /);
  assert.equal(problems(missing.stderr), [`milora run: no model directory ${join(root, "nowhere")}`]);
  const usage = await run("--base", model, "--tokens", "1,x");
  assert.is(usage.code, 2);
  assert.equal(problems(usage.stderr), ['milora run: --tokens must be comma-separated token ids, got "x"']);
});

const tinySpec = new URL("../../../examples/llama-tiny.milora", import.meta.url).pathname;
const specAdapter = (name: string) => checkFiles([tinySpec]).program.adapters.find((a) => a.name === name)!;

/** ||got - want|| / ||want|| over every row. */
function relativeError(got: readonly number[][], want: readonly Float64Array[]): number {
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => row.forEach((w, i) => ((diff += (got[r]![i]! - w) ** 2), (norm += w * w))));
  return Math.sqrt(diff / norm);
}

test("with no spec, a plain PEFT adapter runs as LoRA: --json --logits all matches the reference", async () => {
  const dir = join(root, "peft");
  const { base, weights } = loadReferenceWeights(model);
  const adapter = writeRandomPeftAdapter(dir, { base, modules: ["q_proj", "up_proj"], rank: 8, alpha: 16, seed: 5 });
  const prompt = [1, 72, 101, 108];
  const { code, stdout, stderr } = await run("--base", model, "--adapter", dir, "--tokens", prompt.join(","), "--max-tokens", "0", "--json", "--logits", "all");
  assert.is(code, 0, stderr);
  const out = JSON.parse(stdout) as { adapter: string; logits: number[][]; routing?: unknown };
  assert.is(out.adapter, "peft");
  assert.is(out.routing, undefined);
  const err = relativeError(out.logits, referenceMiloraLogits(base, weights, adapter, prompt).logits);
  assert.ok(err < 1e-4, `relative error ${err}`);
});

test("two tenants of a spec's MiLoRA adapter: each one's prompt routing per layer, in text and in --json", async () => {
  const [a, b] = ["alice", "bob"].map((who, i) => {
    const dir = join(root, who);
    return { dir, adapter: writeRandomAdapter(dir, { spec: specAdapter("tiny"), seed: 20 + i }) };
  });
  const { base, weights } = loadReferenceWeights(model);
  const prompt = [1, 72, 101, 108, 108, 111];
  const args = [tinySpec, "--base", model, "--adapter", `tiny=${a!.dir}`, "--adapter", `tiny=${b!.dir}`, "--tokens", prompt.join(","), "--max-tokens", "3"];
  const json = await run(...args, "--json");
  assert.is(json.code, 0, json.stderr);
  const lines = json.stdout.trim().split("\n").map((l) => JSON.parse(l) as { adapter: string; routing: { layer: number; experts: Record<string, number> }[] });
  assert.equal(lines.map((l) => l.adapter), ["tiny:alice", "tiny:bob"]);
  lines.forEach((line, i) => {
    const want = referenceMiloraLogits(base, weights, [a, b][i]!.adapter, prompt).routing;
    assert.equal(line.routing.map((d) => [d.layer, Object.keys(d.experts)]), want.map((d) => [d.layer, Object.keys(d.experts)]));
    for (const d of line.routing) assert.ok(Object.keys(d.experts).every((m) => (EXPERT_MODULES as readonly string[]).includes(m)));
  });
  const text = await run(...args);
  assert.is(text.code, 0, text.stderr);
  const first = lines[0]!.routing[0]!;
  const shown = Object.entries(first.experts).map(([m, g]) => `${m} ${g.toFixed(2)}`).join("  ");
  assert.ok(text.stderr.includes(`layer 0   ${shown}`), text.stderr);
});

test("--merged decodes the base with the LoRA folded in for the prompt's routing: same tokens as unmerged", async () => {
  const dir = join(root, "merged");
  writeRandomAdapter(dir, { spec: specAdapter("tiny"), seed: 30 });
  const args = [tinySpec, "--base", model, "--adapter", `tiny=${dir}`, "--tokens", "1,72,101", "--max-tokens", "6", "--json"];
  const [unmerged, merged] = await Promise.all([run(...args), run(...args, "--merged")]);
  assert.is(merged.code, 0, merged.stderr);
  const parse = (s: string) => JSON.parse(s) as { tokens: number[]; routing: unknown };
  assert.equal(parse(merged.stdout).tokens, parse(unmerged.stdout).tokens);
  assert.equal(parse(merged.stdout).routing, parse(unmerged.stdout).routing);
});

test("adapter errors: an adapter that does not match its spec names the tensor and both shapes", async () => {
  const dir = join(root, "token-tenant");
  writeRandomAdapter(dir, { spec: specAdapter("tiny"), seed: 40 });
  const wrong = await run(tinySpec, "--base", model, "--adapter", `tiny_lora=${dir}`, "--tokens", "1");
  assert.is(wrong.code, 4, "a checkpoint error");
  assert.match(wrong.stderr, /unexpected tensor "base_model\.model\.model\.layers\.0\.milora_router\.weight" \[7, 64\]/);
  const which = await run(tinySpec, "--base", model, "--adapter", dir, "--tokens", "1");
  assert.is(which.code, 2);
  assert.equal(problems(which.stderr), [`milora run: ${tinySpec} declares 3 adapters (tiny, tiny_token, tiny_lora): say which with --adapter NAME=${dir}`]);
});

test.run();
