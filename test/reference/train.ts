// The float64 reference of one MiLoRA training loss and its gradients (milora.md "Training"): the LLaMA
// forward pass of llama.ts written again over the scalar tape of autodiff.ts, with LoRA on the adapted
// modules, MiLoRA's per-layer routers (paper eq. 2-3, 8, 6) and the loss of eq. 4-5:
//   loss = mean cross-entropy over the batch's supervised positions + balance * mean over routed layers
//          of N * sum_i f_i P_i.
// With `moe` (the per_module baseline, MOELoRA / MoLoRA; docs/language.md) every adapted module instead
// has its own router W [E, in] on its input row x (before dropout) of every token: z = W x, p =
// softmax(z), top_k keeps the k most probable (ties to the lower index) with gates p (or p over the kept
// sum, renormalised), dense keeps all with gates p; rank j of the module's LoRA (expert j / (r / E)) is
// weighted by its expert's gate: y = W x + s sum_j g_e(j) B[:, j] (A[j] . dropout(x)). The balance loss
// is Hugging Face Mixtral's load_balancing_loss_func over every routed token of every module at once:
//   E * sum_i f_i P_i, f_i = (kept (token, slot) picks of i) / T (no gradient), P_i = mean p_i, T = tokens x modules.
// With `moe.placement` "per_ffn" (MixLoRA, as test/reference/moe-lora.ts computes it) the attention
// modules are plain LoRA, and each layer with a router W [E, hidden] (key `${layer}.ffn`) routes the
// MLP's input u (the post-attention norm's output) of every token the same way; each kept expert e runs
// its own feed-forward pass G_e = Wg u + s Bg_e Ag_e dropout(u), U_e likewise, H_e = silu(G_e) U_e,
// D_e = Wd H_e + s Bd_e Ad_e dropout(H_e) (expert e's LoRA: ranks e r .. (e+1) r - 1 of the module's
// stacked rank E r, one dropout mask per module shared by its experts; a module without LoRA is its
// base product), and the MLP adds sum over kept e of g_e D_e. The balance loss is the same Mixtral form
// over every routed layer's tokens (T = tokens x routed layers).
// The base is frozen; gradients are read off for every trainable tensor. Labels follow Hugging Face:
// aligned with the tokens, -100 unsupervised, logits at t predict labels[t + 1]. The router of a
// sequence reads its prompt: the leading run of unsupervised positions (at least the first token).
import { type BaseModel, type ExpertModule } from "../../compiler/model.ts";
import { Tape, type Node } from "./autodiff.ts";
import { hfModuleName, moduleShape, type ReferenceWeights } from "./llama.ts";
import { inverseFrequencies } from "./rope.ts";
import { erf } from "./milora.ts";

export const IGNORE = -100;

export interface TrainExample {
  readonly tokens: readonly number[];
  /** Aligned with tokens; IGNORE where the position is not supervised. */
  readonly labels: readonly number[];
}

/** One adapted module: A [rank, in], B [out, rank] as PEFT stores them, scaling alpha / rank. */
export interface ReferenceLora {
  readonly a: Float64Array;
  readonly b: Float64Array;
  readonly rank: number;
  readonly scaling: number;
}

/** One layer's router: W_r as [experts, hidden], the pooler's w_sa, the rational unit's coefficients. */
export interface ReferenceRouter {
  readonly experts: readonly ExpertModule[];
  readonly gate: Float64Array;
  readonly pooler?: Float64Array;
  /** a_0..a_m and b_1..b_n of Ra(x) = sum a_j x^j / (1 + |sum b_i x^i|). */
  readonly rational?: { readonly numerator: Float64Array; readonly denominator: Float64Array };
}

export interface ReferenceRouting {
  readonly pooling: "last" | "mean" | "max" | "attention";
  readonly activation: "none" | "relu" | "gelu" | "rational";
  readonly selection: { readonly rule: "top_k"; readonly k: number } | { readonly rule: "threshold"; readonly threshold: number } | { readonly rule: "dense" };
  /** Softmax over the chosen experts' logits (the authors' code) instead of the paper's probabilities. */
  readonly renormalize: boolean;
  readonly when: "prompt" | "token";
}

/**
 * A per-token baseline's routing: E experts per module (per_module, the default) or per MLP block
 * (per_ffn), the selection, and the routers: each module's W [E, in], or each routed layer's W [E, hidden].
 */
