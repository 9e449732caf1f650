// Adapter files of the per-token Mixture-of-LoRA baselines (docs/formats.md, "per_module and per_ffn
// adapters"): per_module in PEFT's layout with a router per module, per_ffn in MoE-PEFT's MixLoRA layout
// with each MLP module's experts stacked in memory; round trips, a MixLoRA directory as MoE-PEFT writes
// it, and every refusal with the tensor or key it names.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkSource } from "../../../compiler/check.ts";
import type { Adapter } from "../../../compiler/model.ts";
import { peftSpec, randomAdapter, writeRandomAdapter, writeRandomPeftAdapter } from "../../../examples/random-adapter.ts";
import { ADAPTER_CONFIG_FILE, specHash } from "../../../runtime/formats/adapter-config.ts";
import { ADAPTER_WEIGHTS_FILE, adapterSpecFromPeft, adapterTensorName, loadAdapter, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { CheckpointError, SafetensorsFile, writeSafetensors, type TensorToWrite } from "../../../runtime/formats/safetensors.ts";

const root = mkdtempSync(join(tmpdir(), "milora-moe-adapter-"));
test.after(() => rmSync(root, { recursive: true, force: true }));
let dirs = 0;
const freshDir = () => join(root, `a${dirs++}`);

// A 3-layer toy base: q is 32 wide, k and v 16 (two kv heads), the MLP 48.
const SPEC = `
base tiny: llama { hidden_size 32  layers 3  heads 4  kv_heads 2  intermediate_size 48  vocab_size 64 }

// MOELoRA / MoLoRA: each module's rank-8 LoRA is 4 experts of rank 2, with a router per module.
adapter molora on tiny {
  experts attn.* { rank 8 alpha 16 }
  experts down_proj { rank 4 alpha 8 }
  router { placement per_module  num_experts 4  select top_k 2 renormalize  balance 0.02 }
}

// MixLoRA: 4 experts of rank 2 on every MLP module (rank 4 on layer 1's down_proj), plain LoRA on q and v,
// in layers 0 and 1 only.
adapter mix on tiny {
  layers 0..1
  experts q_proj, v_proj { rank 4 alpha 8 }
  experts mlp.* { rank 2 alpha 4 }
  at layers 1 { experts down_proj { rank 4 } }
  router { placement per_ffn  num_experts 4  select top_k 2 renormalize  balance 0.02 }
}
adapter mix_dense extends mix { router { select dense } }
`;
const { program, diagnostics } = checkSource(SPEC, "/virtual/moe.milora");
assert.equal(diagnostics.map((d) => d.message), []);
const base = program.bases[0]!;
const spec = (name: string): Adapter => program.adapters.find((a) => a.name === name)!;

function assertSameWeights(actual: LoadedAdapter, expected: LoadedAdapter): void {
  assert.equal([...actual.lora.keys()], [...expected.lora.keys()]);
  for (const [key, w] of expected.lora) assert.equal(actual.lora.get(key), w, key);
  assert.equal(actual.moeRouters, expected.moeRouters);
  assert.is(actual.router, undefined);
}

function readConfig(dir: string): Record<string, any> {
  return JSON.parse(readFileSync(join(dir, ADAPTER_CONFIG_FILE), "utf8"));
}

function fileShapes(dir: string): Map<string, readonly number[]> {
  const file = SafetensorsFile.open(join(dir, ADAPTER_WEIGHTS_FILE));
  const shapes = new Map([...file.tensors.values()].map((t) => [t.name, t.shape] as const));
  file.close();
  return shapes;
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

// ---- per_module

test("per_module round-trips: PEFT's LoRA names, a router [E, in] per module, the routing in the milora section", () => {
  const dir = freshDir();
  const molora = spec("molora");
  const written = writeRandomAdapter(dir, { spec: molora, seed: 3, name: "alice" });
  const config = readConfig(dir);
  assert.is(config.peft_type, "LORA");
  assert.equal(config.milora.router, { placement: "per_module", num_experts: 4, selection: { rule: "top_k", k: 2, renormalize: true }, balance: 0.02 });
  assert.is(config.milora.spec_hash, specHash(molora));
  const shapes = fileShapes(dir);
  assert.equal(shapes.get(adapterTensorName.loraA(base, 0, "q_proj")), [8, 32], "the LoRA keeps the module's full rank");
  assert.equal(shapes.get("base_model.model.model.layers.0.self_attn.q_proj.milora_moe_router.weight"), [4, 32]);
  assert.equal(shapes.get("base_model.model.model.layers.2.mlp.down_proj.milora_moe_router.weight"), [4, 48], "down_proj's router reads its own input");

  const loaded = loadAdapter(dir, { name: "alice", base });
  assert.is(loaded.spec.name, "molora");
  assert.equal(loaded.spec.moe, molora.moe);
  assert.equal(loaded.spec.experts, molora.experts);
  assert.is(loaded.lora.get("1.k_proj")!.rank, 8);
  assertSameWeights(loaded, written);
  assertSameWeights(loadAdapter(dir, { name: "alice", base, spec: molora }), written);
  assert.is(written.moeRouters!.size, 3 * 5);
});

test("a per_module file missing a router, or read as plain LoRA, is refused naming the router tensors", () => {
  const dir = freshDir();
  writeRandomAdapter(dir, { spec: spec("molora"), seed: 4 });
  const router = "base_model.model.model.layers.1.self_attn.v_proj.milora_moe_router.weight";
  editTensors(dir, (ts) => ts.filter((t) => t.name !== router));
  assert.match(refusal(dir), `missing tensor "${router}" (spec expects [4, 32])`);

  const plain = peftSpec({ base, modules: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], rank: 8, alpha: 16, seed: 0 });
  const asPlain = refusal(dir, { ...plain, experts: spec("molora").experts });
  assert.match(asPlain, `unexpected tensor "base_model.model.model.layers.0.self_attn.q_proj.milora_moe_router.weight" [4, 32] (a per_module router, but the spec has no per_module router)`);

  const lora = freshDir();
  writeRandomPeftAdapter(lora, { base, modules: ["q_proj"], rank: 8, alpha: 16, seed: 1 });
  const qOnly = { ...spec("molora"), experts: spec("molora").experts.filter((e) => e.module === "q_proj") };
  assert.match(refusal(lora, { ...qOnly, layers: [0, 1, 2] }), "the spec routes every token per_module over 4 experts but the file holds none of its 3 router tensors");
});

test("a per_module config whose rank does not split into num_experts is refused", () => {
  const dir = freshDir();
  writeRandomAdapter(dir, { spec: spec("molora"), seed: 5 });
  const config = readConfig(dir);
  config.milora.router.num_experts = 3;
  writeFileSync(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(config));
  assert.match(refusal(dir), "layer 0 q_proj has rank 8, which does not split into 3 per_module experts of equal rank");
  assert.match(refusal(dir, spec("molora")), "adapter_config.json gives num_experts 3, the spec 4");
});

// ---- per_ffn: writing and reading our own

test("per_ffn round-trips in MoE-PEFT's MixLoRA layout: one file tensor per expert, stacked in memory", () => {
  const dir = freshDir();
  const mix = spec("mix");
  const written = writeRandomAdapter(dir, { spec: mix, seed: 6, name: "bob" });
  const config = readConfig(dir);
  assert.equal(
    { peft_type: config.peft_type, routing_strategy: config.routing_strategy, num_experts: config.num_experts, top_k: config.top_k, r: config.r, lora_alpha: config.lora_alpha },
    { peft_type: "MIXLORA", routing_strategy: "mixlora", num_experts: 4, top_k: 2, r: 4, lora_alpha: 8 },
  );
  assert.equal(config.target_modules, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]);
  assert.equal(config.expert_lora, { r: 2, lora_alpha: 4, lora_dropout: config.lora_dropout, use_rslora: false });
  assert.equal(config.rank_pattern, { "model.layers.1.mlp.down_proj": 4 });
  assert.equal(config.layers_to_transform, [0, 1]);
  assert.is(config.router_aux_loss_coef, 0.02);

  const shapes = fileShapes(dir);
  assert.equal(shapes.get("mixlora.layers.0.self_attn.v_proj.lora_A.weight"), [4, 32]);
  assert.equal(shapes.get("mixlora.layers.0.self_attn.v_proj.lora_B.weight"), [16, 4]);
  assert.equal(shapes.get("mixlora.layers.1.mlp.moe_gate.weight"), [4, 32]);
  assert.equal(shapes.get("mixlora.layers.0.mlp.down_proj.experts.3.lora_A.weight"), [2, 48]);
  assert.equal(shapes.get("mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight"), [32, 4]);
  assert.not.ok([...shapes.keys()].some((n) => n.startsWith("mixlora.layers.2.")), "layer 2 is not adapted");
  assert.is(shapes.size, 2 * (2 * 2 + 1 + 3 * 4 * 2));

  // In memory an MLP module holds its 4 experts stacked: rank 4 * 2, scaling alpha / r = 4 / 2.
  const up = written.lora.get("0.up_proj")!;
  assert.equal([up.rank, up.scaling, up.a.length, up.b.length], [8, 2, 8 * 32, 48 * 8]);
  const file = SafetensorsFile.open(join(dir, ADAPTER_WEIGHTS_FILE));
  assert.equal(file.readF32("mixlora.layers.0.mlp.up_proj.experts.1.lora_A.weight"), up.a.slice(2 * 32, 4 * 32), "expert 1 owns rows 2 and 3 of A");
  const b1 = file.readF32("mixlora.layers.0.mlp.up_proj.experts.1.lora_B.weight");
  for (let o = 0; o < 48; o++) assert.equal([b1[o * 2], b1[o * 2 + 1]], [up.b[o * 8 + 2], up.b[o * 8 + 3]], `B row ${o}: expert 1 owns columns 2 and 3`);
  file.close();

  const loaded = loadAdapter(dir, { name: "bob", base });
  assert.is(loaded.spec.name, "mix");
  assert.equal(loaded.spec.moe, mix.moe);
  assert.equal(loaded.spec.layers, [0, 1]);
  assert.equal(loaded.spec.experts, mix.experts);
  assertSameWeights(loaded, written);
  assert.equal([...loaded.moeRouters!.keys()], ["0.ffn", "1.ffn"]);
  assertSameWeights(loadAdapter(dir, { name: "bob", base, spec: mix }), written);
});

