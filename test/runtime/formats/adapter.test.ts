import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { Adapter, RouterConfig } from "../../../compiler/model.ts";
import { GELU_RATIONAL } from "../../../compiler/rational.ts";
import { peftSpec, randomAdapter, writeRandomAdapter, writeRandomPeftAdapter } from "../../../examples/random-adapter.ts";
import { randomCheckpointBase } from "../../../examples/random-checkpoint.ts";
import { ADAPTER_CONFIG_FILE, loraSlot, specHash } from "../../../runtime/formats/adapter-config.ts";
import { ADAPTER_WEIGHTS_FILE, adapterSpecFromPeft, adapterTensorName, loadAdapter, writeAdapter, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { CheckpointError, SafetensorsFile, writeSafetensors, type TensorToWrite } from "../../../runtime/formats/safetensors.ts";

const root = mkdtempSync(join(tmpdir(), "milora-adapter-"));
test.after(() => rmSync(root, { recursive: true, force: true }));
let dirs = 0;
const freshDir = () => join(root, `a${dirs++}`);

const base = randomCheckpointBase({ hiddenSize: 32, layers: 3, heads: 4, kvHeads: 2, intermediateSize: 48, vocabSize: 64, seed: 1 });
const router: RouterConfig = {
  placement: "per_layer",
  input: "layer_input",
  pooling: "attention",
  selection: { rule: "top_k", k: 2, renormalize: false },
  activation: "rational",
  rational: { numerator: 6, denominator: 5 },
  when: "prompt",
  noise: true,
  balance: 0.01,
};

/** A routed spec that is not a grid: layer 1 lacks k_proj, layer 2 has no experts, down_proj has rank 4 in layer 0. */
function routedSpec(): Adapter {
  const grid = peftSpec({ base, modules: ["q_proj", "k_proj", "v_proj", "down_proj"], rank: 8, alpha: 16, layers: [0, 1], seed: 0, name: "support_bot" });
  const experts = grid.experts
    .filter((e) => !(e.layer === 1 && e.module === "k_proj"))
    .map((e) => (e.layer === 0 && e.module === "down_proj" ? loraSlot(base, 0, "down_proj", { rank: 4, alpha: 16, dropout: 0, rslora: false }) : e));
  return { ...grid, experts, router };
}

function assertSameWeights(actual: LoadedAdapter, expected: LoadedAdapter): void {
  assert.equal([...actual.lora.keys()], [...expected.lora.keys()]);
  for (const [key, w] of expected.lora) assert.equal(actual.lora.get(key), w, key);
  assert.equal(actual.router, expected.router);
}

/** Loads and expects a CheckpointError; returns its message. */
function refusal(dir: string, spec?: Adapter): string {
  try {
    loadAdapter(dir, { name: "t", base, ...(spec ? { spec } : {}) });
  } catch (e) {
    assert.instance(e, CheckpointError);
    return (e as Error).message;
  }
  throw new Error("expected the adapter to be refused");
}

/** Rewrites the adapter's safetensors file through `edit`. */
function editTensors(dir: string, edit: (tensors: TensorToWrite[]) => TensorToWrite[]): void {
  const path = join(dir, ADAPTER_WEIGHTS_FILE);
  const file = SafetensorsFile.open(path);
  const tensors = [...file.tensors.values()].map((t) => ({ name: t.name, dtype: "F32" as const, shape: t.shape, data: file.readF32(t.name) }));
  file.close();
  writeSafetensors(path, edit(tensors));
}

test("a routed adapter round-trips: the spec is rebuilt from adapter_config.json and the weights are exact", () => {
  const dir = freshDir();
  const spec = routedSpec();
  const written = writeRandomAdapter(dir, { spec, seed: 3, name: "tenantA" });
  const loaded = loadAdapter(dir, { name: "tenantA", base });
  assert.is(loaded.name, "tenantA");
  assert.is(loaded.spec.name, "support_bot");
  assert.equal(loaded.spec.layers, spec.layers);
  assert.equal(loaded.spec.experts, spec.experts);
  assert.equal(loaded.spec.router, router);
  assertSameWeights(loaded, written);
  assert.equal(loaded.router?.get(1)?.experts, ["q_proj", "v_proj", "down_proj"]);

  const config = JSON.parse(readFileSync(join(dir, ADAPTER_CONFIG_FILE), "utf8"));
  assert.is(config.peft_type, "LORA");
  assert.equal(config.rank_pattern, { "model.layers.0.mlp.down_proj": 4 });
  assert.is(config.milora.spec_hash, specHash(spec));
  assertSameWeights(loadAdapter(dir, { name: "tenantA", base, spec }), written);
});

test("random adapters are deterministic, with B not zero", () => {
  const spec = routedSpec();
  assertSameWeights(randomAdapter({ spec, seed: 9 }), randomAdapter({ spec, seed: 9 }));
  const other = randomAdapter({ spec, seed: 10 });
  assert.not.equal(other.lora.get("0.q_proj")?.a, randomAdapter({ spec, seed: 9 }).lora.get("0.q_proj")?.a);
  assert.ok([...other.lora.values()].every((w) => w.b.some((x) => x !== 0)));
});

test("writing over an adapter replaces it; a directory that is not an adapter is left alone", () => {
  const dir = freshDir();
  writeRandomAdapter(dir, { spec: routedSpec(), seed: 1 });
  const second = writeRandomPeftAdapter(dir, { base, modules: ["q_proj"], rank: 2, alpha: 4, seed: 2 });
  assertSameWeights(loadAdapter(dir, { name: "t", base }), second);

  const other = freshDir();
  mkdirSync(other);
  writeFileSync(join(other, "notes.txt"), "mine\n");
  assert.throws(() => writeAdapter(other, second), /not an adapter directory/);
  assert.is(readFileSync(join(other, "notes.txt"), "utf8"), "mine\n");
});

test("a plain PEFT adapter loads as LoRA on every targeted module, with no router", () => {
  const dir = freshDir();
  const written = writeRandomPeftAdapter(dir, { base, modules: ["q_proj", "v_proj"], rank: 4, alpha: 8, layers: [0, 2], seed: 5 });
  const config = JSON.parse(readFileSync(join(dir, ADAPTER_CONFIG_FILE), "utf8"));
  assert.equal(config.target_modules, ["q_proj", "v_proj"]);
  assert.equal(config.layers_to_transform, [0, 2]);
  assert.is(config.milora, undefined);
  const spec = adapterSpecFromPeft(dir, base, "plain");
  assert.is(spec.router, undefined);
  assert.equal(spec.layers, [0, 2]);
  assert.equal(spec.experts.map((e) => `${e.layer}.${e.module}`), ["0.q_proj", "0.v_proj", "2.q_proj", "2.v_proj"]);
  assert.ok(spec.experts.every((e) => e.scaling === 8 / 4));
  const loaded = loadAdapter(dir, { name: "plain", base });
  assert.is(loaded.router, undefined);
  assertSameWeights(loaded, written);
});

test("rank_pattern and alpha_pattern apply PEFT's way, by module name or layer path, and use_rslora scales by sqrt(r)", () => {
  const hand = {
    peft_type: "LORA",
    base_model_name_or_path: "tiny",
    r: 8,
    lora_alpha: 16,
    target_modules: "model\\.layers\\.[01]\\.(self_attn\\.q_proj|mlp\\.up_proj)",
    rank_pattern: { "layers.1.self_attn.q_proj": 2, up_proj: 4 },
    alpha_pattern: { q_proj: 9 },
    use_rslora: true,
    bias: "none",
  };
  const dir = freshDir();
  mkdirSync(dir);
  writeFileSync(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(hand));
  const spec = adapterSpecFromPeft(dir, base, "hand");
  const options = spec.experts.map((e) => [e.layer, e.module, e.rank, e.alpha, e.scaling]);
  assert.equal(options, [
    [0, "q_proj", 8, 9, 9 / Math.sqrt(8)],
    [0, "up_proj", 4, 16, 16 / Math.sqrt(4)],
    [1, "q_proj", 2, 9, 9 / Math.sqrt(2)],
    [1, "up_proj", 4, 16, 16 / Math.sqrt(4)],
  ]);
  // Weights written for this spec (with milora's own config) still load under the hand-written config.
  writeAdapter(dir, randomAdapter({ spec, seed: 4 }));
  const ours = JSON.parse(readFileSync(join(dir, ADAPTER_CONFIG_FILE), "utf8"));
  assert.equal(ours.rank_pattern, { "model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 2 });
  assert.equal(adapterSpecFromPeft(dir, base, "hand").experts, spec.experts);
  writeFileSync(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(hand));
  assert.equal(loadAdapter(dir, { name: "hand", base }).spec.experts, spec.experts);
});

test("target_modules all-linear adapts all seven modules", () => {
  const dir = freshDir();
  mkdirSync(dir);
  writeFileSync(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify({ peft_type: "LORA", r: 2, lora_alpha: 4, target_modules: "all-linear", layers_to_transform: 1 }));
  const spec = adapterSpecFromPeft(dir, base, "all");
  assert.equal(spec.layers, [1]);
  assert.is(spec.experts.length, 7);
});

const qA0 = adapterTensorName.loraA(base, 0, "q_proj");

test("a rank that differs from the spec is refused with the tensor name and both shapes", () => {
  const dir = freshDir();
  writeRandomPeftAdapter(dir, { base, modules: ["q_proj"], rank: 8, alpha: 16, seed: 1 });
  const spec = peftSpec({ base, modules: ["q_proj"], rank: 4, alpha: 8, seed: 1 });
  const message = refusal(dir, spec);
  assert.match(message, `tensor "${qA0}" has shape [8, 32], spec expects [4, 32]`);
  assert.match(message, `tensor "${adapterTensorName.loraB(base, 0, "q_proj")}" has shape [32, 8], spec expects [32, 4]`);
  // alpha / r is 2 in both, so the scaling itself agrees; only the shapes are wrong (2 tensors x 3 layers).
  assert.match(message, "(6 problems)");
});

test("a module the spec needs but the file lacks, and a tensor the spec does not know, are both listed", () => {
  const dir = freshDir();
  writeRandomPeftAdapter(dir, { base, modules: ["q_proj", "v_proj"], rank: 4, alpha: 8, layers: [0], seed: 1 });
  const spec = peftSpec({ base, modules: ["q_proj", "k_proj"], rank: 4, alpha: 8, layers: [0], seed: 1 });
  const message = refusal(dir, spec);
  assert.match(message, `missing tensor "${adapterTensorName.loraA(base, 0, "k_proj")}" (spec expects [4, 32])`);
  assert.match(message, `unexpected tensor "${adapterTensorName.loraA(base, 0, "v_proj")}" [4, 32] (not part of adapter spec peft)`);
  assert.match(message, "(4 problems)");
});

test("an unknown extra tensor is refused by name even without a spec", () => {
  const dir = freshDir();
  writeRandomPeftAdapter(dir, { base, modules: ["q_proj"], rank: 2, alpha: 4, seed: 1 });
  const extra = "base_model.model.lm_head.lora_A.weight";
  editTensors(dir, (ts) => [...ts, { name: extra, dtype: "F32", shape: [2, 32], data: new Float32Array(64) }]);
  assert.match(refusal(dir), `unexpected tensor "${extra}" [2, 32]`);
});

test("a router of the wrong shape is refused with both shapes", () => {
  const dir = freshDir();
  writeRandomAdapter(dir, { spec: routedSpec(), seed: 2 });
  const gate = adapterTensorName.router(base, 1);
  const pooler = adapterTensorName.pooler(base, 0);
  editTensors(dir, (ts) =>
    ts.map((t) =>
      t.name === gate ? { ...t, shape: [4, 32], data: new Float32Array(128) } : t.name === pooler ? { ...t, shape: [32], data: new Float32Array(32) } : t,
    ),
  );
  const message = refusal(dir, routedSpec());
  assert.match(message, `tensor "${gate}" has shape [4, 32], spec expects [3, 32]`);
  assert.match(message, `tensor "${pooler}" has shape [32], spec expects [1, 32]`);
});

test("a routed spec over a file without a router is refused, naming each missing router tensor", () => {
  const dir = freshDir();
  const plain = { ...routedSpec(), router: undefined };
  writeRandomAdapter(dir, { spec: plain, seed: 2 });
  const message = refusal(dir, routedSpec());
  assert.match(message, "the spec routes this adapter (router pooling attention, when prompt) but the file holds no router tensors");
  assert.match(message, `missing tensor "${adapterTensorName.router(base, 0)}" (spec expects [4, 32])`);
  assert.match(message, `missing tensor "${adapterTensorName.pooler(base, 1)}" (spec expects [1, 32])`);
  // The rational activation's coefficients are optional (the GELU fit stands in for them).
  assert.not.match(message, "milora_rational");
  assert.not.match(message, "milora_router_noise");
  // The other way round, router tensors are extra for a plain spec.
  const routed = freshDir();
  writeRandomAdapter(routed, { spec: routedSpec(), seed: 2 });
  assert.match(refusal(routed, plain), `unexpected tensor "${adapterTensorName.router(base, 0)}" [4, 32] (the spec has no router)`);
});

test("LoRA scaling that differs between the spec and adapter_config.json is refused", () => {
  const dir = freshDir();
  writeRandomPeftAdapter(dir, { base, modules: ["v_proj"], rank: 4, alpha: 8, layers: [2], seed: 1 });
  const spec = peftSpec({ base, modules: ["v_proj"], rank: 4, alpha: 8, layers: [2], rslora: true, seed: 1 });
  assert.match(refusal(dir, spec), "layer 2 v_proj: adapter_config.json gives LoRA scaling 2 (r 4, alpha 8), the spec 4 (r 4, alpha 8, rsLoRA)");
});

/**
 * A DoRA adapter exactly as PEFT saves one (LoraConfig(use_dora=True), save_pretrained): its config and
 * tensors written here from PEFT's layout, not by milora: per module lora_A, lora_B and the magnitude
 * `lora_magnitude_vector` [out] (saved without the `.weight` its module holds it under).
 */
function writePeftDoraAdapter(dir: string, modules: readonly ("q_proj" | "k_proj" | "v_proj" | "o_proj")[]): Map<string, Float32Array> {
  mkdirSync(dir, { recursive: true });
  const config = { peft_type: "LORA", task_type: "CAUSAL_LM", r: 2, lora_alpha: 4, lora_dropout: 0.05, target_modules: modules, use_dora: true, use_rslora: false, bias: "none", fan_in_fan_out: false };
  writeFileSync(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(config));
  const data = new Map<string, Float32Array>();
  const tensors: TensorToWrite[] = [];
  for (let layer = 0; layer < base.layers; layer++) {
    for (const m of modules) {
      // attention modules only: hidden 32, k and v 16 wide (2 kv heads of 8)
      const path = `base_model.model.model.layers.${layer}.self_attn.${m}`;
      const [out, inF] = m === "k_proj" || m === "v_proj" ? [16, 32] : [32, 32];
      for (const [name, shape] of [[`${path}.lora_A.weight`, [2, inF]], [`${path}.lora_B.weight`, [out, 2]], [`${path}.lora_magnitude_vector`, [out]]] as const) {
        const values = Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => Math.sin(i + layer + name.length));
        data.set(name, values);
        tensors.push({ name, dtype: "F32", shape: [...shape], data: values });
      }
    }
  }
  writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), tensors, { format: "pt" });
  return data;
}

