// Loading compiled packages: the engine runs the WGSL of the package's files, incompatible or damaged packages
// are refused with a message naming the file, and a package run by plain `node` gives the same tokens
// as `milora run` on the same checkpoint, prompt and seed.
import { spawnSync } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles } from "../../../compiler/check.ts";
import { compilePackage } from "../../../compiler/emit/compile-package.ts";
import { writePackage } from "../../../compiler/emit/write-package.ts";
import { kernelSources, type Plan } from "../../../compiler/plan.ts";
import { writeRandomAdapter } from "../../../examples/random-adapter.ts";
import { PRESETS, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { Engine, EngineError } from "../../../runtime/engine/engine.ts";
import { loadCompiledModel, PackageError, readCompiledPackage } from "../../../runtime/package/loader.ts";
import { CheckpointError } from "../../../runtime/formats/safetensors.ts";
import { AdapterStoreError } from "../../../runtime/engine/tenants.ts";
import { buildRuntime, packageProject, repo } from "../../compiler/emit/package-project.ts";
import { plannedEngine } from "../../../bin/engine-plan.ts";

const project = packageProject("milora-package-");
const checkpoint = join(project.root, "tiny-model");
let gpu: GpuContext;

/** Compiles an adapter of examples/llama-tiny.milora into the project; returns the package folder. */
function compileTiny(adapter: string, folder = adapter): string {
  const dir = join(project.root, folder);
  writePackage(dir, compilePackage({ spec: "examples/llama-tiny.milora", adapter }).package!.files, { force: true });
  return dir;
}

async function rejects(run: () => Promise<unknown>, kind: new (...a: never[]) => Error, message: RegExp | string) {
  try {
    await run();
    assert.unreachable("no error");
  } catch (e) {
    assert.instance(e, kind);
    assert.match((e as Error).message, message);
  }
}

test.before(async () => {
  buildRuntime();
  writeRandomCheckpoint(checkpoint, { ...PRESETS.tiny, seed: 11 });
  gpu = await acquireDevice();
});
test.after(() => {
  gpu.destroy();
  project.remove();
});

test("a package's kernels are read from its kernels/ files, header removed", () => {
  const dir = compileTiny("tiny");
  const pkg = readCompiledPackage(dir);
  // The manifest's plan is the planner's, written as JSON: its kernels' constants are the generators'.
  const generated = kernelSources(pkg.manifest.plan as Plan);
  assert.equal([...pkg.kernels.keys()], [...generated.keys()]);
  for (const [key, k] of pkg.kernels) {
    assert.is(k.wgsl, generated.get(key)!.wgsl, key);
    // The interface comes from the manifest, as data, equal to the generator's.
    const { wgsl: _w, ...fromManifest } = k;
    const { wgsl: _g, ...fromGenerator } = generated.get(key)!;
    assert.equal(fromManifest, fromGenerator, key);
  }
});

test("the engine runs the package's kernel files: a hand-edited sampler is the one that samples", async () => {
  const dir = compileTiny("tiny", "tuned");
  const { file } = readCompiledPackage(dir).manifest.kernels.find((k) => k.key.startsWith("sampling("))!;
  const path = join(dir, file);
  const original = readFileSync(path, "utf8");
  const greedyWrite = "if (lid == 0u) { tokens[row] = argmax; }";
  assert.ok(original.includes(greedyWrite), `${file} has no greedy write to edit`);
  // An edit the output shows: greedy decoding now always picks token 7.
  writeFileSync(path, original.replace(greedyWrite, "if (lid == 0u) { tokens[row] = 7u; }"));
  const model = await loadCompiledModel(dir, { base: checkpoint, adapters: {}, device: gpu });
  try {
    const tokens: number[] = [];
    for await (const token of model.generate([5, 17, 3], { maxTokens: 4, temperature: 0, stop: [] })) tokens.push(token.id);
    assert.equal(tokens, [7, 7, 7, 7]);
  } finally {
    model.destroy();
  }
});

test("a manifest from an incompatible compiler is refused with what to do", async () => {
  const dir = compileTiny("tiny", "old");
  const path = join(dir, "manifest.json");
  const manifest = JSON.parse(readFileSync(path, "utf8"));
  writeFileSync(path, JSON.stringify({ ...manifest, compiler: { name: "milora", version: "0.2.0" } }));
  await rejects(
    () => loadCompiledModel(dir, { base: checkpoint, adapters: {}, device: gpu }),
    PackageError,
    /manifest\.json was written by milora 0\.2\.0 .*this runtime is milora 0\.1\.0 .*recompile the spec/,
  );
});

test("a folder that is not a package, or has lost a kernel, is named in the error", () => {
  assert.throws(() => readCompiledPackage(checkpoint), (e: Error) => e instanceof PackageError && /tiny-model is not a compiled milora package: it has no manifest\.json/.test(e.message));
  const dir = compileTiny("tiny", "damaged");
  const { file } = readCompiledPackage(dir).manifest.kernels[2]!;
  rmSync(join(dir, file));
  assert.throws(() => readCompiledPackage(dir), (e: Error) => e instanceof PackageError && e.message.includes(`is incomplete: ${file}`));
  // a kernel path that is there but cannot be read as a file
  mkdirSync(join(dir, file));
  assert.throws(() => readCompiledPackage(dir), (e: Error) => e instanceof PackageError && e.message.includes(`${file} (kernel `) && e.message.includes("cannot be read"));
  writeFileSync(join(dir, "manifest.json"), "{ not json");
  assert.throws(() => readCompiledPackage(dir), (e: Error) => e instanceof PackageError && e.message.includes("manifest.json: not valid JSON"));
});

test("plain node runs the compiled package, and milora run of it, give milora run's tokens for the spec", () => {
  compileTiny("tiny");
  const args = ["--base", checkpoint, "--tokens", "5,17,3,88,42", "--max-tokens", "12", "--temperature", "0.8", "--top-k", "40", "--seed", "9", "--json"];
  const node = (cliArgs: string[]) => {
    const run = spawnSync(process.execPath, cliArgs, { cwd: project.root, encoding: "utf8" });
    assert.is(run.status, 0, run.stderr);
    return JSON.parse(run.stdout) as { tokens: number[]; text?: string };
  };
  // no tsx here: the package's cli.js imports the built runtime through node_modules/milora
  const packaged = node([join(project.root, "tiny/cli.js"), ...args]);
  const direct = node([join(repo, "bin/milora.js"), "run", join(repo, "examples/llama-tiny.milora"), ...args]);
  // milora run of the package itself runs its plan and kernel files
  const ranPackage = node([join(repo, "bin/milora.js"), "run", join(project.root, "tiny"), ...args]);
  assert.is(packaged.tokens.length, 12);
  assert.equal(packaged.tokens, direct.tokens);
  assert.equal(ranPackage.tokens, direct.tokens);
  assert.is(packaged.text, direct.text);
});

test("tenants: adapters are checked against the spec and generate as the engine does with them", async () => {
  const dir = compileTiny("tiny_lora");
  const adapters = checkFiles(["examples/llama-tiny.milora"]).program.adapters;
  const spec = adapters.find((a) => a.name === "tiny_lora")!;
  writeRandomAdapter(join(project.root, "alice"), { spec, seed: 3 });
  writeRandomAdapter(join(project.root, "mallory"), { spec: adapters.find((a) => a.name === "tiny")!, seed: 4 });

  await rejects(
    () => loadCompiledModel(dir, { base: checkpoint, adapters: { mallory: join(project.root, "mallory") }, device: gpu }),
    CheckpointError,
    "does not match adapter spec tiny_lora",
  );
  const model = await loadCompiledModel(dir, { base: checkpoint, adapters: { alice: join(project.root, "alice") }, device: gpu });
  const engine = await Engine.load(plannedEngine({ base: spec.base, checkpointDir: checkpoint, gpu, ctx: 256, maxLoraRank: 4 }));
  try {
    const routing = await model.route([1, 2, 3], { tenant: "alice" });
    assert.equal(routing.map((r) => r.layer), [0, 1]);
    assert.equal(routing[1]!.gates, { q_proj: 1, k_proj: 1, v_proj: 1, o_proj: 1, gate_proj: 1, up_proj: 1, down_proj: 1 });
    await rejects(() => model.route([1], { tenant: "bob" as "alice" }), AdapterStoreError, "no tenant bob: the loaded tenants are alice");

    const sampling = { temperature: 0.7, seed: 5 };
    const tokens: number[] = [];
    for await (const token of model.generate([4, 8, 15, 16], { tenant: "alice", maxTokens: 6, stop: [], ...sampling })) tokens.push(token.id);
    engine.loadAdapter("alice", join(project.root, "alice"), { spec });
    const direct = await engine.generate({ prompt: [4, 8, 15, 16], maxTokens: 6, sampling, adapter: "alice" });
    assert.equal(tokens, direct.tokens);

    // Tokens stream as their steps end; leaving after the first ends the generation and frees its
    // sequence, so more generations than the engine has sequences still start.
    for (let i = 0; i < 6; i++) {
      for await (const token of model.generate([4, 8, 15, 16], { tenant: "alice", maxTokens: 200, stop: [], ...sampling })) {
        assert.is(token.id, tokens[0]);
        break;
      }
    }
  } finally {
    engine.destroy();
    model.destroy();
  }
});

test("route() of a MiLoRA package: per layer, a gate for every enabled module, top_k of them on at their softmax probabilities", async () => {
  const dir = compileTiny("tiny");
  const spec = checkFiles(["examples/llama-tiny.milora"]).program.adapters.find((a) => a.name === "tiny")!;
  writeRandomAdapter(join(project.root, "carol"), { spec, seed: 8 });
  const model = await loadCompiledModel(dir, { base: checkpoint, adapters: { carol: join(project.root, "carol") }, device: gpu });
  try {
    const routing = await model.route([9, 8, 7, 6, 5], { tenant: "carol" });
    assert.equal(routing.map((r) => r.layer), [0, 1]);
    for (const { gates } of routing) {
      assert.equal(Object.keys(gates), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
      const on = Object.values(gates).filter((g) => g > 0);
      assert.is(on.length, 2);
      // The paper's gates (eq. 3): the two largest of seven probabilities, so their sum lies in [2/7, 1).
      assert.ok(on[0]! + on[1]! >= 2 / 7 - 1e-6 && on[0]! + on[1]! < 1, `gates ${on} are not two of seven softmax probabilities`);
    }
  } finally {
    model.destroy();
  }
});

test("a MiLoRA package routes with its router kernel files: a missing one is refused, an edited one is what runs", async () => {
  const dir = compileTiny("tiny", "hand-routed");
  const pkg = readCompiledPackage(dir);
  const gate = pkg.manifest.kernels.find((k) => k.key.startsWith("router_gate("))!;
  assert.ok(pkg.manifest.kernels.some((k) => k.key.startsWith("router_pool(")), "no router_pool kernel in the package");

  // Without the gate's WGSL the engine stops at load instead of generating it.
  const kernels = new Map(pkg.kernels);
  kernels.delete(gate.key);
  await rejects(() => Engine.load({ base: pkg.base, checkpointDir: checkpoint, gpu, plan: pkg.manifest.plan, kernels }), EngineError, `no WGSL was given for kernel ${gate.key}`);

  // An edited gate file that always puts the whole gate on expert 0 (q_proj) decides every route.
  const path = join(dir, gate.file);
  const original = readFileSync(path, "utf8");
  const choice = "columnGate[c] = select(0.0, prob[min(e, E - 1u)], e < E && chosen[min(e, E - 1u)]);";
  assert.ok(original.includes(choice), `${gate.file} has no gate choice to edit`);
  writeFileSync(path, original.replace(choice, "columnGate[c] = select(0.0, 1.0, e == 0u);"));
  const spec = checkFiles(["examples/llama-tiny.milora"]).program.adapters.find((a) => a.name === "tiny")!;
  writeRandomAdapter(join(project.root, "dave"), { spec, seed: 12 });
  const model = await loadCompiledModel(dir, { base: checkpoint, adapters: { dave: join(project.root, "dave") }, device: gpu });
  try {
    const routing = await model.route([9, 8, 7, 6, 5], { tenant: "dave" });
    const onlyQ = { q_proj: 1, k_proj: 0, v_proj: 0, o_proj: 0, gate_proj: 0, up_proj: 0, down_proj: 0 };
    assert.equal(routing, [{ layer: 0, gates: onlyQ }, { layer: 1, gates: onlyQ }]);
  } finally {
    model.destroy();
  }
});

test.run();