test("per_ffn selections MixLoRA cannot say (dense) round-trip through the milora section; MixLoRA's fields alone give top_k renormalised", () => {
  const dir = freshDir();
  const dense = spec("mix_dense");
  writeRandomAdapter(dir, { spec: dense, seed: 7 });
  const config = readConfig(dir);
  assert.is(config.top_k, 4, "dense is top_k num_experts renormalised for a MixLoRA reader");
  assert.equal(loadAdapter(dir, { name: "d", base }).spec.moe, dense.moe);
  // Without the milora section (adapterSpecFromPeft ignores it, as MixLoRA's own readers do): MixLoRA's fields.
  const fromFields = adapterSpecFromPeft(dir, base, "d");
  assert.equal(fromFields.moe, { placement: "per_ffn", experts: 4, selection: { rule: "top_k", k: 4, renormalize: true }, balance: 0.02 });
  assert.equal(fromFields.experts, dense.experts, "layers_to_transform, expert_lora and rank_pattern give the same experts");
});

// ---- per_ffn: a MixLoRA adapter as MoE-PEFT writes it

/** Layer count, modules and sizes of the hand-made MixLoRA adapter below (over the 3-layer base). */
const MIX = { experts: 3, r: 4, expertR: 2 };
const MIX_CONFIG = {
  peft_type: "MIXLORA",
  task_type: "CAUSAL_LM",
  base_model_name_or_path: "tiny",
  bias: "none",
  r: MIX.r,
  lora_alpha: 8,
  lora_dropout: 0.05,
  target_modules: { q_proj: true, k_proj: false, v_proj: true, o_proj: false, gate_proj: true, up_proj: true, down_proj: true },
  routing_strategy: "mixlora",
  num_experts: MIX.experts,
  top_k: 2,
  router_aux_loss_coef: 0.01,
  router_init_range: 0.02,
  jitter_noise: 0.0,
  act_fn: "silu",
  expert_lora: { r: MIX.expertR, lora_alpha: 6, lora_dropout: 0.05 },
};
const SIZES = { q_proj: [32, 32], v_proj: [16, 32], gate_proj: [48, 32], up_proj: [48, 32], down_proj: [32, 48] } as const;