export interface ReferenceMoe {
  readonly placement?: "per_module" | "per_ffn";
  readonly experts: number;
  readonly selection: { readonly rule: "top_k"; readonly k: number; readonly renormalize: boolean } | { readonly rule: "dense" };
  /** By `${layer}.${module}` (per_module) or `${layer}.ffn` (per_ffn): W [experts, in] row-major. */
  readonly routers: ReadonlyMap<string, Float64Array>;
}

/** One per_module or per_ffn routing decision, for comparison with a forward reference or the device's record. */
export interface ReferenceMoeDecision {
  readonly key: string;
  readonly example: number;
  readonly position: number;
  readonly logits: number[];
  readonly probabilities: number[];
  /** Gates of all E experts (0 where not kept). */
  readonly gates: number[];
}

export interface ReferenceTrainAdapter {
  /** By `${layer}.${module}`. */
  readonly lora: ReadonlyMap<string, ReferenceLora>;
  /** By layer; absent for plain LoRA (every adapted module at gate 1). */
  readonly routers?: ReadonlyMap<number, ReferenceRouter>;
  readonly routing?: ReferenceRouting;
  /** per_module routing (then no `routers` / `routing`). */
  readonly moe?: ReferenceMoe;
  /** lambda_lb of eq. 4 (MiLoRA) or the per_module balance coefficient. */
  readonly balance: number;
  /**
   * LoRA dropout as PEFT applies it (on the LoRA branch's input, inverted): `keeps` says whether an
   * element of a module's input is kept (by example, position and column), `p` the drop probability.
   */
  readonly dropout?: { readonly p: number; keeps(layer: number, module: ExpertModule, example: number, position: number, column: number): boolean };
}

export interface RouterGradients {
  readonly gate: Float64Array;
  readonly pooler?: Float64Array;
  readonly numerator?: Float64Array;
  readonly denominator?: Float64Array;
}

export interface ReferenceTrainResult {
  readonly loss: number;
  readonly lmLoss: number;
  readonly balanceLoss: number;
  readonly supervised: number;
  readonly lora: ReadonlyMap<string, { readonly a: Float64Array; readonly b: Float64Array }>;
  readonly routers: ReadonlyMap<number, RouterGradients>;
  /** Each sequence's gates per routed layer (prompt routing), by layer then expert order. */
  readonly gates: ReadonlyMap<number, number[][]>;
  /** per_module: each module's router gradient, by `${layer}.${module}`; per_ffn: each layer's, by `${layer}.ffn`. */
  readonly moeRouters: ReadonlyMap<string, Float64Array>;
  /** per_module and per_ffn: every decision, in the order made (example, layer, module or "ffn", position). */
  readonly moeDecisions: readonly ReferenceMoeDecision[];
}

type Vec = Node[];

/** The prompt span a router reads: the leading unsupervised positions, at least one. */
export function promptLength(example: TrainExample): number {
  let n = 0;
  while (n < example.labels.length && example.labels[n] === IGNORE) n++;
  return Math.max(1, Math.min(n, example.tokens.length));
}

const SQRT_2PI = Math.sqrt(2 * Math.PI);
const gelu = (x: number) => 0.5 * x * (1 + erf(x / Math.SQRT2));
const geluDerivative = (x: number) => 0.5 * (1 + erf(x / Math.SQRT2)) + (x * Math.exp(-0.5 * x * x)) / SQRT_2PI;

class Model {
  readonly tape = new Tape();
  readonly #params = new Map<string, Node[]>();

  constructor(
    readonly base: BaseModel,
    readonly weights: ReferenceWeights,
    readonly adapter: ReferenceTrainAdapter,
  ) {
    for (const [key, l] of adapter.lora) {
      this.#params.set(`${key}.a`, this.tape.leaves(l.a));
      this.#params.set(`${key}.b`, this.tape.leaves(l.b));
    }
    for (const [key, w] of adapter.moe?.routers ?? []) this.#params.set(`moe.${key}`, this.tape.leaves(w));
    for (const [layer, r] of adapter.routers ?? []) {
      this.#params.set(`router.${layer}.gate`, this.tape.leaves(r.gate));
      if (r.pooler) this.#params.set(`router.${layer}.pooler`, this.tape.leaves(r.pooler));
      if (r.rational) {
        this.#params.set(`router.${layer}.numerator`, this.tape.leaves(r.rational.numerator));
        this.#params.set(`router.${layer}.denominator`, this.tape.leaves(r.rational.denominator));
      }
    }
  }

