// DoRA adapters in the engine against the float64 reference (test/reference/dora.ts: W' = m V / ||V||_row,
// V = W + s B A): a PEFT DoRA adapter written here in PEFT's own layout, loaded from its directory (logits
// of every position, prompt and greedy decode); MiLoRA routing over DoRA modules; a batch mixing DoRA,
// LoRA, routed DoRA and base sequences; merged mode; weights split into row blocks; and the refusals.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../../compiler/hf-config.ts";
import { ROUTER_DEFAULTS } from "../../../compiler/defaults.ts";
import { EXPERT_MODULES, type Adapter, type ExpertModule } from "../../../compiler/model.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { mulberry32, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { loadAdapter, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { writeSafetensors, type TensorToWrite } from "../../../runtime/formats/safetensors.ts";
import { acquireDevice, type GpuContext } from "../../../runtime/gpu/device.ts";
import { Engine } from "../../../runtime/engine/engine.ts";
import { AdapterStoreError } from "../../../runtime/engine/tenants.ts";
import { plannedEngine } from "../../../bin/engine-plan.ts";
import { argmax, hfModuleName, loadReferenceWeights, moduleShape, referenceLogits } from "../../reference/llama.ts";
import { foldLora, referenceMiloraLogits } from "../../reference/milora.ts";

// As for LoRA (milora.test.ts): f32 on the GPU against float64, relative error (Frobenius norm over
// every position) below 1e-5 of the logits' norm. The DoRA factors are float64 rounded to f32 once.
const BOUND = 1e-5;
const TINY = { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 97, maxPositions: 64, seed: 11 } as const;
const PROMPT = [5, 17, 3, 88, 42, 9, 60, 1, 33, 70, 12];
const MAX_TOKENS = 5;

const root = mkdtempSync(join(tmpdir(), "milora-dora-"));
const checkpointDir = join(root, "tiny");
writeRandomCheckpoint(checkpointDir, TINY);
const { base, weights } = loadReferenceWeights(checkpointDir);
const baseWeight = (layer: number, module: ExpertModule) => Float32Array.from(weights.get(`${hfModuleName(layer, module)}.weight`));
let gpu: GpuContext;
let engine: Engine;

test.before(async () => {
  gpu = await acquireDevice();
  engine = await Engine.load(plannedEngine({ base: readHfConfig(checkpointDir), checkpointDir, gpu, ctx: 64, maxSequences: 6, maxAdapters: 4, maxLoraRank: 8 }));
});
test.after(() => {
  engine.destroy();
  gpu.destroy();
  rmSync(root, { recursive: true, force: true });
});

/**
 * Writes a DoRA adapter as PEFT's save_pretrained does for LoraConfig(r, lora_alpha, target_modules,
 * use_dora=True): adapter_config.json, and per module `base_model.model.<module path>.lora_A.weight`
 * [r, in], `.lora_B.weight` [out, r] and `.lora_magnitude_vector` [out]. B is not zero (a trained
 * adapter's), and m is ||W + s B A||_row (PEFT's initial value) moved by up to 20% per row, so the
 * factors m / ||W + s B A|| differ from 1 as after training.
 */
