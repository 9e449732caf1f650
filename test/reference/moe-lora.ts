// The float64 CPU reference of the two per-token Mixture-of-LoRA baselines (compiler/model.ts
// MoeRouting), built on the LLaMA reference and written from the math, not from any kernel:
//   per_module (MOELoRA / MoLoRA): every enabled module has its own router over E experts that split
//     its rank-r LoRA into E slices of rank r/E (expert e owns ranks e*r/E .. (e+1)*r/E - 1);
//     y = W x + s * sum_j g_{e(j)} B[:, j] (A[j, :] . x), routed per token on the module's own input.
//   per_ffn (MixLoRA, as TUDB-Labs MixLoRA / MoE-PEFT compute it): one router per layer on the MLP's
//     input u; E full feed-forward passes, expert e with its own rank-r LoRA on each adapted MLP module
//     (stacked in the weights as one rank-E*r LoRA), mixed as sum over kept e of g_e * FFN_e(u); the
//     attention modules are plain LoRA.
// Selection over one token's router logits z: p = softmax(z); top_k keeps the K largest p (ties to the
// lower index), at p_e or p_e / sum(kept p) (renormalize); dense keeps every p. Full recompute, no KV cache.
import { EXPERT_MODULES, FFN_MODULES, storedRank, type BaseModel, type ExpertModule, type MoeRouting } from "../../compiler/model.ts";
import { loraKey, moeRouterKey, type LoadedAdapter, type LoraWeights } from "../../runtime/formats/adapter.ts";
import { generationLengths } from "./rope.ts";
import {
  argmax,
  baseLinear,
  baseNorm,
  decoderLayer,
  embedTokens,
  geluTanh,
  matmulTransposed,
  moduleShape,
  outputLogits,
  silu,
  softmax,
  type LinearFn,
  type ReferenceWeights,
  type Rows,
} from "./llama.ts";

/** One router's choice for one token. */
export interface MoeSelection {
  /** The kept experts, most probable first (equal probabilities: the lower index first). */
  readonly experts: number[];
  /** The gate of each kept expert, in the order of `experts`. */
  readonly gates: number[];
  /** p = softmax(z) over all E experts. */
  readonly probabilities: number[];
  /**
   * How far the choice is from a tie: p of the last kept expert minus p of the most probable dropped
   * one (top_k with K < E); Infinity when every expert is kept. A GPU result may pick differently
   * where this is within its rounding.
   */
  readonly margin: number;
}

/** One routing decision of a per-token baseline. */
export interface MoeDecision extends MoeSelection {
  readonly layer: number;
  /** The routed module (per_module) or the layer's feed-forward block (per_ffn). */
  readonly at: ExpertModule | "ffn";
  /** The token position. */
  readonly position: number;
  /** The router's logits z = W x (E of them). */
  readonly logits: number[];
}

export interface MoeResult {
  /** One row of vocabSize logits per position. */
  readonly logits: Float64Array[];
  /**
   * Every routing decision: by layer, then module in EXPERT_MODULES order (per_module; per_ffn has one
   * "ffn" decision per layer that has its router), then position.
   */
  readonly experts: MoeDecision[];
}

/** The selection of compiler/model.ts MoeRouting over one token's router logits z. */
export function moeSelect(z: readonly number[], selection: MoeRouting["selection"]): MoeSelection {
  const E = z.length;
  const p = softmax([...z]);
  const order = p.map((_, i) => i).sort((a, b) => p[b]! - p[a]! || a - b);
  if (selection.rule === "dense") return { experts: order, gates: order.map((e) => p[e]!), probabilities: p, margin: Infinity };
  const { k, renormalize } = selection;
  if (!Number.isInteger(k) || k < 1 || k > E) throw new Error(`reference: top_k ${k} of ${E} experts`);
  const experts = order.slice(0, k);
  const kept = experts.reduce((s, e) => s + p[e]!, 0);
  const gates = experts.map((e) => (renormalize ? p[e]! / kept : p[e]!));
  const margin = k === E ? Infinity : p[order[k - 1]!]! - p[order[k]!]!;
  return { experts, gates, probabilities: p, margin };
}

/** z = W x for a router W [E, in] row-major. */
function routerLogits(router: Float32Array, x: Float64Array, experts: number, where: string): number[] {
  if (router.length !== experts * x.length) throw new Error(`reference: router ${where} has ${router.length} values, expected ${experts} x ${x.length}`);
  return Array.from(matmulTransposed([x], Float64Array.from(router), experts)[0]!);
}

/** A module's LoRA as float64, its shapes checked against the module's and the spec's stored rank. */
interface Lora {
  readonly a: Float64Array;
  readonly b: Float64Array;
  readonly rank: number;
  readonly scaling: number;
  readonly out: number;
  readonly in: number;
}