  param(name: string): Node[] | undefined {
    return this.#params.get(name);
  }

  gradient(grads: Float64Array, name: string): Float64Array | undefined {
    const nodes = this.#params.get(name);
    return nodes && Float64Array.from(nodes, (n) => grads[n]!);
  }

  /** Which example and position the token being computed is (for the dropout mask and the per_module record). */
  at = { example: 0, position: 0 };

  /** per_module and per_ffn decisions: each one's probabilities (nodes) and kept experts, for the balance loss. */
  readonly moeDecisions: { readonly probs: Node[]; readonly kept: readonly number[]; readonly record: ReferenceMoeDecision }[] = [];

  /**
   * per_module (a module's router, key `${layer}.${module}`) or per_ffn (a layer's, `${layer}.ffn`): the
   * gate node of each expert of one token's decision (undefined where not kept).
   */
  routeModule(key: string, x: Vec): (Node | undefined)[] {
    const t = this.tape;
    const moe = this.adapter.moe!;
    const w = this.param(`moe.${key}`);
    if (!w) throw new Error(`reference: ${key} has LoRA but no ${this.adapter.moe!.placement ?? "per_module"} router`);
    const E = moe.experts;
    const n = x.length;
    const logits = Array.from({ length: E }, (_, e) => t.dot(x, w.slice(e * n, (e + 1) * n)));
    const lse = t.logSumExp(logits);
    const probs = logits.map((z) => t.exp(t.sub(z, lse)));
    const p = t.values(probs);
    const order = p.map((_, e) => e).sort((a, b) => p[b]! - p[a]! || a - b);
    const kept = moe.selection.rule === "dense" ? order : order.slice(0, moe.selection.k);
    const gates: (Node | undefined)[] = new Array(E).fill(undefined);
    const renormalize = moe.selection.rule === "top_k" && moe.selection.renormalize;
    const keptSum = renormalize ? t.sum(kept.map((e) => probs[e]!)) : undefined;
    for (const e of kept) gates[e] = keptSum === undefined ? probs[e]! : t.div(probs[e]!, keptSum);
    const record: ReferenceMoeDecision = {
      key,
      example: this.at.example,
      position: this.at.position,
      logits: t.values(logits),
      probabilities: p,
      gates: gates.map((g) => (g === undefined ? 0 : t.value(g))),
    };
    this.moeDecisions.push({ probs, kept, record });
    return gates;
  }

  /**
   * y = W x (+ g * scaling * B A dropout(x)) for one token; W frozen, LoRA nodes trainable. `gate` is a
   * node (a router's gate, or a constant 1 for plain LoRA), or undefined for a module switched off.
   */
  linear(layer: number, module: ExpertModule, x: Vec, gate: Node | undefined): Vec {
    const t = this.tape;
    const [out, inFeatures] = moduleShape(this.base, module);
    const w = this.weights.get(`${hfModuleName(layer, module)}.weight`);
    const y = Array.from({ length: out }, (_, o) => t.dotConst(x, w, o * inFeatures));
    const lora = this.adapter.lora.get(`${layer}.${module}`);
    if (!lora || gate === undefined) return y;
    const a = this.param(`${layer}.${module}.a`)!;
    const b = this.param(`${layer}.${module}.b`)!;
    const r = lora.rank;
    const d = this.adapter.dropout;
    const input = d ? x.map((xi, c) => t.scale(xi, d.keeps(layer, module, this.at.example, this.at.position, c) ? 1 / (1 - d.p) : 0)) : x;
    // per_module: the router reads the module's input itself (dropout is the LoRA branch's); rank j is
    // weighted by its expert's gate, and the ranks of experts not kept are left out.
    const experts = this.adapter.moe && this.adapter.moe.placement !== "per_ffn" ? this.routeModule(`${layer}.${module}`, x) : undefined;
    const ranks = Array.from({ length: r }, (_, j) => j).filter((j) => !experts || experts[Math.floor(j / (r / experts.length))] !== undefined);
    const shrunk = ranks.map((j) => {
      const tj = t.dot(input, a.slice(j * inFeatures, (j + 1) * inFeatures));
      return experts ? t.mul(experts[Math.floor(j / (r / experts.length))]!, tj) : tj;
    });
    return y.map((yo, o) => {
      const update = t.scale(t.dot(shrunk, ranks.map((j) => b[o * r + j]!)), lora.scaling);
      return t.add(yo, t.mul(gate, update));
    });
  }

