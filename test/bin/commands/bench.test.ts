// `milora bench` end to end as a user runs it, on the tiny random model: a short calibration written
// where run and serve look for it, a short comparison in JSON that plans with it, and the refusals.
// Timings are never asserted (other jobs share the machine): only that each figure was measured.
import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { benchCommand, type BenchOptions } from "../../../bin/commands/bench.ts";
import { readCalibration } from "../../../bin/measure/calibration.ts";
import { MODE_NAMES, defaultModeNames, standardModes } from "../../../bin/measure/comparison.ts";
import { randomModelDir, randomModelOptions } from "../../../bin/measure/random-model.ts";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { EXPERT_MODULES, FFN_MODULES, type Adapter } from "../../../compiler/model.ts";
import { peftSpec } from "../../../examples/random-adapter.ts";
import { MiloraError } from "../../../runtime/errors.ts";

const root = mkdtempSync(join(tmpdir(), "milora-bench-"));
const cache = join(root, "cache");
const milora = new URL("../../../bin/milora.js", import.meta.url).pathname;
// random models and calibrations go under the cache: this test's own, here and in the commands it runs
// uvu imports every suite before running any, so the variable is set per suite, not at import
let savedCache: string | undefined;
test.before(() => {
  savedCache = process.env.XDG_CACHE_HOME;
  process.env.XDG_CACHE_HOME = cache;
});
test.after(() => {
  if (savedCache === undefined) delete process.env.XDG_CACHE_HOME;
  else process.env.XDG_CACHE_HOME = savedCache;
  rmSync(root, { recursive: true, force: true });
});

async function bench(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [milora, "bench", ...args], { timeout: 120_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code?: number; stdout: string; stderr: string };
    return { code: err.code ?? -1, stdout: err.stdout, stderr: err.stderr };
  }
}

/** milora's own lines of stderr (Dawn prints warnings of its own). */
const said = (stderr: string) => stderr.split("\n").filter((l) => l.startsWith("milora"));

test("--calibrate times each format at the rows asked and writes the device's file, which the comparison then plans with", async () => {
  const { code, stdout, stderr } = await bench("--random", "tiny", "--calibrate", "--weights", "f32,q8", "--rows", "1,8,32", "--repeats", "1", "--json");
  assert.is(code, 0, stderr);
  const out = JSON.parse(stdout) as { file: string };
  const dir = join(cache, "milora", "calibration");
  assert.equal(readdirSync(dir), [out.file.slice(dir.length + 1)], "one file, the device's default");
  const calibration = readCalibration(out.file);
  assert.equal(calibration.formats.map((f) => f.weights), ["f32", "q8"]);
  for (const f of calibration.formats) {
    assert.equal(f.timings.map((t) => t.rows), [1, 8, 32]);
    assert.ok(f.timings.every((t) => t.matvecUs > 0 && t.matmulUs > 0), JSON.stringify(f.timings));
    assert.ok(f.matvecMaxRows >= 1 && f.matvecMaxRows <= 32, `crossover ${f.matvecMaxRows}`);
  }

  // Give q8 a limit no measurement would give, to see the comparison's plan take the file's figure.
  const edited = { ...calibration, formats: calibration.formats.map((f) => (f.weights === "q8" ? { ...f, matvecMaxRows: 3 } : f)) };
  writeFileSync(out.file, JSON.stringify(edited));
  const run = await bench("--random", "tiny", "--weights", "f32,q8", "--tenants", "1,2", "--beams", "1,2", "--modes", "base,milora,dora", "--prompt", "4", "--decode", "2", "--repeats", "1", "--json");
  assert.is(run.code, 0, run.stderr);
  const result = JSON.parse(run.stdout) as { device: string; calibration: string; rows: Record<string, number | string>[] };
  assert.is(result.device, calibration.device);
  assert.is(result.calibration, out.file);
  const key = (r: Record<string, unknown>) => `${r.weights} ${r.tenants} ${r.beams} ${r.mode}`;
  const want = ["f32", "q8"].flatMap((w) => [1, 2].flatMap((t) => [1, 2].flatMap((b) => ["base", "milora", "dora"].map((m) => `${w} ${t} ${b} ${m}`))));
  assert.equal(result.rows.map(key), want);
  for (const r of result.rows) {
    assert.is(r.matvecMaxRows, r.weights === "q8" ? 3 : calibration.formats[0]!.matvecMaxRows, key(r));
    for (const figure of ["decodeMsPerToken", "tokensPerS", "prefillTokensPerS", "peakBytes"]) assert.ok((r[figure] as number) > 0, `${key(r)} ${figure} ${r[figure]}`);
    assert.ok(Number.isFinite(r.decodeVsBase) && Number.isFinite(r.tokensPerSVsOneTenant) && Number.isFinite(r.decodeVsF32), key(r));
    if (r.mode === "base") assert.is(r.decodeVsBase, 1);
    if (r.weights === "f32") assert.is(r.decodeVsF32, 1);
  }
});