function loraOf(base: BaseModel, adapter: LoadedAdapter, layer: number, module: ExpertModule): Lora | undefined {
  const w: LoraWeights | undefined = adapter.lora.get(loraKey(layer, module));
  if (!w) return undefined;
  const where = `layer ${layer} ${module}`;
  if (w.magnitude) throw new Error(`reference: ${where} is DoRA, which a per-token Mixture-of-LoRA adapter cannot have`);
  const [out, inF] = moduleShape(base, module);
  if (w.a.length !== w.rank * inF || w.b.length !== out * w.rank) {
    throw new Error(`reference: ${where}: A has ${w.a.length} values and B ${w.b.length}, expected [${w.rank}, ${inF}] and [${out}, ${w.rank}]`);
  }
  const slot = adapter.spec.experts.find((e) => e.layer === layer && e.module === module);
  if (slot && storedRank(adapter.spec, slot) !== w.rank) throw new Error(`reference: ${where} holds rank ${w.rank}, the spec stores rank ${storedRank(adapter.spec, slot)}`);
  return { a: Float64Array.from(w.a), b: Float64Array.from(w.b), rank: w.rank, scaling: w.scaling, out, in: inF };
}

/**
 * y += s * sum_{j in [from, to)} c(j) * B[:, j] (A[j, :] . x): the LoRA update of ranks from .. to - 1,
 * rank j weighted by c(j) (a rank with c(j) = 0 is skipped).
 */
function addLoraUpdate(y: Float64Array, w: Lora, x: Float64Array, from: number, to: number, c: (j: number) => number): void {
  for (let j = from; j < to; j++) {
    const weight = c(j);
    if (weight === 0) continue;
    let ax = 0;
    for (let i = 0; i < w.in; i++) ax += w.a[j * w.in + i]! * x[i]!;
    const scale = w.scaling * weight * ax;
    for (let o = 0; o < w.out; o++) y[o] = y[o]! + scale * w.b[o * w.rank + j]!;
  }
}

/** Plain LoRA on every module the adapter has weights for: y = W x + s B (A x). */
function plainLoraLinear(base: BaseModel, weights: ReferenceWeights, adapter: LoadedAdapter): LinearFn {
  const plain = baseLinear(base, weights);
  return (layer, module, x) => {
    const y = plain(layer, module, x);
    const w = loraOf(base, adapter, layer, module);
    if (w) x.forEach((row, t) => addLoraUpdate(y[t]!, w, row, 0, w.rank, () => 1));
    return y;
  };
}

/** per_module: each module with LoRA routes every row (token) on that row, and weighs rank j by g_{e(j)}. */
function perModuleLinear(base: BaseModel, weights: ReferenceWeights, adapter: LoadedAdapter, moe: MoeRouting, record: (d: MoeDecision) => void): LinearFn {
  const plain = baseLinear(base, weights);
  const E = moe.experts;
  return (layer, module, x) => {
    const y = plain(layer, module, x);
    const w = loraOf(base, adapter, layer, module);
    if (!w) return y;
    const router = adapter.moeRouters?.get(moeRouterKey(layer, module));
    if (!router) throw new Error(`reference: layer ${layer} ${module} has LoRA weights but no per_module router`);
    if (w.rank % E !== 0) throw new Error(`reference: layer ${layer} ${module}: rank ${w.rank} does not split into ${E} experts`);
    const perExpert = w.rank / E;
    x.forEach((row, position) => {
      const logits = routerLogits(router, row, E, `${layer}.${module}`);
      const choice = moeSelect(logits, moe.selection);
      record({ layer, at: module, position, logits, ...choice });
      const gate = new Float64Array(E);
      choice.experts.forEach((e, i) => (gate[e] = choice.gates[i]!));
      addLoraUpdate(y[position]!, w, row, 0, w.rank, (j) => gate[Math.floor(j / perExpert)]!);
    });
    return y;
  };
}

/**
 * per_ffn: one decoder layer. Attention with plain LoRA (decoderLayer, its MLP zeroed), then the
 * mixture of E feed-forward experts on the MLP input u (the post-attention RMSNorm output):
 * G_e = Wg u + s Bg_e Ag_e u, U_e = Wu u + s Bu_e Au_e u, H_e = act(G_e) * U_e,
 * D_e = Wd H_e + s Bd_e Ad_e H_e; the residual adds sum over kept e of g_e D_e.
 */