/**
 * MoE-PEFT's tensors for MIX_CONFIG, each filled with values of its own (tensor k holds k + i / 1000), so
 * a mix-up of experts or layers shows. `legacy` names them as the MixLoRA package's older releases did.
 */
function mixloraTensors(legacy = false): TensorToWrite[] {
  const out: TensorToWrite[] = [];
  const add = (name: string, shape: number[]) =>
    out.push({ name, dtype: "F32", shape, data: Float32Array.from({ length: shape[0]! * shape[1]! }, (_, i) => out.length + 1 + i / 1000) });
  for (let layer = 0; layer < 3; layer++) {
    for (const m of ["q_proj", "v_proj"] as const) {
      add(`mixlora.layers.${layer}.self_attn.${m}.lora_A.weight`, [MIX.r, SIZES[m][1]]);
      add(`mixlora.layers.${layer}.self_attn.${m}.lora_B.weight`, [SIZES[m][0], MIX.r]);
    }
    add(legacy ? `mixlora.layers.${layer}.gate.weight` : `mixlora.layers.${layer}.mlp.moe_gate.weight`, [MIX.experts, 32]);
    for (const m of ["gate_proj", "up_proj", "down_proj"] as const) {
      for (let e = 0; e < MIX.experts; e++) {
        const prefix = legacy ? `mixlora.layers.${layer}.experts.${e}.${m}` : `mixlora.layers.${layer}.mlp.${m}.experts.${e}`;
        add(`${prefix}.lora_A.weight`, [MIX.expertR, SIZES[m][1]]);
        add(`${prefix}.lora_B.weight`, [SIZES[m][0], MIX.expertR]);
      }
    }
  }
  return out;
}

