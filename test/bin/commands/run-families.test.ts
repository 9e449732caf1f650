// `milora run --base DIR` on a directory laid out as the Hugging Face hub ships each family (config.json,
// sharded safetensors with an index, tokenizer.json, tokenizer_config.json, generation_config.json):
// the logits of every prompt position and the greedy tokens against the float64 reference.
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { writeRandomCheckpoint, type RandomCheckpointOptions } from "../../../examples/random-checkpoint.ts";
import { INDEX_FILE } from "../../../runtime/formats/checkpoint.ts";
import { loadReferenceWeights, referenceGreedy, referenceLogits } from "../../reference/llama.ts";

const root = mkdtempSync(join(tmpdir(), "milora-run-families-"));
const milora = new URL("../../../bin/milora.js", import.meta.url).pathname;
test.after(() => rmSync(root, { recursive: true, force: true }));

// a vocabulary the tiny tokenizer can fill (259 fixed tokens plus merges)
const SIZES = { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 64, vocabSize: 300, maxPositions: 64, shards: 3, tokenizer: true } as const;
const PROMPT = [1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100];

async function runsLikeReference(name: string, options: Partial<RandomCheckpointOptions>) {
  const dir = join(root, name);
  writeRandomCheckpoint(dir, { ...SIZES, seed: 21, ...options });
  for (const file of ["config.json", INDEX_FILE, "tokenizer.json", "tokenizer_config.json", "generation_config.json"]) assert.ok(existsSync(join(dir, file)), file);
  const args = [milora, "run", "--base", dir, "--tokens", PROMPT.join(","), "--max-tokens", "4", "--json", "--logits", "all"];
  const { stdout } = await promisify(execFile)(process.execPath, args, { timeout: 120_000 });
  const out = JSON.parse(stdout) as { tokens: number[]; logits: number[][] };
  const { base, weights } = loadReferenceWeights(dir);
  assert.is(base.family, options.family);
  // stops early only at generation_config's end-of-sequence token
  assert.equal(out.tokens, referenceGreedy(base, weights, PROMPT, 4).slice(0, out.tokens.length));
  assert.ok(out.tokens.length === 4 || out.tokens.at(-1) === 2);
  const want = referenceLogits(base, weights, PROMPT);
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => row.forEach((w, i) => ((diff += (out.logits[r]![i]! - w) ** 2), (norm += w * w))));
  assert.ok(Math.sqrt(diff / norm) < 1e-4, `${name}: logits relative error ${Math.sqrt(diff / norm)}`);
}

test("mistral with a sliding window shorter than the prompt", () => runsLikeReference("mistral", { family: "mistral", slidingWindow: 6 }));
test("qwen2 with q/k/v biases and tied embeddings", () => runsLikeReference("qwen2", { family: "qwen2", tieEmbeddings: true }));
test("gemma with one kv head, tied embeddings, stored as BF16", () => runsLikeReference("gemma", { family: "gemma", kvHeads: 1, tieEmbeddings: true, dtype: "BF16" }));

test.run();
