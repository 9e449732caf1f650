// `milora run --beams N` end to end: a child process on a tiny random checkpoint, against the float64
// beam search over the reference model (Hugging Face's semantics, test/reference/beam.ts).
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { PRESETS, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { Tokenizer } from "../../../runtime/text/tokenizer.ts";
import { referenceBeamSearch, referenceNextLogprobs } from "../../reference/beam.ts";
import { loadReferenceWeights } from "../../reference/llama.ts";

const root = mkdtempSync(join(tmpdir(), "milora-run-beams-"));
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

const problems = (stderr: string) => stderr.split("\n").filter((l) => l.startsWith("milora"));

test("--beams 3 --num-return-sequences 3 --json: the reference's hypotheses and scores; the text form lists them", async () => {
  const prompt = [1, 72, 101, 108];
  const args = ["--base", model, "--tokens", prompt.join(","), "--max-tokens", "5", "--beams", "3", "--num-return-sequences", "3", "--length-penalty", "0.5"];
  const { code, stdout, stderr } = await run(...args, "--json");
  assert.is(code, 0, stderr);
  const out = JSON.parse(stdout) as { tokens: number[]; score: number; beams: { tokens: number[]; score: number; text: string }[] };
  const { base, weights } = loadReferenceWeights(model);
  const eos = (await Tokenizer.load(model))!.eosIds;
  const want = referenceBeamSearch(referenceNextLogprobs(base, weights), prompt, { numBeams: 3, maxNewTokens: 5, eos, lengthPenalty: 0.5, numReturnSequences: 3 });
  assert.equal(out.beams.map((b) => b.tokens), want.map((b) => b.tokens));
  assert.equal(out.tokens, want[0]!.tokens);
  // f32 log-probabilities on the device against float64 (see test/runtime/beam-search.test.ts).
  out.beams.forEach((b, i) => assert.ok(Math.abs(b.score - want[i]!.score) < 1e-3, `${b.score} vs ${want[i]!.score}`));
  assert.is(out.score, out.beams[0]!.score);
  const text = await run(...args);
  assert.is(text.code, 0, text.stderr);
  assert.is(text.stdout.trim().split("\n").length, 3);
  assert.match(text.stderr, /beam {5}best score -?\d+\.\d{4}/);
});

test("beam usage mistakes are exit 2 with a message", async () => {
  const base = ["--base", model, "--tokens", "1,5", "--max-tokens", "3"];
  for (const [args, message] of [
    [["--beams", "0"], /--beams must be an integer from 1/],
    [["--beams", "2", "--num-return-sequences", "3"], /--num-return-sequences must be an integer from 1 to the beam width 2/],
    [["--beams", "2", "--temperature", "0.7"], /leave --temperature out/],
    [["--length-penalty", "2"], /need --beams N/],
    [["--beams", "2", "--length-penalty", "x"], /--length-penalty must be a number/],
  ] as const) {
    const { code, stderr } = await run(...base, ...args);
    assert.is(code, 2, `${args.join(" ")}: ${stderr}`);
    assert.match(problems(stderr).join("\n"), message);
  }
});

test.run();