  /**
   * per_ffn: expert e's module on one token: the base product `baseOut` (W x, computed once by the
   * caller for gate and up) plus s B_e (A_e dropout(x)) over the expert's ranks e r .. (e+1) r - 1 of the
   * stacked LoRA; the base product alone for a module the adapter lacks.
   */
  expertModule(layer: number, module: ExpertModule, x: Vec, baseOut: Vec, e: number): Vec {
    const t = this.tape;
    const lora = this.adapter.lora.get(`${layer}.${module}`);
    if (!lora) return baseOut;
    const E = this.adapter.moe!.experts;
    if (lora.rank % E !== 0) throw new Error(`reference: layer ${layer} ${module}: stacked rank ${lora.rank} is not ${E} experts`);
    const inFeatures = moduleShape(this.base, module)[1];
    const a = this.param(`${layer}.${module}.a`)!;
    const b = this.param(`${layer}.${module}.b`)!;
    const r = lora.rank / E;
    const d = this.adapter.dropout;
    const input = d ? x.map((xi, c) => t.scale(xi, d.keeps(layer, module, this.at.example, this.at.position, c) ? 1 / (1 - d.p) : 0)) : x;
    const ranks = Array.from({ length: r }, (_, j) => e * r + j);
    const shrunk = ranks.map((j) => t.dot(input, a.slice(j * inFeatures, (j + 1) * inFeatures)));
    return baseOut.map((yo, o) => t.add(yo, t.scale(t.dot(shrunk, ranks.map((j) => b[o * lora.rank + j]!)), lora.scaling)));
  }

  /** y = W x of a frozen module for one token. */
  baseProduct(layer: number, module: ExpertModule, x: Vec): Vec {
    const [out, inFeatures] = moduleShape(this.base, module);
    const w = this.weights.get(`${hfModuleName(layer, module)}.weight`);
    return Array.from({ length: out }, (_, o) => this.tape.dotConst(x, w, o * inFeatures));
  }

  /**
   * per_ffn: the MLP output of one token of a routed layer on its post-attention norm u: the router's
   * kept experts' feed-forward passes, each weighted by its gate (in expert order).
   */
  mixture(layer: number, u: Vec): Vec {
    const t = this.tape;
    const gates = this.routeModule(`${layer}.ffn`, u);
    const gateBase = this.baseProduct(layer, "gate_proj", u);
    const upBase = this.baseProduct(layer, "up_proj", u);
    const terms: Vec[] = [];
    gates.forEach((g, e) => {
      if (g === undefined) return;
      const gate = this.expertModule(layer, "gate_proj", u, gateBase, e);
      const up = this.expertModule(layer, "up_proj", u, upBase, e);
      const h = gate.map((gi, i) => t.mul(t.mul(gi, t.sigmoid(gi)), up[i]!));
      const down = this.expertModule(layer, "down_proj", h, this.baseProduct(layer, "down_proj", h), e);
      terms.push(down.map((v) => t.mul(g, v)));
    });
    return terms[0]!.map((_, i) => t.sum(terms.map((d) => d[i]!)));
  }

  rmsNorm(x: Vec, weight: Float64Array): Vec {
    const t = this.tape;
    const meanSquare = t.scale(t.dot(x, x), 1 / x.length);
    const inverse = t.div(t.leaf(1), t.sqrt(t.shift(meanSquare, this.base.rmsNormEps)));
    return x.map((xi, i) => t.scale(t.mul(xi, inverse), weight[i]!));
  }

  /** Rotates each head of `v` (heads x headDim) by position `pos`, rotate_half convention. */
  rope(v: Vec, heads: number, pos: number): Vec {
    const t = this.tape;
    const d = this.base.headDim;
    const half = d / 2;
    const out = v.slice();
    if (this.base.ropeScaling?.type === "dynamic") throw new Error("reference: training takes no dynamic rope scaling");
    const inv = inverseFrequencies(this.base, 0);
    for (let h = 0; h < heads; h++)
      for (let i = 0; i < half; i++) {
        const angle = pos * inv[i]!;
        const [a, b] = [v[h * d + i]!, v[h * d + i + half]!];
        out[h * d + i] = t.combine([a, b], [Math.cos(angle), -Math.sin(angle)]);
        out[h * d + i + half] = t.combine([b, a], [Math.cos(angle), Math.sin(angle)]);
      }
    return out;
  }