function writePeftDora(dir: string, modules: readonly ExpertModule[], r: number, alpha: number, seed: number): void {
  const random = mulberry32(seed);
  const uniform = (n: number, scale: number) => Float32Array.from({ length: n }, () => (random() * 2 - 1) * scale);
  const s = alpha / r;
  const tensors: TensorToWrite[] = [];
  for (let layer = 0; layer < base.layers; layer++) {
    for (const module of modules) {
      const [out, inF] = moduleShape(base, module);
      const a = uniform(r * inF, 1 / Math.sqrt(inF));
      const b = uniform(out * r, 0.3 / (s * Math.sqrt(r)));
      const w = weights.get(`${hfModuleName(layer, module)}.weight`);
      const m = new Float32Array(out);
      for (let o = 0; o < out; o++) {
        let sum = 0;
        for (let i = 0; i < inF; i++) {
          let ba = 0;
          for (let j = 0; j < r; j++) ba += b[o * r + j]! * a[j * inF + i]!;
          sum += (w[o * inF + i]! + s * ba) ** 2;
        }
        m[o] = Math.sqrt(sum) * (1 + 0.2 * (random() * 2 - 1));
      }
      const path = `base_model.model.${hfModuleName(layer, module)}`;
      tensors.push(
        { name: `${path}.lora_A.weight`, dtype: "F32", shape: [r, inF], data: a },
        { name: `${path}.lora_B.weight`, dtype: "F32", shape: [out, r], data: b },
        { name: `${path}.lora_magnitude_vector`, dtype: "F32", shape: [out], data: m },
      );
    }
  }
  mkdirSync(dir, { recursive: true });
  const config = {
    peft_type: "LORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: "tiny",
    r,
    lora_alpha: alpha,
    lora_dropout: 0.05,
    target_modules: modules,
    use_dora: true,
    use_rslora: false,
    bias: "none",
    fan_in_fan_out: false,
    inference_mode: true,
  };
  writeFileSync(join(dir, "adapter_config.json"), JSON.stringify(config, null, 2));
  writeSafetensors(join(dir, "adapter_model.safetensors"), tensors, { format: "pt" });
}

/** A random DoRA adapter of `modules` (rank 8, alpha 16), routed when `router` is given. */
function randomDora(name: string, seed: number, modules: readonly ExpertModule[] = EXPERT_MODULES, router?: Adapter["router"]): LoadedAdapter {
  const spec: Adapter = { ...peftSpec({ base, modules, rank: 8, alpha: 16, dora: true, seed: 0, name }), ...(router ? { router } : {}) };
  return randomAdapter({ spec, seed, baseWeight });
}

const ROUTED = { ...ROUTER_DEFAULTS, noise: false, balance: 0.01, pooling: "mean" } as const;

/** One sequence's run: the logits of every position it ran, and the greedy tokens (the last one never fed back). */
interface Run {
  readonly logits: Float32Array[];
  readonly tokens: number[];
}

/**
 * Prefills the prompts in one batch (logits of every position), then decodes `steps` greedy tokens for
 * all of them together, each step one row per sequence: tenants mixed in every step.
 */
async function runBatch(on: Engine, requests: readonly { readonly prompt: readonly number[]; readonly adapter?: string }[], steps: number): Promise<Run[]> {
  const seqs = requests.map((r) => on.createSequence(r.prompt, { ...(r.adapter ? { adapter: r.adapter } : {}), logits: "all" }));
  try {
    const first = await on.prefill(seqs);
    const runs = seqs.map((s) => ({ logits: [...first.get(s)!.logits!], tokens: [first.get(s)!.token] }));
    for (const s of seqs) s.logits = "last";
    for (let step = 0; step < steps; step++) {
      seqs.forEach((s, i) => s.append([runs[i]!.tokens.at(-1)!]));
      const out = await on.decode(seqs);
      seqs.forEach((s, i) => {
        runs[i]!.logits.push(out.get(s)!.logits![0]!);
        runs[i]!.tokens.push(out.get(s)!.token);
      });
    }
    return runs;
  } finally {
    for (const s of seqs) on.release(s);
  }
}

async function runOne(on: Engine, prompt: readonly number[], adapter: string | undefined, steps = MAX_TOKENS): Promise<Run> {
  return (await runBatch(on, [{ prompt, ...(adapter ? { adapter } : {}) }], steps))[0]!;
}

/**
 * The logits of every position (prompt and each decode step) against the reference over prompt +
 * generated (the base model's without an adapter), and the greedy tokens.
 */
function assertMatchesReference(got: Run, adapter: LoadedAdapter | undefined, prompt: readonly number[], what: string): void {
  const fed = got.tokens.slice(0, -1);
  const want = adapter ? referenceMiloraLogits(base, weights, adapter, prompt, fed).logits : referenceLogits(base, weights, [...prompt, ...fed]);
  assert.is(got.logits.length, prompt.length + fed.length, `${what}: logits rows`);
  const err = relativeError(got.logits, want);
  assert.ok(err < BOUND, `${what}: relative error ${err.toExponential(2)} >= ${BOUND}`);
  got.tokens.forEach((token, i) => {
    const row = want[prompt.length - 1 + i]!;
    const [first, second] = [...row].sort((x, y) => y - x);
    // where the two best logits are within 1e-3, f32 may pick either
    if (first! - second! > 1e-3) assert.is(token, argmax(row), `${what}: generated token ${i}`);
  });
}

