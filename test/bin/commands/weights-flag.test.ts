// `--weights f32|f16|q8|q4` on milora run and compile: the run's logits are float64's on the weights as
// that format stores them (so the flag reaches the plan), a compiled package records the format in its
// plan and refuses another at run time, and a format that is not one is a usage error (exit 2).
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { planBase } from "../../../compiler/plan.ts";
import { PRESETS, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { packWeights, unpackWeights } from "../../../runtime/engine/weight-storage.ts";
import { loadReferenceWeights, referenceLogits, weightsFromMap } from "../../reference/llama.ts";

const root = mkdtempSync(join(tmpdir(), "milora-weights-flag-"));
const model = join(root, "tiny");
writeRandomCheckpoint(model, PRESETS.tiny);
const milora = new URL("../../../bin/milora.js", import.meta.url).pathname;
const spec = new URL("../../../examples/llama-tiny.milora", import.meta.url).pathname;
const PROMPT = [1, 72, 101, 108, 108, 111];

test.after(() => rmSync(root, { recursive: true, force: true }));

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [milora, ...args], { timeout: 120_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code?: number; stdout: string; stderr: string };
    return { code: err.code ?? -1, stdout: err.stdout, stderr: err.stderr };
  }
}

function relativeError(got: readonly number[][], want: readonly Float64Array[]): number {
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => row.forEach((w, i) => ((diff += (got[r]![i]! - w) ** 2), (norm += w * w))));
  return Math.sqrt(diff / norm);
}

for (const format of ["q8", "q4"] as const) {
  test(`milora run --weights ${format}: the logits of float64 on the ${format}-rounded linear weights`, async () => {
    const { code, stdout, stderr } = await cli("run", "--base", model, "--tokens", PROMPT.join(","), "--max-tokens", "0", "--json", "--logits", "all", "--weights", format);
    assert.is(code, 0, stderr);
    const logits = (JSON.parse(stdout) as { logits: number[][] }).logits;
    const { base, weights } = loadReferenceWeights(model);
    const exact = referenceLogits(base, weights, PROMPT);
    // The linear weights and the untied lm_head as the format holds them; the embedding and norms as they are.
    const held = new Map<string, Float64Array>();
    for (const t of planBase(base, { weights: format }).tensors) {
      const w = Float32Array.from(weights.get(t.name));
      held.set(t.name, Float64Array.from(t.gpuDtype === format ? unpackWeights(format, packWeights(format, w, t.shape, t.name), t.shape, t.name) : w));
    }
    assert.ok(relativeError(logits, referenceLogits(base, weightsFromMap(held), PROMPT)) < 1e-4, `against float64 on the ${format} weights`);
    assert.ok(relativeError(logits, exact) > 1e-3, `${format} rounds: the f32 weights' logits are not these`);
  });
}

test("a format that is none is a usage error; a package compiled with --weights f16 refuses q8", async () => {
  const bad = await cli("run", "--base", model, "--tokens", "1,2", "--weights", "q2");
  assert.is(bad.code, 2);
  assert.match(bad.stderr, /--weights must be one of f32, f16, q8, q4, got "q2"/);
  const out = join(root, "pkg");
  const compiled = await cli("compile", spec, "--adapter", "tiny_lora", "--out", out, "--weights", "f16");
  assert.is(compiled.code, 0, compiled.stderr);
  const plan = (JSON.parse(readFileSync(join(out, "manifest.json"), "utf8")) as { plan: { tensors: { role: string; gpuDtype: string }[] } }).plan;
  assert.ok(plan.tensors.every((t) => t.gpuDtype === (t.role === "linear" || t.role === "lm_head" ? "f16" : "f32")));
  const refused = await cli("run", out, "--base", model, "--tokens", "1,2", "--weights", "q8");
  assert.is(refused.code, 2);
  assert.match(refused.stderr, /was compiled with its weights stored as f16: leave out --weights, or recompile it with --weights q8/);
});

test.run();
