import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { BaseModel } from "../../compiler/model.ts";
import { randomCheckpointBase, randomWeights, seededNormal, writeRandomCheckpoint, type RandomCheckpointOptions } from "../../examples/random-checkpoint.ts";
import {
  argmax,
  causalAttention,
  loadReferenceWeights,
  referenceGreedy,
  referenceLogits,
  weightsFromMap,
  type ReferenceWeights,
} from "./llama.ts";
import { applyRope, inverseFrequencies } from "./rope.ts";

const root = mkdtempSync(join(tmpdir(), "milora-reference-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

const oneLayer: RandomCheckpointOptions = { hiddenSize: 8, layers: 1, heads: 2, kvHeads: 1, intermediateSize: 12, vocabSize: 10, seed: 21 };

function model(o: RandomCheckpointOptions): { base: BaseModel; map: Map<string, Float64Array>; weights: ReferenceWeights } {
  const base = randomCheckpointBase(o);
  const map = new Map(randomWeights(base, o.seed).map((t) => [t.name, Float64Array.from(t.data)]));
  return { base, map, weights: weightsFromMap(map) };
}

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.is(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

// ---- a direct, loop-by-loop formula for one token, written apart from the reference ----
function matVec(w: Float64Array, x: number[]): number[] {
  const rows = w.length / x.length;
  const y: number[] = [];
  for (let r = 0; r < rows; r++) {
    let s = 0;
    for (let c = 0; c < x.length; c++) s += w[r * x.length + c]! * x[c]!;
    y.push(s);
  }
  return y;
}
function norm(x: number[], w: Float64Array, eps: number): number[] {
  const rms = Math.sqrt(x.reduce((s, v) => s + v * v, 0) / x.length + eps);
  return x.map((v, i) => (v / rms) * w[i]!);
}

test("one token: attention is the v vector, so the layer is a formula in the weights", () => {
  const { base, map, weights } = model(oneLayer);
  const w = (n: string) => map.get(n)!;
  const token = 7;
  const e = [...w("model.embed_tokens.weight").slice(token * 8, token * 8 + 8)];
  const v = matVec(w("model.layers.0.self_attn.v_proj.weight"), norm(e, w("model.layers.0.input_layernorm.weight"), base.rmsNormEps));
  // 2 query heads share the single kv head: the attention output is v repeated per head.
  const attn = [...v, ...v];
  const x1 = e.map((x, i) => x + matVec(w("model.layers.0.self_attn.o_proj.weight"), attn)[i]!);
  const n2 = norm(x1, w("model.layers.0.post_attention_layernorm.weight"), base.rmsNormEps);
  const g = matVec(w("model.layers.0.mlp.gate_proj.weight"), n2);
  const u = matVec(w("model.layers.0.mlp.up_proj.weight"), n2);
  const act = g.map((x, i) => (x / (1 + Math.exp(-x))) * u[i]!);
  const x2 = x1.map((x, i) => x + matVec(w("model.layers.0.mlp.down_proj.weight"), act)[i]!);
  const expected = matVec(w("lm_head.weight"), norm(x2, w("model.norm.weight"), base.rmsNormEps));

  const [logits] = referenceLogits(base, weights, [token]);
  assert.ok(maxDiff(logits!, expected) < 1e-12);
  assert.ok(Math.max(...expected) - Math.min(...expected) > 0.1, "random logits differ from each other");
});

test("attention weighs v by the softmax of scaled scores, over visible tokens only", () => {
  const oneHead = { ...model(oneLayer).base, heads: 1, kvHeads: 1, headDim: 2 };
  // Scores at position 1: [0, ln 3 * sqrt 2 / sqrt 2] -> probabilities [1/4, 3/4].
  const q = [Float64Array.from([1, 0]), Float64Array.from([1, 0])];
  const k = [Float64Array.from([0, 0]), Float64Array.from([Math.log(3) * Math.sqrt(2), 0])];
  const v = [Float64Array.from([4, 8]), Float64Array.from([-4, 0])];
  const out = causalAttention(oneHead, q, k, v);
  assert.ok(maxDiff(out[0]!, [4, 8]) < 1e-15, "position 0 sees only itself");
  assert.ok(maxDiff(out[1]!, [0.25 * 4 + 0.75 * -4, 0.25 * 8]) < 1e-12);

  // Zero queries: uniform weights, so each query head gets the mean of its kv head's values so far.
  const gqa = { ...oneHead, heads: 2, kvHeads: 1 };
  const zeros = [new Float64Array(4), new Float64Array(4), new Float64Array(4)];
  const values = [Float64Array.from([1, 2]), Float64Array.from([3, 4]), Float64Array.from([8, 0])];
  const mean = causalAttention(gqa, zeros, values.map((x) => x.map(() => 1)), values);
  assert.ok(maxDiff(mean[2]!, [4, 2, 4, 2]) < 1e-12);
});

test("rotary embedding: identity at position 0, a rotation of each (i, i + d/2) pair, relative in positions", () => {
  const normal = seededNormal(2);
  const q = Float64Array.from({ length: 8 }, normal);
  const k = Float64Array.from({ length: 8 }, normal);
  const at = (v: Float64Array, pos: number) => {
    const out = v.slice();
    applyRope(out, pos, inverseFrequencies({ headDim: v.length, ropeTheta: 10000 }, 1));
    return out;
  };
  assert.equal(at(q, 0), q);
  // d = 2: inv_freq = 1, so position p rotates (a, b) by angle p.
  const pair = at(Float64Array.from([1, 2]), 3);
  assert.ok(maxDiff(pair, [Math.cos(3) - 2 * Math.sin(3), 2 * Math.cos(3) + Math.sin(3)]) < 1e-15);
  // The second pair of a d = 8 vector turns at theta^(-2/8).
  const turned = at(q, 5);
  const angle = 5 * 10000 ** (-2 / 8);
  assert.ok(Math.abs(turned[1]! - (q[1]! * Math.cos(angle) - q[5]! * Math.sin(angle))) < 1e-12);
  const dot = (a: Float64Array, b: Float64Array) => a.reduce((s, x, i) => s + x * b[i]!, 0);
  assert.ok(Math.abs(dot(at(q, 7), at(k, 4)) - dot(at(q, 3), at(k, 0))) < 1e-12, "scores depend on the distance only");
});

test("grouped-query attention equals multi-head attention with the kv heads repeated", () => {
  const gqa = model({ ...oneLayer, layers: 2, heads: 4, kvHeads: 2, hiddenSize: 16, headDim: 4 });
  const mhaBase: BaseModel = { ...gqa.base, kvHeads: 4 };
  const mha = new Map(gqa.map);
  for (let layer = 0; layer < 2; layer++) {
    for (const m of ["k_proj", "v_proj"]) {
      const name = `model.layers.${layer}.self_attn.${m}.weight`;
      const w = gqa.map.get(name)!; // [2 kv heads * 4, 16]
      const rows = (h: number) => w.subarray(h * 4 * 16, (h + 1) * 4 * 16);
      // Query heads 0,1 use kv head 0; heads 2,3 use kv head 1.
      const repeated = new Float64Array(4 * 4 * 16);
      [0, 0, 1, 1].forEach((kvh, h) => repeated.set(rows(kvh), h * 4 * 16));
      mha.set(name, repeated);
    }
  }
  const tokens = [1, 4, 9, 2, 7];
  const a = referenceLogits(gqa.base, gqa.weights, tokens);
  const b = referenceLogits(mhaBase, weightsFromMap(mha), tokens);
  a.forEach((row, t) => assert.ok(maxDiff(row, b[t]!) < 1e-12, `position ${t}`));
});

test("attention is causal: a position's logits ignore later tokens", () => {
  const { base, weights } = model({ ...oneLayer, layers: 2 });
  const a = referenceLogits(base, weights, [1, 2, 3, 4]);
  const b = referenceLogits(base, weights, [1, 2, 8, 9]);
  assert.ok(maxDiff(a[1]!, b[1]!) < 1e-15);
  assert.ok(maxDiff(a[2]!, b[2]!) > 1e-6);
});

test("tied embeddings use the embedding matrix as the output head", () => {
  const untied = model(oneLayer);
  const tiedBase: BaseModel = { ...untied.base, tieEmbeddings: true };
  const tied = new Map(untied.map);
  tied.delete("lm_head.weight");
  const asHead = new Map(untied.map).set("lm_head.weight", untied.map.get("model.embed_tokens.weight")!);
  const tokens = [2, 6, 6];
  const a = referenceLogits(tiedBase, weightsFromMap(tied), tokens);
  const b = referenceLogits(untied.base, weightsFromMap(asHead), tokens);
  a.forEach((row, t) => assert.ok(maxDiff(row, b[t]!) < 1e-15));
});

test("a checkpoint on disk gives the in-memory model's logits, and greedy decoding follows the argmax", () => {
  const o: RandomCheckpointOptions = { ...oneLayer, layers: 2, vocabSize: 32, dtype: "F32" };
  const dir = join(root, "disk");
  writeRandomCheckpoint(dir, o);
  const loaded = loadReferenceWeights(dir);
  const memory = model(o);
  const prompt = [1, 17, 30];
  const a = referenceLogits(loaded.base, loaded.weights, prompt);
  a.forEach((row, t) => assert.ok(maxDiff(row, referenceLogits(memory.base, memory.weights, prompt)[t]!) === 0));
  const out = referenceGreedy(loaded.base, loaded.weights, prompt, 4);
  assert.is(out.length, 4);
  assert.is(out[0], argmax(a.at(-1)!));
  assert.is(out[3], argmax(referenceLogits(loaded.base, loaded.weights, [...prompt, ...out.slice(0, 3)]).at(-1)!));
});

test.run();
