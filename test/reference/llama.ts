// The float64 CPU reference of a LLaMA forward pass, Hugging Face semantics, written for clarity:
// the oracle every GPU kernel and the engine are measured against. Full recompute, no KV cache; a
// dynamic rope_scaling's dependence on the forward pass a position ran in is given as `lengths` (rope.ts).
import { readHfConfig } from "../../compiler/hf-config.ts";
import { type BaseModel, type ExpertModule } from "../../compiler/model.ts";
import { openCheckpoint } from "../../runtime/formats/checkpoint.ts";
import { applyRope, generationLengths, inverseFrequencies } from "./rope.ts";

/** Rows of a matrix, one Float64Array per token. */
export type Rows = Float64Array[];

export interface ReferenceWeights {
  get(name: string): Float64Array;
}

/** y = linear(layer, module, x) for every linear module of a block; LoRA and routing wrap this. */
export type LinearFn = (layer: number, module: ExpertModule, x: Rows) => Rows;

/** Weights held in memory, by checkpoint name; a missing name is a bug in the caller, so it throws. */
export function weightsFromMap(map: ReadonlyMap<string, Float64Array>): ReferenceWeights {
  return {
    get(name) {
      const w = map.get(name);
      if (!w) throw new Error(`reference: no weight "${name}"`);
      return w;
    },
  };
}

/** The base model of a HF checkpoint directory and all its weights as float64. */
export function loadReferenceWeights(dir: string): { base: BaseModel; weights: ReferenceWeights } {
  const base = readHfConfig(dir);
  const checkpoint = openCheckpoint(dir);
  try {
    // Every tensor the file holds, whatever the family: the reference asks for its weights by HF name.
    const map = new Map(checkpoint.names().map((name) => [name, Float64Array.from(checkpoint.readF32(name, checkpoint.tensorInfo(name)!.shape))]));
    return { base, weights: weightsFromMap(map) };
  } finally {
    checkpoint.close();
  }
}


/** y = x W^T for W stored [out, in] row-major. */
export function matmulTransposed(x: Rows, w: Float64Array, outFeatures: number): Rows {
  const inFeatures = w.length / outFeatures;
  return x.map((row) => {
    const y = new Float64Array(outFeatures);
    for (let o = 0; o < outFeatures; o++) {
      let sum = 0;
      for (let i = 0; i < inFeatures; i++) sum += row[i]! * w[o * inFeatures + i]!;
      y[o] = sum;
    }
    return y;
  });
}

/** [out, in] of a module's weight. */
export function moduleShape(base: BaseModel, module: ExpertModule): [number, number] {
  const { hiddenSize: h, intermediateSize: ff, heads, kvHeads, headDim: d } = base;
  const shapes: Record<ExpertModule, [number, number]> = {
    q_proj: [heads * d, h],
    k_proj: [kvHeads * d, h],
    v_proj: [kvHeads * d, h],
    o_proj: [h, heads * d],
    gate_proj: [ff, h],
    up_proj: [ff, h],
    down_proj: [h, ff],
  };
  return shapes[module];
}

/** Families whose q/k/v projections have a bias (transformers' Qwen2Attention). */
const QKV_BIAS_FAMILIES = ["qwen2"];

/** A module's Hugging Face name: every family here keeps LLaMA's `self_attn` and `mlp` blocks. */
export function hfModuleName(layer: number, module: ExpertModule): string {
  const block = ["q_proj", "k_proj", "v_proj", "o_proj"].includes(module) ? "self_attn" : "mlp";
  return `model.layers.${layer}.${block}.${module}`;
}

/** The base model's own linear layers (with the q/k/v bias of families that have one). */
export function baseLinear(base: BaseModel, weights: ReferenceWeights): LinearFn {
  return (layer, module, x) => {
    const name = hfModuleName(layer, module);
    const y = matmulTransposed(x, weights.get(`${name}.weight`), moduleShape(base, module)[0]);
    if (!QKV_BIAS_FAMILIES.includes(base.family) || !["q_proj", "k_proj", "v_proj"].includes(module)) return y;
    const bias = weights.get(`${name}.bias`);
    return y.map((row) => row.map((v, i) => v + bias[i]!));
  };
}

export function rmsNorm(x: Rows, weight: Float64Array, eps: number, offset = 0): Rows {
  return x.map((row) => {
    const meanSquare = row.reduce((s, v) => s + v * v, 0) / row.length;
    const scale = 1 / Math.sqrt(meanSquare + eps);
    return row.map((v, i) => v * scale * (offset + weight[i]!));
  });
}

/** A base's RMSNorm: GemmaRMSNorm scales by (1 + weight), LlamaRMSNorm (and Mistral's, Qwen2's) by weight. */
export function baseNorm(base: BaseModel, x: Rows, weight: Float64Array): Rows {
  return rmsNorm(x, weight, base.rmsNormEps, base.family === "gemma" ? 1 : 0);
}

/** The embedding rows of `tokens`; GemmaModel multiplies them by sqrt(hidden_size). */
export function embedTokens(base: BaseModel, weights: ReferenceWeights, tokens: readonly number[]): Rows {
  const embed = weights.get("model.embed_tokens.weight");
  const h = base.hiddenSize;
  const scale = base.family === "gemma" ? Math.sqrt(h) : 1;
  return tokens.map((t) => {
    if (!Number.isInteger(t) || t < 0 || t >= base.vocabSize) throw new Error(`reference: token ${t} outside the vocabulary`);
    return embed.slice(t * h, (t + 1) * h).map((v) => v * scale);
  });
}

