// The float64 CPU reference of MiLoRA's forward pass (milora.md, "Forward pass, precisely"), built
// on the LLaMA reference: LoRA on every enabled module, gated per layer by a router that reads the
// layer's input hidden states. Written from the paper's equations, not from the kernels: pooling
// (eq. 2, the self-attention pooler of eq. 8), activation of the pooled vector and
// TopK(softmax(g(h) W_r)) (eq. 3), the rational activation (eq. 6). Full recompute, no KV cache. A DoRA
// module's gate scales its change of the base weight (dora.ts).
import { type Activation, type BaseModel, type ExpertModule, type Pooling, type RouterConfig, type Selection } from "../../compiler/model.ts";
import { rationalInit } from "../../compiler/rational.ts";
import { loraKey, type LoadedAdapter, type RationalWeights, type RouterWeights } from "../../runtime/formats/adapter.ts";
import { doraWeightChange } from "./dora.ts";
import { generationLengths } from "./rope.ts";
import { argmax, baseLinear, decoderLayer, embedTokens, hfModuleName, outputLogits, matmulTransposed, softmax, type LinearFn, type ReferenceWeights, type Rows } from "./llama.ts";

/** Gates of one layer's modules; a module left out has gate 0 (its LoRA is skipped). */
export type Gates = Partial<Record<ExpertModule, number>>;

/**
 * The router's choice for one layer: the selected modules and their gates. Prompt routing gives one
 * decision per layer; token routing one per layer and position.
 */
export interface RoutingDecision {
  readonly layer: number;
  /** The token position, for token routing only. */
  readonly position?: number;
  readonly experts: Gates;
}

export interface MiloraResult {
  /** One row of vocabSize logits per position of prompt + generated. */
  readonly logits: Float64Array[];
  /** In layer order (then position order for token routing); empty for plain LoRA. */
  readonly routing: RoutingDecision[];
}

/** erf(x) to double precision: the all-positive series 2/sqrt(pi) e^(-x^2) sum (2x^2)^n x / (2n+1)!!. */
export function erf(x: number): number {
  if (Math.abs(x) > 6) return Math.sign(x); // erfc(6) < 3e-17
  let term = x;
  let sum = x;
  for (let n = 1; Math.abs(term) > 1e-17 * Math.abs(sum); n++) {
    term *= (2 * x * x) / (2 * n + 1);
    sum += term;
  }
  return (2 / Math.sqrt(Math.PI)) * Math.exp(-x * x) * sum;
}

/** GELU in its exact (erf) form. */
export function gelu(x: number): number {
  return 0.5 * x * (1 + erf(x / Math.SQRT2));
}

/**
 * The rational activation (paper eq. 6), straight from its definition:
 * Ra(x) = sum_{j=0..m} a_j x^j / (1 + |sum_{i=1..n} b_i x^i|).
 */
export function rational(x: number, a: readonly number[], b: readonly number[]): number {
  const p = a.reduce((s, aj, j) => s + aj * x ** j, 0);
  const q = b.reduce((s, bi, i) => s + bi * x ** (i + 1), 0);
  return p / (1 + Math.abs(q));
}

/** g of eq. 3, elementwise on one vector; `coefficients` for the rational activation. */
export function activate(v: Float64Array, activation: Activation, coefficients?: RationalWeights): Float64Array {
  switch (activation) {
    case "none":
      return v;
    case "relu":
      return v.map((x) => Math.max(0, x));
    case "gelu":
      return v.map(gelu);
    case "rational": {
      if (!coefficients) throw new Error("reference: the rational activation needs its coefficients");
      const a = Array.from(coefficients.numerator);
      const b = Array.from(coefficients.denominator);
      return v.map((x) => rational(x, a, b));
    }
  }
}

/** Eq. 2: the prompt's hidden states (rows) pooled to one vector; `wSa` for the self-attention pooler. */
export function pool(rows: Rows, pooling: Pooling, wSa?: Float32Array): Float64Array {
  const hidden = rows[0]!.length;
  switch (pooling) {
    case "last":
      return rows.at(-1)!;
    case "mean":
      return weightedSum(rows, rows.map(() => 1 / rows.length));
    case "max":
      return Float64Array.from({ length: hidden }, (_, i) => Math.max(...rows.map((r) => r[i]!)));
    case "attention": {
      // Appendix C, eq. 8: u_t = h_t . w_sa, a = softmax_t(u), p = sum_t a_t h_t.
      if (!wSa) throw new Error("reference: attention pooling needs the pooler's w_sa");
      const u = rows.map((row) => row.reduce((s, x, i) => s + x * wSa[i]!, 0));
      return weightedSum(rows, softmax(u));
    }
  }
}