function perFfnLayer(
  base: BaseModel,
  weights: ReferenceWeights,
  adapter: LoadedAdapter,
  moe: MoeRouting,
  layer: number,
  x: Rows,
  lengths: readonly number[] | undefined,
  record: (d: MoeDecision) => void,
): Rows {
  const lora = plainLoraLinear(base, weights, adapter);
  const router = adapter.moeRouters?.get(moeRouterKey(layer, "ffn"));
  const mlp = new Map(FFN_MODULES.map((m) => [m, loraOf(base, adapter, layer, m)] as const));
  if (!router) {
    const stacked = FFN_MODULES.filter((m) => mlp.get(m));
    if (stacked.length > 0) throw new Error(`reference: layer ${layer} has per_ffn experts on ${stacked.join(", ")} but no ffn router`);
    return decoderLayer(base, weights, lora, layer, x, lengths);
  }
  const E = moe.experts;
  for (const [m, w] of mlp) if (w && w.rank % E !== 0) throw new Error(`reference: layer ${layer} ${m}: stacked rank ${w.rank} is not ${E} experts`);
  // The attention half with its residual: the MLP modules give zero, so act(0) * 0 = 0 and the MLP adds 0.
  const attentionOnly: LinearFn = (l, m, rows) => (FFN_MODULES.includes(m) ? rows.map(() => new Float64Array(moduleShape(base, m)[0])) : lora(l, m, rows));
  const attended = decoderLayer(base, weights, attentionOnly, layer, x, lengths);
  const u = baseNorm(base, attended, weights.get(`model.layers.${layer}.post_attention_layernorm.weight`));
  const plain = baseLinear(base, weights);
  const baseGate = plain(layer, "gate_proj", u);
  const baseUp = plain(layer, "up_proj", u);
  // SwiGLU, or GemmaMLP's GeGLU (as decoderLayer)
  const act = base.family === "gemma" ? geluTanh : silu;
  /** Expert e's module: the base output plus the LoRA of ranks e*r .. (e+1)*r - 1 (base only without LoRA). */
  const expertModule = (module: ExpertModule, baseOut: Float64Array, input: Float64Array, e: number): Float64Array => {
    const y = baseOut.slice();
    const w = mlp.get(module);
    if (w) {
      const r = w.rank / E;
      addLoraUpdate(y, w, input, e * r, (e + 1) * r, () => 1);
    }
    return y;
  };
  return attended.map((row, position) => {
    const logits = routerLogits(router, u[position]!, E, `${layer}.ffn`);
    const choice = moeSelect(logits, moe.selection);
    record({ layer, at: "ffn", position, logits, ...choice });
    const out = row.slice();
    choice.experts.forEach((e, i) => {
      const g = expertModule("gate_proj", baseGate[position]!, u[position]!, e);
      const up = expertModule("up_proj", baseUp[position]!, u[position]!, e);
      const h = g.map((v, k) => act(v) * up[k]!);
      const d = expertModule("down_proj", plain(layer, "down_proj", [h])[0]!, h, e);
      const gate = choice.gates[i]!;
      d.forEach((v, k) => (out[k] = out[k]! + gate * v));
    });
    return out;
  });
}

/**
 * Logits for every position of `tokens` with a per-token Mixture-of-LoRA adapter (spec.moe) applied,
 * and every routing decision. `lengths` as referenceLogits' (dynamic rope scaling only).
 */
export function referenceMoeLogits(
  base: BaseModel,
  weights: ReferenceWeights,
  adapter: LoadedAdapter,
  tokens: readonly number[],
  lengths?: readonly number[],
): MoeResult {
  const moe = adapter.spec.moe;
  if (!moe) throw new Error(`reference: adapter ${adapter.name} has no per-token Mixture-of-LoRA routing (spec.moe)`);
  if (tokens.length === 0) throw new Error("reference: no tokens");
  const experts: MoeDecision[] = [];
  const record = (d: MoeDecision) => experts.push(d);
  let x = embedTokens(base, weights, tokens);
  for (let layer = 0; layer < base.layers; layer++) {
    x =
      moe.placement === "per_module"
        ? decoderLayer(base, weights, perModuleLinear(base, weights, adapter, moe, record), layer, x, lengths)
        : perFfnLayer(base, weights, adapter, moe, layer, x, lengths, record);
  }
  const at = (d: MoeDecision) => (d.at === "ffn" ? -1 : EXPERT_MODULES.indexOf(d.at));
  experts.sort((a, b) => a.layer - b.layer || at(a) - at(b) || a.position - b.position);
  return { logits: outputLogits(base, weights, x), experts };
}

/**
 * Greedy decoding by full recompute (the prompt in one forward, then one per token, as referenceGreedy):
 * the `maxNew` argmax tokens after the prompt, and the routing of the last step's forward (every
 * position but the last generated token's).
 */
export function referenceMoeGreedy(
  base: BaseModel,
  weights: ReferenceWeights,
  adapter: LoadedAdapter,
  prompt: readonly number[],
  maxNew: number,
): { tokens: number[]; experts: MoeDecision[] } {
  if (prompt.length === 0) throw new Error("reference: the prompt is empty");
  const tokens = [...prompt];
  let experts: MoeDecision[] = [];
  for (let i = 0; i < maxNew; i++) {
    const step = referenceMoeLogits(base, weights, adapter, tokens, generationLengths(prompt.length, tokens.length));
    tokens.push(argmax(step.logits.at(-1)!));
    experts = step.experts;
  }
  return { tokens: tokens.slice(prompt.length), experts };
}