test("the text table names the device and each group, and a figure per mode", async () => {
  const { code, stdout, stderr } = await bench("--random", "tiny", "--weights", "f16", "--tenants", "1", "--beams", "1", "--modes", "base,merged,token", "--prompt", "4", "--decode", "2", "--repeats", "1");
  assert.is(code, 0, stderr);
  assert.match(stdout, /^device: .+\((vulkan|metal|d3d12|opengles), /m);
  assert.match(stdout, /^f16 weights, 1 tenant, beam 1 \(matvec up to \d+ rows\)$/m);
  for (const label of ["base alone", "merged LoRA", "per-token router"]) assert.match(stdout, new RegExp(`^  ${label} +\\d+\\.\\d\\d +1\\.00x|^  ${label} +\\d+\\.\\d\\d +\\d+\\.\\d\\dx`, "m"));
});

test("a damaged calibration file is an error naming it, exit 3", async () => {
  const bad = join(root, "bad.json");
  writeFileSync(bad, '{"version": 1}');
  const { code, stderr } = await bench("--random", "tiny", "--calibration", bad, "--modes", "base", "--weights", "f32", "--tenants", "1", "--beams", "1");
  assert.is(code, 3, stderr);
  assert.equal(said(stderr), [`milora bench: ${bad} is not a milora calibration: "device" must be a string (run \`milora bench --calibrate\` again, or delete it)`]);
});

test("the per-token baselines run on their own engines, each row with its own peak, and say their shapes", async () => {
  const run = await bench("--random", "tiny", "--weights", "f32", "--tenants", "1,2", "--beams", "1,2", "--modes", "lora,milora,moelora,mixlora", "--prompt", "4", "--decode", "2", "--repeats", "1", "--json");
  assert.is(run.code, 0, run.stderr);
  const engines = said(run.stderr).filter((l) => l.includes("loaded"));
  assert.is(engines.length, 6, "a plain, a per_module and a per_ffn engine per tenant count");
  assert.ok(engines.some((l) => l.includes("engine for per_module (8 experts, top_k 4 renormalize) routing")), engines.join("\n"));
  const result = JSON.parse(run.stdout) as { moelora: string; mixlora: string; rows: Record<string, number | string>[] };
  assert.is(result.moelora, "per_module: rank 8 split into 8 experts of rank 1 per module, top_k 4 renormalize per token");
  assert.is(result.mixlora, "per_ffn: attention plain LoRA rank 8, MLP 8 experts of rank 1 per layer, top_k 2 renormalize per token");
  assert.is(result.rows.length, 2 * 2 * 4);
  for (const r of result.rows) {
    for (const figure of ["decodeMsPerToken", "tokensPerS", "prefillTokensPerS", "peakBytes", "adapterLoadMs"]) assert.ok((r[figure] as number) > 0, `${r.mode} ${figure} ${r[figure]}`);
    // one engine's weights (tiny: 2.3 MiB), not three engines'
    assert.ok((r.peakBytes as number) < 5 * 2 ** 20, `${r.mode} peak ${r.peakBytes}`);
  }
});

test("the baselines' shapes follow the spec's ranks: R = r rounded up to a multiple of 8, per_ffn's MLP experts of rank R / 8", () => {
  const base = readHfConfig(randomModelDir(randomModelOptions("tiny")));
  const spec: Adapter = { ...peftSpec({ base, modules: EXPERT_MODULES, rank: 12, alpha: 24, seed: 0, name: "s" }) };
  const [lora, moelora, mixlora] = standardModes(spec, ["lora", "moelora", "mixlora"]).map((m) => m.spec!);
  assert.ok(lora!.experts.every((e) => e.rank === 12 && e.scaling === 2) && !lora!.moe);
  assert.equal(moelora!.moe?.placement, "per_module");
  assert.ok(moelora!.experts.every((e) => e.rank === 16 && e.alpha === 32 && e.scaling === 2), "rank 16 split 8 ways, alpha / rank kept");
  assert.equal(mixlora!.moe?.placement, "per_ffn");
  for (const e of mixlora!.experts) assert.is(e.rank, FFN_MODULES.includes(e.module) ? 2 : 12, e.module);
  // a spec that is a baseline runs as itself in its mode, and as the LoRA of the same parameters in the others
  const own: Adapter = { ...mixlora!, name: "own" };
  const [asLora, asMix] = standardModes(own, ["lora", "mixlora"]).map((m) => m.spec!);
  assert.is(asMix!.name, "own");
  assert.equal(asMix!.experts, own.experts);
  for (const e of asLora!.experts) assert.is(e.rank, FFN_MODULES.includes(e.module) ? 16 : 12, e.module);
  // no MLP LoRA: no MixLoRA-style mode
  const attention: Adapter = peftSpec({ base, modules: ["q_proj", "v_proj"], rank: 8, alpha: 16, seed: 0, name: "att" });
  try {
    standardModes(attention, ["mixlora"]);
    assert.unreachable("taken");
  } catch (e) {
    assert.ok(e instanceof MiloraError && e.kind === "usage", String(e));
    assert.is(e.message, "--modes mixlora: adapter att has no LoRA on gate_proj, up_proj, down_proj, where MixLoRA's experts live");
  }
  // without --modes: every mode the adapter has
  assert.equal(defaultModeNames(attention), ["base", "merged", "lora", "milora", "token", "moelora", "dora"]);
  assert.equal(defaultModeNames(peftSpec({ base, modules: ["q_proj", "down_proj"], rank: 8, alpha: 16, seed: 0, name: "mlp" })), [...MODE_NAMES]);
});

const defaults = { weights: "f32,f16,q8,q4", tenants: "1,8,16", beams: "1,3", prompt: "32", decode: "16", repeats: "2" };

test("usage errors name the flag, before any GPU work", async () => {
  const cases: [Partial<BenchOptions>, string][] = [
    [{}, "give the model: --base DIR (a Hugging Face directory) or --random SIZE (tiny, small)"],
    [{ random: "tiny", base: root }, "give the model: --base DIR (a Hugging Face directory) or --random SIZE (tiny, small)"],
    [{ base: join(root, "nothing") }, `no model directory ${join(root, "nothing")}`],
    [{ random: "tiny", adapter: "a" }, "--adapter names an adapter of the spec: give the spec too"],
    [{ random: "tiny", modes: "base,moe" }, `--modes: "moe" must be one of base, merged, lora, milora, token, moelora, mixlora, dora (a comma-separated list)`],
    [{ random: "tiny", modes: "base,base" }, "--modes: base,base names an item twice"],
    [{ random: "tiny", weights: "q2" }, `--weights: "q2" must be one of f32, f16, q8, q4 (a comma-separated list)`],
    [{ random: "tiny", tenants: "1,0" }, `--tenants: "0" must be a whole number >= 1 (a comma-separated list)`],
    [{ random: "tiny", repeats: "two" }, `--repeats must be a whole number >= 1, got "two"`],
    [{ random: "tiny", decode: "300" }, "--prompt 32 and --decode 300 need 334 positions, more than the base's 256"],
    [{ random: "tiny", rows: "1,8" }, "--rows is for --calibrate"],
    [{ random: "tiny", calibrate: true, rows: "8,4" }, "--rows must ascend, got 8,4"],
  ];
  for (const [opts, message] of cases) {
    try {
      await benchCommand(undefined, { ...defaults, ...opts });
      assert.unreachable(`${JSON.stringify(opts)} was taken`);
    } catch (e) {
      assert.ok(e instanceof MiloraError && e.kind === "usage", String(e));
      assert.is(e.message, message);
    }
  }
  // and on the command line: one line, exit 2
  const { code, stderr } = await bench("--random", "tiny", "--weights", "q2");
  assert.is(code, 2, stderr);
  assert.equal(said(stderr), [`milora bench: --weights: "q2" must be one of f32, f16, q8, q4 (a comma-separated list)`]);
});

test.run();