test("a PEFT DoRA adapter (use_dora true, lora_magnitude_vector [out]) loads with its magnitudes, and milora writes it back the same way", () => {
  const dir = freshDir();
  const data = writePeftDoraAdapter(dir, ["q_proj", "v_proj"]);
  const loaded = loadAdapter(dir, { name: "dora", base });
  assert.ok(loaded.spec.experts.every((e) => e.dora === true));
  assert.is(loaded.spec.experts.length, 6);
  const v1 = loaded.lora.get("1.v_proj")!;
  assert.equal(v1.magnitude, data.get("base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"));
  assert.equal(v1.b, data.get("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"));
  assert.is(adapterTensorName.loraMagnitude(base, 1, "v_proj"), "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector");
  const again = freshDir();
  writeAdapter(again, loaded);
  assert.is(JSON.parse(readFileSync(join(again, ADAPTER_CONFIG_FILE), "utf8")).use_dora, true);
  assertSameWeights(loadAdapter(again, { name: "dora", base, spec: loaded.spec }), loaded);
  // a plain adapter says use_dora false, as PEFT writes it
  const plain = freshDir();
  writeRandomPeftAdapter(plain, { base, modules: ["q_proj"], rank: 2, alpha: 4, seed: 1 });
  assert.is(JSON.parse(readFileSync(join(plain, ADAPTER_CONFIG_FILE), "utf8")).use_dora, false);
});