function weightedSum(rows: Rows, weights: readonly number[]): Float64Array {
  const out = new Float64Array(rows[0]!.length);
  rows.forEach((row, t) => row.forEach((x, i) => (out[i] = out[i]! + weights[t]! * x)));
  return out;
}

/**
 * Gates per expert index from gate logits `z` (eq. 3): p = softmax(z) over all experts; the selected
 * experts keep p_e (renormalize: p_e / sum of the selected p), the others get 0.
 */
export function select(z: readonly number[], selection: Selection): number[] {
  const p = softmax([...z]);
  // Largest first; equal logits go to the lower expert index.
  const order = z.map((_, i) => i).sort((a, b) => z[b]! - z[a]! || a - b);
  let chosen: number[];
  switch (selection.rule) {
    case "top_k":
      if (selection.k > z.length) throw new Error(`reference: top_k ${selection.k} of ${z.length} experts`);
      chosen = order.slice(0, selection.k);
      break;
    case "threshold":
      // Probabilities >= T, and always the most probable expert.
      chosen = order.filter((e, rank) => rank === 0 || p[e]! >= selection.threshold);
      break;
    case "dense":
      chosen = order;
      break;
  }
  const renormalize = selection.rule !== "dense" && selection.renormalize;
  const kept = chosen.reduce((s, e) => s + p[e]!, 0);
  const gates = z.map(() => 0);
  for (const e of chosen) gates[e] = renormalize ? p[e]! / kept : p[e]!;
  return gates;
}

/** The coefficients the rational activation runs with: the router's, else the GELU-fit initialisation. */
function rationalOf(router: RouterWeights, config: RouterConfig): RationalWeights | undefined {
  if (config.activation !== "rational") return undefined;
  if (router.rational) return router.rational;
  const init = rationalInit(config.rational!);
  return { numerator: Float32Array.from(init.numerator), denominator: Float32Array.from(init.denominator) };
}

/** R(h) of eq. 3 for one router input vector h (a pooled prompt, or one token's state). */
export function routerGates(router: RouterWeights, config: RouterConfig, h: Float64Array): Gates {
  const x = activate(h, config.activation, rationalOf(router, config));
  const gate = Float64Array.from(router.gate);
  const z = matmulTransposed([x], gate, router.experts.length)[0]!;
  const g = select([...z], config.selection);
  const gates: Gates = {};
  router.experts.forEach((m, e) => {
    if (g[e]! > 0) gates[m] = g[e]!;
  });
  return gates;
}

/** Every enabled module at gate 1: plain LoRA. */
function allOn(adapter: LoadedAdapter, layer: number): Gates {
  const gates: Gates = {};
  for (const e of adapter.spec.experts) if (e.layer === layer) gates[e.module] = 1;
  return gates;
}

/**
 * W x + g[m] * scaling * B (A x), with one set of gates per token position; for a DoRA module
 * W x + g[m] (W' - W) x, W' its DoRA weight.
 */
function loraLinear(base: BaseModel, weights: ReferenceWeights, adapter: LoadedAdapter, gates: readonly Gates[]): LinearFn {
  const plain = baseLinear(base, weights);
  return (layer, module, x) => {
    const y = plain(layer, module, x);
    const w = adapter.lora.get(loraKey(layer, module));
    if (!w) return y;
    const a = Float64Array.from(w.a);
    const b = Float64Array.from(w.b);
    const out = b.length / w.rank;
    const change = w.magnitude && doraWeightChange(weights, layer, module, w);
    x.forEach((row, t) => {
      const g = gates[t]![module] ?? 0;
      if (g === 0) return;
      const update = change ? matmulTransposed([row], change, out)[0]! : matmulTransposed(matmulTransposed([row], a, w.rank), b, out)[0]!.map((u) => w.scaling * u);
      update.forEach((u, o) => (y[t]![o] = y[t]![o]! + g * u));
    });
    return y;
  };
}