function writeMixlora(config: Record<string, unknown> = MIX_CONFIG, tensors = mixloraTensors()): string {
  const dir = freshDir();
  mkdirSync(dir);
  writeFileSync(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(config, null, 2));
  writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), tensors);
  return dir;
}

function editTensors(dir: string, edit: (tensors: TensorToWrite[]) => TensorToWrite[]): void {
  const path = join(dir, ADAPTER_WEIGHTS_FILE);
  const file = SafetensorsFile.open(path);
  const tensors = [...file.tensors.values()].map((t) => ({ name: t.name, dtype: "F32" as const, shape: t.shape, data: file.readF32(t.name) }));
  file.close();
  writeSafetensors(path, edit(tensors));
}

test("a MixLoRA adapter from MoE-PEFT loads as per_ffn: the spec from its config, each MLP module's experts stacked", () => {
  const tensors = mixloraTensors();
  const data = (name: string) => tensors.find((t) => t.name === name)!.data;
  const loaded = loadAdapter(writeMixlora(), { name: "carol", base });
  const { spec: s } = loaded;
  assert.equal(s.moe, { placement: "per_ffn", experts: 3, selection: { rule: "top_k", k: 2, renormalize: true }, balance: 0.01 });
  assert.equal(s.layers, [0, 1, 2], "MixLoRA adapts every layer");
  assert.equal(
    s.experts.filter((e) => e.layer === 0).map((e) => [e.module, e.rank, e.alpha, e.scaling, e.dropout]),
    [
      ["q_proj", 4, 8, 2, 0.05],
      ["v_proj", 4, 8, 2, 0.05],
      ["gate_proj", 2, 6, 3, 0.05],
      ["up_proj", 2, 6, 3, 0.05],
      ["down_proj", 2, 6, 3, 0.05],
    ],
    "attention from r / lora_alpha, the MLP experts from expert_lora",
  );

  const v = loaded.lora.get("2.v_proj")!;
  assert.equal([v.rank, v.scaling], [4, 2]);
  assert.equal(v.a, data("mixlora.layers.2.self_attn.v_proj.lora_A.weight"));
  assert.equal(v.b, data("mixlora.layers.2.self_attn.v_proj.lora_B.weight"));
  assert.equal(loaded.moeRouters!.get("1.ffn"), data("mixlora.layers.1.mlp.moe_gate.weight"));

  // down_proj [out 32, in 48]: A [3 * 2, 48] is the experts' A one after another, B [32, 3 * 2] their B side by side.
  const down = loaded.lora.get("1.down_proj")!;
  assert.equal([down.rank, down.scaling], [6, 3]);
  for (let e = 0; e < 3; e++) {
    const a = data(`mixlora.layers.1.mlp.down_proj.experts.${e}.lora_A.weight`);
    const b = data(`mixlora.layers.1.mlp.down_proj.experts.${e}.lora_B.weight`);
    assert.equal(down.a.slice(e * 2 * 48, (e + 1) * 2 * 48), a, `expert ${e}'s A in rows ${2 * e}..${2 * e + 1}`);
    for (let o = 0; o < 32; o++) {
      for (let j = 0; j < 2; j++) assert.is(down.b[o * 6 + e * 2 + j], b[o * 2 + j], `B[${o}, ${e * 2 + j}] is expert ${e}'s B[${o}, ${j}]`);
    }
  }
  assert.equal(adapterSpecFromPeft(writeMixlora(), base, "carol").moe, s.moe, "adapterSpecFromPeft reads MixLoRA's fields too");
});