test("DoRA tensors are checked like the others: a missing or misshapen magnitude, a magnitude in a plain adapter, use_dora against the spec", () => {
  const dir = freshDir();
  writePeftDoraAdapter(dir, ["q_proj"]);
  const q0 = adapterTensorName.loraMagnitude(base, 0, "q_proj");
  const q2 = adapterTensorName.loraMagnitude(base, 2, "q_proj");
  editTensors(dir, (ts) => ts.filter((t) => t.name !== q2).map((t) => (t.name === q0 ? { ...t, shape: [1, 32] } : t)));
  const message = refusal(dir);
  assert.match(message, `tensor "${q0}" has shape [1, 32], spec expects [32]`);
  assert.match(message, `missing tensor "${q2}" (spec expects [32])`);
  assert.match(message, "(2 problems)");
  const plainSpec = peftSpec({ base, modules: ["q_proj"], rank: 2, alpha: 4, seed: 1 });
  const fresh = freshDir();
  writePeftDoraAdapter(fresh, ["q_proj"]);
  const mismatch = refusal(fresh, plainSpec);
  assert.match(mismatch, `adapter_config.json has "use_dora": true, but the spec's experts do not use DoRA`);
  assert.match(mismatch, `unexpected tensor "${q0}" [32] (a DoRA magnitude, but the adapter is not DoRA (use_dora false))`);
  writeFileSync(join(fresh, ADAPTER_CONFIG_FILE), JSON.stringify({ ...JSON.parse(readFileSync(join(fresh, ADAPTER_CONFIG_FILE), "utf8")), use_dora: "yes" }));
  assert.match(refusal(fresh), `"use_dora" must be true or false, got "yes"`);
});