/** The final norm and the output head (the embedding itself when tied) on every row. */
export function outputLogits(base: BaseModel, weights: ReferenceWeights, x: Rows): Float64Array[] {
  const final = baseNorm(base, x, weights.get("model.norm.weight"));
  const head = base.tieEmbeddings ? weights.get("model.embed_tokens.weight") : weights.get("lm_head.weight");
  return matmulTransposed(final, head, base.vocabSize);
}

/** transformers' gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))). */
export function geluTanh(x: number): number {
  return 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)));
}

/** Causal self-attention with grouped-query heads over the whole sequence. */
export function causalAttention(base: BaseModel, q: Rows, k: Rows, v: Rows): Rows {
  const { heads, kvHeads, headDim: d } = base;
  // transformers' sliding_window_overlay: query t sees keys s with s > t - window
  const from = (t: number) => (base.slidingWindow === undefined ? 0 : Math.max(0, t - base.slidingWindow + 1));
  const group = heads / kvHeads;
  const head = (row: Float64Array, h: number) => row.subarray(h * d, (h + 1) * d);
  return q.map((qRow, t) => {
    const out = new Float64Array(heads * d);
    for (let h = 0; h < heads; h++) {
      const kvh = Math.floor(h / group);
      const qh = head(qRow, h);
      const scores = k.slice(from(t), t + 1).map((kRow) => dot(qh, head(kRow, kvh)) / Math.sqrt(d));
      const probs = softmax(scores);
      const oh = head(out, h);
      probs.forEach((p, s) => head(v[from(t) + s]!, kvh).forEach((x, i) => (oh[i] = oh[i]! + p * x)));
    }
    return out;
  });
}

function dot(a: Float64Array, b: Float64Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
}

export function softmax(xs: readonly number[]): number[] {
  const max = Math.max(...xs);
  const exps = xs.map((x) => Math.exp(x - max));
  const sum = exps.reduce((a, b) => a + b, 0);
  return exps.map((e) => e / sum);
}

export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

function add(a: Rows, b: Rows): Rows {
  return a.map((row, t) => row.map((x, i) => x + b[t]![i]!));
}

/**
 * One decoder block: pre-norm attention and pre-norm SwiGLU MLP, each with its residual. `lengths[t]`: the
 * sequence length of the forward pass that rotated position t (only dynamic rope scaling reads it;
 * default: one forward over all of x).
 */
export function decoderLayer(base: BaseModel, weights: ReferenceWeights, linear: LinearFn, layer: number, x: Rows, lengths?: readonly number[]): Rows {
  const p = `model.layers.${layer}`;
  const { headDim: d } = base;
  const normed = baseNorm(base, x, weights.get(`${p}.input_layernorm.weight`));
  const q = linear(layer, "q_proj", normed);
  const k = linear(layer, "k_proj", normed);
  const v = linear(layer, "v_proj", normed);
  const inv = (pos: number) => inverseFrequencies(base, lengths?.[pos] ?? x.length);
  q.forEach((row, pos) => {
    for (let h = 0; h < base.heads; h++) applyRope(row.subarray(h * d, (h + 1) * d), pos, inv(pos));
  });
  k.forEach((row, pos) => {
    for (let h = 0; h < base.kvHeads; h++) applyRope(row.subarray(h * d, (h + 1) * d), pos, inv(pos));
  });
  const attended = add(x, linear(layer, "o_proj", causalAttention(base, q, k, v)));

  const normed2 = baseNorm(base, attended, weights.get(`${p}.post_attention_layernorm.weight`));
  const gate = linear(layer, "gate_proj", normed2);
  const up = linear(layer, "up_proj", normed2);
  // SwiGLU, or GemmaMLP's GeGLU
  const act = base.family === "gemma" ? geluTanh : silu;
  const hidden = gate.map((g, t) => g.map((x, i) => act(x) * up[t]![i]!));
  return add(attended, linear(layer, "down_proj", hidden));
}

/** Logits for every position of `tokens` (one row of vocabSize per token); `lengths` as decoderLayer's. */
export function referenceLogits(
  base: BaseModel,
  weights: ReferenceWeights,
  tokens: readonly number[],
  linear: LinearFn = baseLinear(base, weights),
  lengths?: readonly number[],
): Float64Array[] {
  let x = embedTokens(base, weights, tokens);
  for (let layer = 0; layer < base.layers; layer++) x = decoderLayer(base, weights, linear, layer, x, lengths);
  return outputLogits(base, weights, x);
}

/** Greedy decoding by full recompute: the `maxNew` argmax tokens that follow the prompt (as generate runs it: the prompt in one forward, then one per token). */
export function referenceGreedy(
  base: BaseModel,
  weights: ReferenceWeights,
  prompt: readonly number[],
  maxNew: number,
  linear: LinearFn = baseLinear(base, weights),
): number[] {
  const tokens = [...prompt];
  for (let i = 0; i < maxNew; i++) {
    const logits = referenceLogits(base, weights, tokens, linear, generationLengths(prompt.length, tokens.length)).at(-1)!;
    tokens.push(argmax(logits));
  }
  return tokens.slice(prompt.length);
}

/** Index of the largest value; the first on ties, as torch.argmax. */
export function argmax(xs: Float64Array): number {
  let best = 0;
  for (let i = 1; i < xs.length; i++) if (xs[i]! > xs[best]!) best = i;
  return best;
}