function relativeError(got: readonly Float32Array[], want: readonly Float64Array[]): number {
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => row.forEach((w, i) => ((diff += (got[r]![i]! - w) ** 2), (norm += w * w))));
  return Math.sqrt(diff / norm);
}

test("a PEFT DoRA adapter loaded from its directory: logits of every position and greedy decode match the float64 DoRA reference", async () => {
  const dir = join(root, "peft-dora");
  writePeftDora(dir, EXPERT_MODULES, 8, 16, 3);
  const adapter = loadAdapter(dir, { name: "dora", base });
  engine.loadAdapter("dora", dir);
  try {
    const got = await runOne(engine, PROMPT, "dora");
    assertMatchesReference(got, adapter, PROMPT, "PEFT DoRA");
    // DoRA is not LoRA: the same A and B without the magnitudes give other logits
    const plain: LoadedAdapter = { ...adapter, spec: { ...adapter.spec, experts: adapter.spec.experts.map(({ dora: _, ...e }) => e) }, lora: new Map([...adapter.lora].map(([k, { magnitude: _, ...w }]) => [k, w])) };
    const lora = referenceMiloraLogits(base, weights, plain, PROMPT).logits;
    const gap = relativeError(got.logits.slice(0, PROMPT.length), lora);
    assert.ok(gap > 100 * BOUND, `the magnitudes change the logits (by ${gap.toExponential(2)})`);
  } finally {
    engine.unloadAdapter("dora");
  }
});

test("MiLoRA over DoRA modules (MiDoRA): each gate scales its module's DoRA change of the base, prompt and token routing", async () => {
  for (const [i, router] of [ROUTED, { ...ROUTED, when: "token" as const, selection: { rule: "top_k" as const, k: 3, renormalize: false } }].entries()) {
    const adapter = randomDora(`midora${i}`, 20 + i, EXPERT_MODULES, router);
    engine.loadAdapter(adapter.name, adapter);
    try {
      assertMatchesReference(await runOne(engine, PROMPT, adapter.name), adapter, PROMPT, `MiDoRA when ${router.when}`);
    } finally {
      engine.unloadAdapter(adapter.name);
    }
  }
});

test("a batch of a DoRA tenant, a LoRA tenant, a routed DoRA tenant and the base gives each sequence what it gives alone, and the reference's", async () => {
  const dora = randomDora("d", 31, ["q_proj", "v_proj", "o_proj", "down_proj"]);
  const lora = randomAdapter({ spec: peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name: "l" }), seed: 32 });
  const routed = randomDora("r", 33, EXPERT_MODULES, ROUTED);
  const tenants = [dora, lora, routed];
  for (const a of tenants) engine.loadAdapter(a.name, a);
  const requests = [
    { prompt: PROMPT, adapter: "d" },
    { prompt: [40, 2, 7], adapter: "l" },
    { prompt: [9, 9, 9, 31], adapter: "r" },
    { prompt: [40, 2, 7] },
    { prompt: [3, 14, 15, 92, 65], adapter: "d" },
  ];
  try {
    const alone: Run[] = [];
    for (const r of requests) alone.push(await runOne(engine, r.prompt, r.adapter));
    const together = await runBatch(engine, requests, MAX_TOKENS);
    together.forEach((got, i) => {
      const r = requests[i]!;
      assert.equal(got.tokens, alone[i]!.tokens, `request ${i}: tokens`);
      const err = relativeError(got.logits, alone[i]!.logits.map((row) => Float64Array.from(row)));
      assert.ok(err < 1e-5, `request ${i}: batched against alone, relative error ${err.toExponential(2)}`);
      assertMatchesReference(got, tenants.find((a) => a.name === r.adapter), r.prompt, `request ${i}`);
    });
  } finally {
    for (const a of tenants) engine.unloadAdapter(a.name);
  }
});