test("rational coefficients load from the file when present, else the GELU-fit initialisation; half a set is refused", () => {
  const dir = freshDir();
  const written = writeRandomAdapter(dir, { spec: routedSpec(), seed: 4 });
  const loaded = loadAdapter(dir, { name: "t", base });
  assert.equal(loaded.router?.get(1)?.rational, written.router?.get(1)?.rational);
  assert.not.equal([...loaded.router!.get(1)!.rational!.numerator], GELU_RATIONAL.numerator.map(Math.fround));
  const numerator = adapterTensorName.rationalNumerator(base, 1);
  const denominator = adapterTensorName.rationalDenominator(base, 1);
  editTensors(dir, (ts) => ts.filter((t) => !t.name.includes("milora_rational")));
  const init = loadAdapter(dir, { name: "t", base }).router!.get(1)!.rational!;
  assert.equal([...init.numerator], GELU_RATIONAL.numerator.map(Math.fround));
  assert.equal([...init.denominator], GELU_RATIONAL.denominator.map(Math.fround));
  writeRandomAdapter(dir, { spec: routedSpec(), seed: 4 });
  editTensors(dir, (ts) => ts.filter((t) => t.name !== denominator));
  assert.match(refusal(dir), `layer 1: the rational activation needs "${numerator}" and "${denominator}" together`);
});