test("MixLoRA's legacy names and its 'mixtral' routing strategy load the same adapter", () => {
  const modern = loadAdapter(writeMixlora(), { name: "m", base });
  const legacyConfig = { ...MIX_CONFIG, routing_strategy: "mixtral", target_modules: ["q_proj", "v_proj", "w1_proj", "w3_proj", "w2_proj"] };
  const legacy = loadAdapter(writeMixlora(legacyConfig, mixloraTensors(true)), { name: "m", base });
  assert.equal(legacy.spec.experts, modern.spec.experts);
  assert.equal(legacy.spec.moe, modern.spec.moe);
  assertSameWeights(legacy, modern);
});

test("MixLoRA files with wrong shapes, missing or extra experts are refused naming each tensor", () => {
  const dir = writeMixlora();
  const A = "mixlora.layers.1.mlp.up_proj.experts.2.lora_A.weight";
  const gone = "mixlora.layers.0.mlp.down_proj.experts.1.lora_B.weight";
  const extra = "mixlora.layers.2.mlp.gate_proj.experts.3.lora_A.weight";
  editTensors(dir, (ts) => [
    ...ts.filter((t) => t.name !== gone).map((t) => (t.name === A ? { ...t, shape: [3, 32], data: new Float32Array(96) } : t)),
    { name: extra, dtype: "F32", shape: [2, 32], data: new Float32Array(64) },
  ]);
  const message = refusal(dir);
  assert.match(message, `tensor "${A}" has shape [3, 32], spec expects [2, 32]`);
  assert.match(message, `missing tensor "${gone}" (spec expects [32, 2])`);
  assert.match(message, `unexpected tensor "${extra}" [2, 32] (expert 3, but the spec has num_experts 3 (experts 0 to 2))`);
  assert.match(message, "(3 problems)");

  const noGate = writeMixlora(MIX_CONFIG, mixloraTensors().filter((t) => !t.name.endsWith(".moe_gate.weight")));
  assert.match(refusal(noGate), "the spec routes every token per_ffn over 3 experts but the file holds none of its 3 router tensors");
});

