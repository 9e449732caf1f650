// Where the calibration of `milora bench --calibrate` is used: `milora compile --calibration FILE`
// bakes its row limit (for the package's weight format) into the plan; `milora run` and `milora serve`
// read the device's default file, and a damaged one stops them with its name before any weight loads.
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { CALIBRATION_VERSION, defaultCalibrationFile, writeCalibration, type Calibration } from "../../../bin/measure/calibration.ts";
import { modelSource, planOptions } from "../../../bin/commands/model-source.ts";
import { PRESETS, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";

const root = mkdtempSync(join(tmpdir(), "milora-calibration-use-"));
const cache = join(root, "cache");
const model = join(root, "tiny");
writeRandomCheckpoint(model, PRESETS.tiny);
test.after(() => rmSync(root, { recursive: true, force: true }));

const MILORA = new URL("../../../bin/milora.js", import.meta.url).pathname;
const TINY = new URL("../../../examples/llama-tiny.milora", import.meta.url).pathname;
const env = { ...process.env, XDG_CACHE_HOME: cache };

function milora(...args: string[]) {
  const run = spawnSync(process.execPath, [MILORA, ...args], { encoding: "utf8", env, timeout: 60_000 });
  return { code: run.status, stdout: run.stdout, stderr: run.stderr };
}

/** milora's own lines of stderr (Dawn prints warnings of its own). */
const said = (stderr: string) => stderr.split("\n").filter((l) => l.startsWith("milora"));

const calibration = (device: string, f32: number, q8: number): Calibration => ({
  version: CALIBRATION_VERSION,
  device,
  measuredAt: "2025-01-01T00:00:00.000Z",
  model: "hidden 64",
  formats: [
    { weights: "f32", matvecMaxRows: f32, bounded: true, timings: [] },
    { weights: "q8", matvecMaxRows: q8, bounded: true, timings: [] },
  ],
});

test("compile --calibration FILE plans the package with the file's limit for the package's weight format", () => {
  const file = join(root, "h200.json");
  writeCalibration(file, calibration("NVIDIA H200 (vulkan, core, hardware)", 12, 5));
  for (const [weights, rows] of [["f32", 12], ["q8", 5], ["f16", 28]] as const) {
    const out = join(root, `package-${weights}`);
    const { code, stderr } = milora("compile", TINY, "--adapter", "tiny", "--out", out, "--weights", weights, "--calibration", file);
    assert.is(code, 0, stderr);
    const manifest = JSON.parse(readFileSync(join(out, "manifest.json"), "utf8")) as { plan: { matvecMaxRows: number } };
    assert.is(manifest.plan.matvecMaxRows, rows, `${weights}${weights === "f16" ? " (not in the file: the default)" : ""}`);
  }
  const bad = join(root, "bad.json");
  writeFileSync(bad, "{}");
  const { code, stderr } = milora("compile", TINY, "--adapter", "tiny", "--out", join(root, "never"), "--calibration", bad);
  assert.is(code, 3, stderr);
  assert.equal(said(stderr), [`milora compile: ${bad} is not a milora calibration: version undefined, this milora reads version 1 (run \`milora bench --calibrate\` again, or delete it)`]);
});

test("run's plan takes the calibration's limit for the format it stores the weights in", () => {
  const source = modelSource(undefined, model);
  const cal = calibration("any", 7, 3);
  assert.is(planOptions(source, { checkpointDir: model, calibration: cal }).plan.matvecMaxRows, 7, "an F32 checkpoint is stored f32");
  assert.is(planOptions(source, { checkpointDir: model, weights: "q8", calibration: cal }).plan.matvecMaxRows, 3);
  assert.is(planOptions(source, { checkpointDir: model }).plan.matvecMaxRows, 28);
});

test("run and serve read this device's default calibration: a damaged one is an error naming it, exit 3", async () => {
  const gpu = await acquireDevice();
  const saved = process.env.XDG_CACHE_HOME;
  process.env.XDG_CACHE_HOME = cache;
  const file = defaultCalibrationFile(gpu.report);
  if (saved === undefined) delete process.env.XDG_CACHE_HOME;
  else process.env.XDG_CACHE_HOME = saved;
  gpu.destroy();
  writeCalibration(file, calibration("another GPU", 12, 5));
  const message = (command: string) => new RegExp(`^milora ${command}: ${file.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} was measured on another GPU, not on this device \\(.+\\): run \`milora bench --calibrate\` here$`);
  const run = milora("run", "--base", model, "--tokens", "1,2,3", "--max-tokens", "1");
  assert.is(run.code, 3, run.stderr);
  assert.is(said(run.stderr).length, 1, run.stderr);
  assert.match(said(run.stderr)[0]!, message("run"));

  const serve = spawn(process.execPath, [MILORA, "serve", "--base", model, "--port", "0"], { env });
  let stderr = "";
  serve.stderr.on("data", (d) => (stderr += d));
  const code = await new Promise<number | null>((resolve) => serve.on("exit", resolve));
  assert.is(code, 3, stderr);
  assert.is(said(stderr).length, 1, stderr);
  assert.match(said(stderr)[0]!, message("serve"));
});

test.run();