test("a version 1 milora section (the old router) is refused with what changed and how to convert", () => {
  const dir = freshDir();
  writeRandomAdapter(dir, { spec: routedSpec(), seed: 2 });
  const path = join(dir, ADAPTER_CONFIG_FILE);
  const config = JSON.parse(readFileSync(path, "utf8"));
  const v1 = (router: Record<string, unknown>) => {
    writeFileSync(path, JSON.stringify({ ...config, milora: { ...config.milora, version: 1, router: { ...config.milora.router, ...router } } }));
    return refusal(dir);
  };
  const attention = v1({ pooling: "attention", activation: "gelu", selection: { rule: "top_k", k: 2 } });
  assert.match(attention, `"milora.version" is 1`);
  assert.match(attention, "[hidden, hidden] projection with tanh");
  assert.match(attention, "renormalised over the chosen experts");
  assert.match(attention, "before pooling");
  assert.match(attention, "cannot be converted");
  assert.match(v1({ pooling: "mean", activation: "gelu" }), 'applies "gelu" before "mean" pooling');
  const exact = v1({ pooling: "last", activation: "gelu", selection: { rule: "top_k", k: 2 } });
  assert.match(exact, 'converts exactly: in adapter_config.json set "milora.version" to 2 and add "renormalize": true');
});