/**
 * Logits at every position of prompt + generated with the adapter applied, and the routing decisions.
 * With `when prompt` each layer's gates come from the prompt span only, so they are exactly the
 * prefill decision however many tokens were generated after it. A dynamic rope_scaling rotates the
 * prompt in one forward and each generated token in its own (rope.ts generationLengths).
 */
export function referenceMiloraLogits(
  base: BaseModel,
  weights: ReferenceWeights,
  adapter: LoadedAdapter,
  prompt: readonly number[],
  generated: readonly number[] = [],
): MiloraResult {
  if (prompt.length === 0) throw new Error("reference: the prompt is empty");
  const tokens = [...prompt, ...generated];
  const config = adapter.spec.router;
  const routing: RoutingDecision[] = [];
  let x = embedTokens(base, weights, tokens);
  for (let layer = 0; layer < base.layers; layer++) {
    const router = adapter.router?.get(layer);
    let gates: Gates[];
    if (!config) {
      gates = x.map(() => allOn(adapter, layer));
    } else if (!router) {
      gates = x.map(() => ({}));
    } else if (config.when === "prompt") {
      // Pool the prompt span (eq. 2), then activation and gates (eq. 3).
      const decision = routerGates(router, config, pool(x.slice(0, prompt.length), config.pooling, router.pooler));
      routing.push({ layer, experts: decision });
      gates = x.map(() => decision);
    } else {
      // The per-token baseline: each position routes on its own hidden state, no pooling.
      gates = x.map((row, position) => {
        const decision = routerGates(router, config, row);
        routing.push({ layer, position, experts: decision });
        return decision;
      });
    }
    x = decoderLayer(base, weights, loraLinear(base, weights, adapter, gates), layer, x, generationLengths(prompt.length, tokens.length));
  }
  return { logits: outputLogits(base, weights, x), routing };
}

/** Greedy decoding by full recompute: the `maxNew` argmax tokens after the prompt, and the routing of the last step. */
export function referenceMiloraGreedy(
  base: BaseModel,
  weights: ReferenceWeights,
  adapter: LoadedAdapter,
  prompt: readonly number[],
  maxNew: number,
): { tokens: number[]; routing: RoutingDecision[] } {
  const tokens: number[] = [];
  let routing: RoutingDecision[] = [];
  for (let i = 0; i < maxNew; i++) {
    const step = referenceMiloraLogits(base, weights, adapter, prompt, tokens);
    tokens.push(argmax(step.logits.at(-1)!));
    routing = step.routing;
  }
  return { tokens, routing };
}

/**
 * Base weights with the adapter folded in: W + g * scaling * B A per module (W + g (W' - W) for DoRA),
 * with g = 1 for plain LoRA and a prompt's decision (`routing`) for a routed adapter. Token routing
 * cannot be folded.
 */
export function foldLora(weights: ReferenceWeights, adapter: LoadedAdapter, routing?: readonly RoutingDecision[]): ReferenceWeights {
  if (adapter.spec.router && (!routing || routing.some((d) => d.position !== undefined))) {
    throw new Error("reference: folding a routed adapter needs one prompt routing decision per layer");
  }
  const folded = new Map<string, Float64Array>();
  for (const { layer, module, rank, scaling, inFeatures, outFeatures } of adapter.spec.experts) {
    const g = routing ? (routing.find((d) => d.layer === layer)?.experts[module] ?? 0) : 1;
    if (g === 0) continue;
    const name = `${hfModuleName(layer, module)}.weight`;
    const w = weights.get(name).slice();
    const lora = adapter.lora.get(loraKey(layer, module))!;
    const { a, b } = lora;
    if (lora.magnitude) {
      const change = doraWeightChange(weights, layer, module, lora);
      folded.set(name, w.map((v, i) => v + g * change[i]!));
      continue;
    }
    for (let o = 0; o < outFeatures; o++) {
      for (let i = 0; i < inFeatures; i++) {
        let ba = 0;
        for (let j = 0; j < rank; j++) ba += b[o * rank + j]! * a[j * inFeatures + i]!;
        w[o * inFeatures + i] = w[o * inFeatures + i]! + g * scaling * ba;
      }
    }
    folded.set(name, w);
  }
  return { get: (name) => folded.get(name) ?? weights.get(name) };
}