  attention(q: Vec[], k: Vec[], v: Vec[]): Vec[] {
    const t = this.tape;
    const { heads, kvHeads, headDim: d } = this.base;
    return q.map((qt, pos) => {
      const out: Vec = [];
      for (let h = 0; h < heads; h++) {
        const kv = Math.floor(h / (heads / kvHeads));
        const qh = qt.slice(h * d, (h + 1) * d);
        const scores = k.slice(0, pos + 1).map((ku) => t.scale(t.dot(qh, ku.slice(kv * d, (kv + 1) * d)), 1 / Math.sqrt(d)));
        const lse = t.logSumExp(scores);
        const p = scores.map((s) => t.exp(t.sub(s, lse)));
        for (let i = 0; i < d; i++) out.push(t.dot(p, v.slice(0, pos + 1).map((vu) => vu[kv * d + i]!)));
      }
      return out;
    });
  }

  activate(x: Vec, layer: number): Vec {
    const t = this.tape;
    switch (this.adapter.routing!.activation) {
      case "none":
        return x;
      case "relu":
        return x.map((xi) => t.relu(xi));
      case "gelu":
        return x.map((xi) => t.apply(xi, gelu, geluDerivative));
      case "rational": {
        const a = this.param(`router.${layer}.numerator`)!;
        const b = this.param(`router.${layer}.denominator`)!;
        return x.map((xi) => {
          const powers: Node[] = [t.leaf(1), xi];
          while (powers.length < Math.max(a.length, b.length + 1)) powers.push(t.mul(powers.at(-1)!, xi));
          const numerator = t.dot(a, powers.slice(0, a.length));
          const denominator = t.shift(t.abs(t.dot(b, powers.slice(1, b.length + 1))), 1);
          return t.div(numerator, denominator);
        });
      }
    }
  }

  /** Paper eq. 2 and 8: the prompt rows pooled to one vector. */
  pool(rows: Vec[], layer: number): Vec {
    const t = this.tape;
    const hidden = rows[0]!.length;
    switch (this.adapter.routing!.pooling) {
      case "last":
        return rows.at(-1)!;
      case "mean":
        return Array.from({ length: hidden }, (_, i) => t.scale(t.sum(rows.map((r) => r[i]!)), 1 / rows.length));
      case "max":
        // The first row holding the maximum takes the gradient, as torch.max does.
        return Array.from({ length: hidden }, (_, i) => rows.reduce((best, r) => (t.value(r[i]!) > t.value(best[i]!) ? r : best))[i]!);
      case "attention": {
        const w = this.param(`router.${layer}.pooler`)!;
        const scores = rows.map((r) => t.dot(r, w));
        const lse = t.logSumExp(scores);
        const weights = scores.map((s) => t.exp(t.sub(s, lse)));
        return Array.from({ length: hidden }, (_, i) => t.dot(weights, rows.map((r) => r[i]!)));
      }
    }
  }

  /** Eq. 3: the gates of one decision and the full softmax (for the balance loss). */
  route(pooled: Vec, layer: number): { gates: Map<ExpertModule, Node>; probs: Node[] } {
    const t = this.tape;
    const routing = this.adapter.routing!;
    const router = this.adapter.routers!.get(layer)!;
    const w = this.param(`router.${layer}.gate`)!;
    const h = pooled.length;
    const logits = router.experts.map((_, e) => t.dot(this.activate(pooled, layer), w.slice(e * h, (e + 1) * h)));
    const lse = t.logSumExp(logits);
    const probs = logits.map((z) => t.exp(t.sub(z, lse)));
    const p = t.values(probs);
    const order = p.map((_, e) => e).sort((x, y) => p[y]! - p[x]! || x - y);
    const rule = routing.selection;
    let chosen = rule.rule === "top_k" ? order.slice(0, rule.k) : rule.rule === "dense" ? order : order.filter((e) => p[e]! >= rule.threshold);
    if (chosen.length === 0) chosen = [order[0]!];
    const gates = new Map<ExpertModule, Node>();
    if (routing.renormalize) {
      const picked = chosen.map((e) => logits[e]!);
      const pickedLse = t.logSumExp(picked);
      chosen.forEach((e, i) => gates.set(router.experts[e]!, t.exp(t.sub(picked[i]!, pickedLse))));
    } else {
      for (const e of chosen) gates.set(router.experts[e]!, probs[e]!);
    }
    return { gates, probs };
  }
}