test("merged mode folds W + g (d (W + s B A) - W): merged logits equal unmerged ones (plain and routed DoRA), and unmerging restores the base", async () => {
  for (const adapter of [randomDora("md", 41), randomDora("mr", 42, EXPERT_MODULES, ROUTED)]) {
    engine.loadAdapter(adapter.name, adapter);
    try {
      const before = (await runOne(engine, PROMPT, undefined, 0)).logits;
      const routing = adapter.spec.router ? (await engine.generate({ prompt: PROMPT, maxTokens: 1, adapter: adapter.name })).routing : undefined;
      const unmerged = await runOne(engine, PROMPT, adapter.name);
      await engine.mergeAdapter(adapter.name, routing);
      const merged = await runOne(engine, PROMPT, undefined);
      assert.equal(merged.tokens, unmerged.tokens, `${adapter.name}: tokens`);
      const err = relativeError(merged.logits, unmerged.logits.map((row) => Float64Array.from(row)));
      assert.ok(err < BOUND, `${adapter.name}: merged against unmerged, relative error ${err.toExponential(2)}`);
      // and the reference's folded weights give the same logits as the reference's unmerged DoRA
      if (!adapter.spec.router) {
        const folded = referenceLogits(base, foldLora(weights, adapter), PROMPT);
        const ref = referenceMiloraLogits(base, weights, adapter, PROMPT).logits;
        assert.ok(relativeError(folded.map((row) => Float32Array.from(row)), ref) < 1e-6, "reference fold");
      }
      await engine.unmergeAdapter();
      assert.equal((await runOne(engine, PROMPT, undefined, 0)).logits, before, `${adapter.name}: base restored`);
    } finally {
      await engine.unmergeAdapter();
      engine.unloadAdapter(adapter.name);
    }
  }
});

test("weights split into row blocks: a DoRA tenant over split gate/up/down_proj (down_proj with its residual) matches the reference", async () => {
  const split = await Engine.load(plannedEngine({ base, checkpointDir, gpu, ctx: 64, maxSequences: 1, maxAdapters: 1, maxLoraRank: 8, maxBindingBytes: 20_000 }));
  try {
    const adapter = randomDora("split", 51);
    split.loadAdapter(adapter.name, adapter);
    assertMatchesReference(await runOne(split, PROMPT, adapter.name, 3), adapter, PROMPT, "split");
  } finally {
    split.destroy();
  }
});

test("refusals: a DoRA module without its magnitude, and a row of W + s B A that is all zeros (its factor would be infinite)", () => {
  const adapter = randomDora("bad", 61, ["q_proj"]);
  const noMagnitude: LoadedAdapter = { ...adapter, lora: new Map([...adapter.lora].map(([k, { magnitude: _, ...w }]) => [k, w])) };
  assert.throws(() => engine.loadAdapter("bad", noMagnitude), (e: unknown) => e instanceof AdapterStoreError && /layer 0 q_proj is DoRA but has no magnitude vector of 64 values/.test((e as Error).message));
  // Row 5 of layer 1's q_proj: A's first row is W[5], B[5] = (-1/s, 0, ...) with s = 2, so W + s B A is 0 there exactly.
  const inF = moduleShape(base, "q_proj")[1];
  const w = baseWeight(1, "q_proj");
  const q1 = adapter.lora.get("1.q_proj")!;
  const a = Float32Array.from(q1.a);
  a.set(w.subarray(5 * inF, 6 * inF), 0);
  const b = Float32Array.from(q1.b);
  b.fill(0, 5 * 8, 6 * 8);
  b[5 * 8] = -0.5;
  assert.is(q1.scaling, 2);
  const zeroRow: LoadedAdapter = { ...adapter, lora: new Map([...adapter.lora, ["1.q_proj", { ...q1, a, b }]]) };
  assert.throws(() => engine.loadAdapter("zero", zeroRow), /adapter zero, layer 1 q_proj: output row 5 of W \+ scaling \* B A is all zeros/);
  assert.equal(engine.adapters(), []);
});

test.run();