test("a bad adapter_config.json is refused with the file and the field", () => {
  const dir = freshDir();
  writeRandomPeftAdapter(dir, { base, modules: ["q_proj"], rank: 2, alpha: 4, seed: 1 });
  const path = join(dir, ADAPTER_CONFIG_FILE);
  const config = JSON.parse(readFileSync(path, "utf8"));
  for (const [edit, expected] of [
    [{ peft_type: "IA3" }, "peft_type IA3 is not supported"],
    [{ r: 0 }, `"r" must be a positive integer, got 0`],
    [{ target_modules: ["lm_head"] }, "names none of the modules milora adapts"],
    [{ layers_to_transform: [7] }, "layer 7 is outside the base"],
    [{ rank_pattern: { "q_proj(": 2 } }, `rank_pattern key "q_proj(" is not a regular expression milora can match`],
    [{ milora: { version: 9 } }, `"milora.version" is 9`],
  ] as const) {
    writeFileSync(path, JSON.stringify({ ...config, ...edit }));
    const message = refusal(dir);
    assert.match(message, path);
    assert.match(message, expected);
  }
  rmSync(path);
  assert.match(refusal(dir), `${path}: missing`);
});

/**
 * Reads the adapter at `dir` in a child process that must finish within `limitMs` (the child is killed
 * at 30 s, so a hanging pattern fails the test instead of hanging it). Returns the child's report.
 */
function readInChild(dir: string, limitMs: number): { ms: number; error?: string; experts?: number } {
  const adapterConfig = new URL("../../../runtime/formats/adapter-config.ts", import.meta.url).href;
  const code = `
    const { readAdapterConfig, specFromConfig } = await import(${JSON.stringify(adapterConfig)});
    const base = ${JSON.stringify({ ...base, span: undefined })};
    const started = performance.now();
    let report;
    try { report = { experts: specFromConfig(readAdapterConfig(${JSON.stringify(dir)}), base, "x").experts.length }; }
    catch (e) { report = { error: e.message }; }
    console.log(JSON.stringify({ ...report, ms: performance.now() - started }));`;
  const child = spawnSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", code], { encoding: "utf8", timeout: 30_000 });
  assert.is(child.signal, null, `reading ${dir} did not finish within 30 s`);
  const report = JSON.parse(child.stdout.trim().split("\n").at(-1) ?? "{}");
  assert.ok(report.ms < limitMs, `reading took ${report.ms} ms`);
  return report;
}