/** Loss, its parts, and the gradient of every trainable tensor for one batch. */
export function referenceTrainLoss(base: BaseModel, weights: ReferenceWeights, adapter: ReferenceTrainAdapter, batch: readonly TrainExample[]): ReferenceTrainResult {
  const m = new Model(base, weights, adapter);
  const t = m.tape;
  const h = base.hiddenSize;
  const embed = weights.get("model.embed_tokens.weight");
  const head = base.tieEmbeddings ? embed : weights.get("lm_head.weight");
  const losses: Node[] = [];
  /** Per routed layer: each decision's full softmax and its argmax expert. */
  const decisions = new Map<number, { probs: Node[]; top: number }[]>();
  const gatesSeen = new Map<number, number[][]>();

  for (const [exampleIndex, example] of batch.entries()) {
    if (example.tokens.length !== example.labels.length) throw new Error("reference: tokens and labels differ in length");
    let x: Vec[] = example.tokens.map((tok) => t.leaves(embed.subarray(tok * h, (tok + 1) * h)));
    const prompt = promptLength(example);
    for (let layer = 0; layer < base.layers; layer++) {
      const p = `model.layers.${layer}`;
      // gateOf(position, module): 1 for plain LoRA, the router's gate for a routed adapter, none when off.
      const one = t.leaf(1);
      let gateOf: (pos: number, module: ExpertModule) => Node | undefined = () => one;
      if (adapter.routing) {
        const routed = adapter.routers?.has(layer) ?? false;
        if (!routed) gateOf = () => undefined;
        else if (adapter.routing.when === "prompt") {
          const { gates, probs } = m.route(m.pool(x.slice(0, prompt), layer), layer);
          record(decisions, gatesSeen, layer, probs, gates, t, adapter.routers!.get(layer)!.experts);
          gateOf = (_, module) => gates.get(module);
        } else {
          const perToken = x.map((row) => m.route(row, layer));
          for (const d of perToken) record(decisions, gatesSeen, layer, d.probs, d.gates, t, adapter.routers!.get(layer)!.experts);
          gateOf = (pos, module) => perToken[pos]!.gates.get(module);
        }
      }
      const normed = x.map((row) => m.rmsNorm(row, weights.get(`${p}.input_layernorm.weight`)));
      const at = (position: number) => (m.at = { example: exampleIndex, position });
      const q = normed.map((row, pos) => (at(pos), m.rope(m.linear(layer, "q_proj", row, gateOf(pos, "q_proj")), base.heads, pos)));
      const k = normed.map((row, pos) => (at(pos), m.rope(m.linear(layer, "k_proj", row, gateOf(pos, "k_proj")), base.kvHeads, pos)));
      const v = normed.map((row, pos) => (at(pos), m.linear(layer, "v_proj", row, gateOf(pos, "v_proj"))));
      const attended = m.attention(q, k, v).map((row, pos) => {
        at(pos);
        const o = m.linear(layer, "o_proj", row, gateOf(pos, "o_proj"));
        return x[pos]!.map((xi, i) => t.add(xi, o[i]!));
      });
      // per_ffn: a layer with its router mixes its experts' feed-forward passes (a layer without one has no MLP LoRA).
      const ffn = adapter.moe?.placement === "per_ffn";
      const mixed = ffn && adapter.moe!.routers.has(`${layer}.ffn`);
      if (ffn && !mixed && (["gate_proj", "up_proj", "down_proj"] as const).some((mod) => adapter.lora.has(`${layer}.${mod}`))) {
        throw new Error(`reference: layer ${layer} has per_ffn experts but no ffn router`);
      }
      x = attended.map((row, pos) => {
        at(pos);
        const n = m.rmsNorm(row, weights.get(`${p}.post_attention_layernorm.weight`));
        if (mixed) {
          const down = m.mixture(layer, n);
          return row.map((ri, i) => t.add(ri, down[i]!));
        }
        const gate = m.linear(layer, "gate_proj", n, gateOf(pos, "gate_proj"));
        const up = m.linear(layer, "up_proj", n, gateOf(pos, "up_proj"));
        const act = gate.map((g, i) => t.mul(t.mul(g, t.sigmoid(g)), up[i]!));
        const down = m.linear(layer, "down_proj", act, gateOf(pos, "down_proj"));
        return row.map((ri, i) => t.add(ri, down[i]!));
      });
    }
    for (let pos = 0; pos + 1 < example.tokens.length; pos++) {
      const label = example.labels[pos + 1]!;
      if (label === IGNORE) continue;
      const final = m.rmsNorm(x[pos]!, weights.get("model.norm.weight"));
      const logits = Array.from({ length: base.vocabSize }, (_, vtok) => t.dotConst(final, head, vtok * h));
      losses.push(t.sub(t.logSumExp(logits), logits[label]!));
    }
  }
  if (losses.length === 0) throw new Error("reference: the batch has no supervised position");
  const lm = t.scale(t.sum(losses), 1 / losses.length);

  // Eq. 4-5 per routed layer: f_i (argmax share, no gradient) times P_i (mean probability), times N.
  const perLayer: Node[] = [];
  for (const ds of decisions.values()) {
    const experts = ds[0]!.probs.length;
    const terms: Node[] = [];
    for (let i = 0; i < experts; i++) {
      const f = ds.filter((d) => d.top === i).length / ds.length;
      if (f === 0) continue;
      terms.push(t.scale(t.sum(ds.map((d) => d.probs[i]!)), (experts * f) / ds.length));
    }
    perLayer.push(terms.length > 0 ? t.sum(terms) : t.leaf(0));
  }
  let balance = perLayer.length > 0 ? t.scale(t.sum(perLayer), 1 / perLayer.length) : t.leaf(0);
  if (adapter.moe) {
    // Mixtral's form over every module's (per_ffn: routed layer's) tokens at once: E * sum_i f_i P_i, f_i the share of picks (no gradient).
    const ds = m.moeDecisions;
    const E = adapter.moe.experts;
    const terms: Node[] = [];
    for (let i = 0; i < E; i++) {
      const f = ds.filter((d) => d.kept.includes(i)).length / ds.length;
      if (f === 0) continue;
      terms.push(t.scale(t.sum(ds.map((d) => d.probs[i]!)), (E * f) / ds.length));
    }
    balance = terms.length > 0 ? t.sum(terms) : t.leaf(0);
  }
  const loss = t.add(lm, t.scale(balance, adapter.balance));

  const grads = t.backward(loss);
  const lora = new Map([...adapter.lora.keys()].map((key) => [key, { a: m.gradient(grads, `${key}.a`)!, b: m.gradient(grads, `${key}.b`)! }]));
  const routers = new Map(
    [...(adapter.routers?.keys() ?? [])].map((layer) => {
      const g: RouterGradients = {
        gate: m.gradient(grads, `router.${layer}.gate`)!,
        ...optional("pooler", m.gradient(grads, `router.${layer}.pooler`)),
        ...optional("numerator", m.gradient(grads, `router.${layer}.numerator`)),
        ...optional("denominator", m.gradient(grads, `router.${layer}.denominator`)),
      };
      return [layer, g];
    }),
  );
  const moeRouters = new Map([...(adapter.moe?.routers.keys() ?? [])].map((key) => [key, m.gradient(grads, `moe.${key}`)!]));
  return {
    loss: t.value(loss),
    lmLoss: t.value(lm),
    balanceLoss: t.value(balance),
    supervised: losses.length,
    lora,
    routers,
    gates: gatesSeen,
    moeRouters,
    moeDecisions: m.moeDecisions.map((d) => d.record),
  };
}

function optional<K extends string>(key: K, value: Float64Array | undefined): { [P in K]?: Float64Array } {
  return (value === undefined ? {} : { [key]: value }) as { [P in K]?: Float64Array };
}

function record(
  decisions: Map<number, { probs: Node[]; top: number }[]>,
  seen: Map<number, number[][]>,
  layer: number,
  probs: Node[],
  gates: ReadonlyMap<ExpertModule, Node>,
  t: Tape,
  experts: readonly ExpertModule[],
): void {
  const p = t.values(probs);
  const top = p.indexOf(Math.max(...p));
  if (!decisions.has(layer)) decisions.set(layer, []);
  decisions.get(layer)!.push({ probs, top });
  if (!seen.has(layer)) seen.set(layer, []);
  seen.get(layer)!.push(experts.map((e) => (gates.has(e) ? t.value(gates.get(e)!) : 0)));
}
