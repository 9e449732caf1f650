// `milora run` with the per-token baselines, as users run them: a MixLoRA adapter directory given
// alone (its MIXLORA config says what it is), and a spec's per_module adapter; greedy tokens and
// prompt logits against the float64 reference.
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkSource } from "../../../compiler/check.ts";
import { writeRandomAdapter } from "../../../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { loadReferenceWeights } from "../../reference/llama.ts";
import { referenceMoeGreedy, referenceMoeLogits } from "../../reference/moe-lora.ts";

const root = mkdtempSync(join(tmpdir(), "milora-run-moe-"));
const milora = new URL("../../../bin/milora.js", import.meta.url).pathname;
test.after(() => rmSync(root, { recursive: true, force: true }));

const checkpoint = join(root, "tiny");
writeRandomCheckpoint(checkpoint, { hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 64, vocabSize: 97, maxPositions: 64, seed: 23 });
const { base, weights } = loadReferenceWeights(checkpoint);
const PROMPT = [4, 51, 9, 77, 13, 2, 60, 31];
const specFile = join(root, "baselines.milora");
writeFileSync(
  specFile,
  `base tiny from "tiny/config.json"

// MOELoRA-style: each module's rank-8 LoRA is 4 experts of rank 2, a router per module
adapter moelora on tiny {
  experts all { rank 8 alpha 16 }
  router { placement per_module num_experts 4 select top_k 2 renormalize }
}

// MixLoRA-style: 4 feed-forward experts of rank 4, top 2; attention plain LoRA
adapter mixlora on tiny {
  experts all { rank 4 alpha 8 }
  router { placement per_ffn num_experts 4 select top_k 2 renormalize }
}
`,
);
const { program } = checkSource(`import "${specFile}"`, join(root, "entry.milora"));
const spec = (name: string) => program.adapters.find((a) => a.name === name)!;

async function run(args: readonly string[]): Promise<{ tokens: number[]; logits: number[][] }> {
  const { stdout } = await promisify(execFile)(process.execPath, [milora, "run", ...args, "--tokens", PROMPT.join(","), "--max-tokens", "4", "--json", "--logits", "all"], { timeout: 120_000 });
  return JSON.parse(stdout) as { tokens: number[]; logits: number[][] };
}

function assertLikeReference(out: { tokens: number[]; logits: number[][] }, adapter: LoadedAdapter): void {
  assert.equal(out.tokens, referenceMoeGreedy(base, weights, adapter, PROMPT, 4).tokens);
  const want = referenceMoeLogits(base, weights, adapter, PROMPT).logits;
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => row.forEach((w, i) => ((diff += (out.logits[r]![i]! - w) ** 2), (norm += w * w))));
  assert.ok(Math.sqrt(diff / norm) < 1e-5, `logits relative error ${Math.sqrt(diff / norm)}`);
}

test("a MixLoRA adapter directory alone: its MIXLORA config plans the engine's feed-forward passes", async () => {
  const dir = join(root, "mixlora-adapter");
  const adapter = writeRandomAdapter(dir, { spec: spec("mixlora"), seed: 3 });
  assertLikeReference(await run(["--base", checkpoint, "--adapter", `mix=${dir}`]), adapter);
});

test("a spec's per_module adapter", async () => {
  const dir = join(root, "moelora-adapter");
  const adapter = writeRandomAdapter(dir, { spec: spec("moelora"), seed: 4 });
  assertLikeReference(await run([specFile, "--base", checkpoint, "--adapter", `moelora=${dir}`]), adapter);
});

test.run();