function writeConfig(edit: Record<string, unknown>): string {
  const dir = freshDir();
  mkdirSync(dir);
  writeFileSync(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify({ peft_type: "LORA", r: 4, lora_alpha: 8, target_modules: ["q_proj"], ...edit }));
  return dir;
}

test("a catastrophic-backtracking target_modules or pattern key is matched in linear time", () => {
  // With JavaScript's backtracking RegExp "(.*.*)*x" against a 30-character module name never finishes.
  for (const edit of [
    { target_modules: "(.*.*)*x" },
    { target_modules: "(a|aa)*(.*)*b", rank_pattern: { "(.*.*)*x": 2 } },
    { alpha_pattern: { "((q|q_)*)*_projz": 3 } },
  ]) {
    const report = readInChild(writeConfig(edit), 1000);
    if (edit.target_modules !== undefined) assert.match(report.error ?? "", "names none of the modules milora adapts");
    else assert.is(report.experts, base.layers);
  }
});

test("target_modules is a full match of the module name and pattern keys match its end, as in PEFT", () => {
  const spec = (edit: Record<string, unknown>) => adapterSpecFromPeft(writeConfig(edit), base, "p").experts.map((e) => [e.layer, e.module, e.rank]);
  // a full match: "q_proj" alone names no module path, ".*q_proj" names every q_proj
  assert.throws(() => spec({ target_modules: "q_proj" }), /names none of the modules/);
  assert.equal(spec({ target_modules: ".*\\.1\\.self_attn\\.q_proj" }), [[1, "q_proj", 4]]);
  // a key matches whole dot-separated parts at the end: "proj" is no module's last part, "q_proj" is
  assert.equal(spec({ target_modules: ".*q_proj", rank_pattern: { proj: 2, "1\\.self_attn\\.q_proj": 3 } }), [[0, "q_proj", 4], [1, "q_proj", 3], [2, "q_proj", 4]]);
  // the first matching key wins, in the file's order
  assert.equal(spec({ rank_pattern: { "q_.*": 5, q_proj: 6 } }).map((e) => e[2]), [5, 5, 5]);
});

test("a pattern RE2 cannot match (backreference, lookahead) is refused naming the file, the key and the pattern", () => {
  for (const [edit, expected] of [
    [{ target_modules: "(q)_proj\\1" }, `target_modules "(q)_proj\\\\1" is not a regular expression milora can match`],
    [{ rank_pattern: { "q(?=_proj)": 2 } }, `rank_pattern key "q(?=_proj)" is not a regular expression milora can match`],
    [{ alpha_pattern: { "(?<=self_attn\\.)q_proj": 2 } }, `alpha_pattern key "(?<=self_attn\\\\.)q_proj"`],
  ] as const) {
    const dir = writeConfig(edit);
    const message = refusal(dir);
    assert.match(message, join(dir, ADAPTER_CONFIG_FILE));
    assert.match(message, expected);
    assert.match(message, "without backreferences or lookaround");
  }
});

test("sizes in adapter_config.json are bounded before any work: rank, pattern tables, layer lists", () => {
  const keys = Object.fromEntries(Array.from({ length: 9000 }, (_, i) => [`layers\\.${i}\\.self_attn\\.q_proj`, 2]));
  for (const [edit, expected] of [
    [{ r: 100_000 }, `"r" is 100000, above milora's limit of 4096`],
    [{ rank_pattern: { q_proj: 1e6 } }, `rank_pattern "q_proj": rank 1000000 is above milora's limit of 4096`],
    [{ rank_pattern: keys }, `"rank_pattern" has 9000 keys; milora reads at most 8192`],
    [{ layers_to_transform: Array.from({ length: 5000 }, (_, i) => i) }, `"layers_to_transform" lists 5000 layers`],
  ] as const) {
    const started = performance.now();
    assert.match(refusal(writeConfig(edit)), expected);
    assert.ok(performance.now() - started < 2000);
  }
});

test.run();