test("MixLoRA configs milora cannot run are refused naming the key", () => {
  const refused = (edit: Record<string, unknown>) => refusal(writeMixlora({ ...MIX_CONFIG, ...edit }));
  assert.match(refused({ routing_strategy: "mixlora-dynamic" }), `"routing_strategy": "mixlora-dynamic" is not supported: it keeps a varying number of experts per token (top-p`);
  assert.match(refused({ routing_strategy: "mixlora-switch" }), `"routing_strategy": "mixlora-switch" is not supported: it is Switch Transformers' top-1 router`);
  assert.match(refused({ routing_strategy: "loramoe" }), `"routing_strategy" must be "mixlora" (or "mixtral", the MixLoRA package's name for the same top-k router), got "loramoe"`);
  assert.match(refused({ use_dora: true }), `"use_dora": true is not supported in a MixLoRA adapter`);
  assert.match(refused({ expert_lora: { r: 2, use_dora: true } }), `"expert_lora.use_dora": true is not supported`);
  assert.match(refused({ act_fn: "gelu" }), `"act_fn": "gelu" is not the MLP activation of base tiny (family llama, silu; accepted: "silu", "swish", or no act_fn)`);
  assert.match(refused({ top_k: 4 }), `"top_k" must be an integer from 1 to num_experts (3), got 4`);
  assert.match(refused({ target_modules: ["q_proj", "v_proj"] }), "names none of gate_proj, up_proj, down_proj, where MixLoRA's experts live");
  // act_fn absent means the base's own activation
  const { act_fn: _, ...noAct } = MIX_CONFIG;
  assert.is(loadAdapter(writeMixlora(noAct), { name: "t", base }).spec.moe?.experts, 3);
});

test("a directory with only adapter_model.bin is refused with how to convert it", () => {
  const dir = freshDir();
  mkdirSync(dir);
  writeFileSync(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(MIX_CONFIG));
  writeFileSync(join(dir, "adapter_model.bin"), "not read");
  const message = refusal(dir);
  assert.match(message, "holds adapter_model.bin (a PyTorch pickle");
  assert.match(message, 'save_file({k: v.contiguous() for k, v in torch.load("adapter_model.bin"');
});

test("a per_ffn spec over a PEFT LoRA directory, or a MixLoRA directory under another spec, says which layouts differ", () => {
  const lora = freshDir();
  writeRandomPeftAdapter(lora, { base, modules: ["q_proj"], rank: 4, alpha: 8, seed: 2 });
  assert.match(refusal(lora, spec("mix")), `the spec routes per_ffn (MixLoRA), whose adapters are in MoE-PEFT's MixLoRA layout ("peft_type": "MIXLORA"), but adapter_config.json has "peft_type": "LORA"`);
  assert.match(refusal(writeMixlora(), spec("molora")), `adapter_config.json describes a MixLoRA adapter ("peft_type": "MIXLORA"), but the spec routes per_module`);
});

// ---- random adapters

test("random moe adapters: storedRank rows, a router per key, router spread set by routerScale", () => {
  const mix = randomAdapter({ spec: spec("mix"), seed: 8 });
  assert.equal([mix.lora.get("1.down_proj")!.rank, mix.lora.get("1.q_proj")!.rank], [16, 4]);
  assert.equal([...mix.moeRouters!.keys()], ["0.ffn", "1.ffn"]);
  assert.is(mix.moeRouters!.get("0.ffn")!.length, 4 * 32);
  const molora = randomAdapter({ spec: spec("molora"), seed: 8 });
  assert.is(molora.moeRouters!.get("2.down_proj")!.length, 4 * 48);
  const wide = randomAdapter({ spec: spec("molora"), seed: 8, routerScale: 8 });
  const gate = molora.moeRouters!.get("0.q_proj")!;
  assert.equal(wide.moeRouters!.get("0.q_proj"), gate.map((x) => 2 * x), "the same draws, twice the spread");
  // logits of a unit-size input about routerScale (4) apart: the weights' standard deviation is 4 / sqrt(32)
  const std = Math.sqrt(gate.reduce((s, x) => s + x * x, 0) / gate.length);
  assert.ok(std > 0.5 && std < 0.9, `router weight spread ${std}`);
  assert.equal(randomAdapter({ spec: spec("mix"), seed: 8 }), mix, "deterministic");
});

test.run();
