// The trainable tensors of one adapter on the device: each expert's lora_A and lora_B (and, for a
// routed adapter, each router's tensors), with their gradients and AdamW moments beside them, plus the
// conversions to and from the adapter in memory (runtime/adapter.ts) that `run`, `compile` and `serve`
// read. The base is not here: it is frozen, so no gradient or optimizer state exists for it.
import { packLoraSlots } from "../../compiler/kernels/lora.ts";
import { FFN_MODULES, storedRank, type Adapter, type ExpertModule } from "../../compiler/model.ts";
import { loraKey, moeRouterKey, type LoadedAdapter, type LoraWeights, type MoeRouterKey, type RouterWeights } from "../formats/adapter.ts";
import { mulberry32 } from "../random.ts";
import { createStorage, readBuffer } from "../gpu/kernel-runner.ts";
import { userError } from "../errors.ts";

/** The standard deviation of a fresh per_module or per_ffn router's weights: MixLoRA's router_init_range. */
export const MOE_ROUTER_INIT_STD = 0.02;

/**
 * Refuses what the training graph has no gradient for, rather than silently training something else:
 * DoRA's magnitude (and its scaling of the base product). The per-token baselines per_module
 * (MOELoRA/MoLoRA) and per_ffn (MixLoRA) train.
 */
export function refuseUntrainable(spec: Adapter): void {
  const dora = spec.experts.find((e) => e.dora);
  if (dora) {
    throw userError(
      "unsupported",
      `adapter ${spec.name} uses DoRA (layer ${dora.layer} ${dora.module} and the rest): milora train does not train DoRA yet; ` +
        "train it with PEFT (use_dora=True) and run it here, or train the adapter without `dora true`",
    );
  }
}

/** The layers of a per_ffn adapter that have a router: those enabling an MLP module. */
export function ffnRoutedLayers(spec: Adapter): number[] {
  return [...new Set(spec.experts.filter((e) => FFN_MODULES.includes(e.module)).map((e) => e.layer))].sort((a, b) => a - b);
}

/** One trainable f32 tensor: values, gradient, and the optimizer's two moments, all [count]. */
export interface TrainTensor {
  readonly name: string;
  readonly count: number;
  readonly value: GPUBuffer;
  readonly grad: GPUBuffer;
  readonly m: GPUBuffer;
  readonly v: GPUBuffer;
  /** Trained by the eval set's gradients (the rational activation, bi-level) rather than the training set's. */
  readonly architecture: boolean;
}

export interface TrainLora {
  readonly layer: number;
  readonly module: ExpertModule;
  readonly rank: number;
  readonly scaling: number;
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** PEFT's lora_dropout on the module's input to the LoRA branch, while training. */
  readonly dropout: number;
  /** [rank, in] */
  readonly a: TrainTensor;
  /** [out, rank] */
  readonly b: TrainTensor;
  /** The one-slot table the LoRA kernels read: { rank, scaling }. */
  readonly slots: GPUBuffer;
  /**
   * per_module (MOELoRA): the module's router W [experts, in] over `experts` slices of rank / experts
   * ranks each; the module's gate stays 1, its ranks are gated by their expert's gate.
   */
  readonly moe?: { readonly experts: number; readonly router: TrainTensor };
  /**
   * per_ffn (MixLoRA): an MLP module's `experts` experts stacked as this one LoRA of rank experts x r
   * (expert e owns ranks e r .. (e+1) r - 1), scaling alpha / r; the layer's router is in TrainableParams.ffnRouters.
   */
  readonly ffn?: { readonly experts: number };
}

export interface TrainRouter {
  readonly layer: number;
  /** The layer's adapted modules in EXPERT_MODULES order: the rows of W_r and the gate columns. */
  readonly experts: readonly ExpertModule[];
  /** W_r [experts, hidden] */
  readonly gate: TrainTensor;
  /** w_sa [hidden] */
  readonly pooler?: TrainTensor;
  /** The rational unit's a_0..a_m then b_1..b_n in one tensor, as the router kernels read them. */
  readonly rational?: TrainTensor;
  readonly numeratorLength: number;
}

/**
 * A fresh adapter's weights, initialised as PEFT initialises LoRA: A by kaiming_uniform_(a = sqrt(5)),
 * which is U(-1/sqrt(in), 1/sqrt(in)), and B = 0, so training starts from the base's outputs; routers
 * start at W_r = 0 (uniform routing, milora.md), the pooler's w_sa at 0 (mean pooling), the rational
 * unit at its GELU fit (given by the caller: it lives with the router kernels' defaults). A per_module
 * adapter's routers W [experts, in] are drawn from N(0, 0.02^2), as MixLoRA initialises its routers
 * (router_init_range): zero routers would give every token the same experts 0..k-1 (ties go to the lower
 * index) and, with B = 0, no gradient to tell the experts apart. Drawn after every A, in the experts'
 * order, so the LoRA weights are those of the same adapter without routers. A per_ffn adapter's MLP
 * modules hold E experts stacked (A [E r, in], each expert's rows drawn as PEFT draws an expert's A,
 * whose bound 1/sqrt(in) is the same), and its routers W [E, hidden], one per layer enabling an MLP
 * module, come from N(0, 0.02^2) likewise, after every A, in layer order.
 */
export function initialAdapter(spec: Adapter, seed: number, rationalInit?: { readonly numerator: readonly number[]; readonly denominator: readonly number[] }): LoadedAdapter {
  const random = mulberry32(seed);
  const lora = new Map<ReturnType<typeof loraKey>, LoraWeights>();
  for (const e of spec.experts) {
    const bound = 1 / Math.sqrt(e.inFeatures);
    const rank = storedRank(spec, e);
    const a = Float32Array.from({ length: rank * e.inFeatures }, () => (random() * 2 - 1) * bound);
    lora.set(loraKey(e.layer, e.module), { a, b: new Float32Array(e.outFeatures * rank), rank, scaling: e.scaling });
  }
  if (spec.moe) {
    refuseUntrainable(spec);
    const normal = () => {
      // Box-Muller on the same stream; 1 - u keeps the logarithm's argument in (0, 1].
      const u = 1 - random();
      return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * random());
    };
    const moeRouters = new Map<MoeRouterKey, Float32Array>();
    const draw = (n: number) => Float32Array.from({ length: n }, () => MOE_ROUTER_INIT_STD * normal());
    if (spec.moe.placement === "per_ffn") {
      for (const layer of ffnRoutedLayers(spec)) moeRouters.set(moeRouterKey(layer, "ffn"), draw(spec.moe.experts * spec.base.hiddenSize));
    } else {
      for (const e of spec.experts) moeRouters.set(moeRouterKey(e.layer, e.module), draw(spec.moe.experts * e.inFeatures));
    }
    return { name: spec.name, spec, lora, moeRouters };
  }
  if (!spec.router) return { name: spec.name, spec, lora };
  const hidden = spec.base.hiddenSize;
  const router = new Map<number, RouterWeights>();
  for (const layer of spec.layers) {
    const experts = spec.experts.filter((e) => e.layer === layer).map((e) => e.module);
    router.set(layer, {
      experts,
      gate: new Float32Array(experts.length * hidden),
      ...(spec.router.pooling === "attention" ? { pooler: new Float32Array(hidden) } : {}),
      ...(spec.router.activation === "rational" && rationalInit
        ? { rational: { numerator: Float32Array.from(rationalInit.numerator), denominator: Float32Array.from(rationalInit.denominator) } }
        : {}),
    });
  }
  return { name: spec.name, spec, lora, router };
}

function tensor(device: GPUDevice, name: string, data: Float32Array, architecture = false): TrainTensor {
  const bytes = data.byteLength;
  return {
    name,
    count: data.length,
    value: createStorage(device, data, name),
    grad: createStorage(device, bytes, `${name} grad`),
    m: createStorage(device, bytes, `${name} m`),
    v: createStorage(device, bytes, `${name} v`),
    architecture,
  };
}

/** The adapter's trainable tensors on the device. */
export class TrainableParams {
  readonly lora: readonly TrainLora[];
  readonly routers: ReadonlyMap<number, TrainRouter>;
  /** per_ffn (MixLoRA): each routed layer's router W [experts, hidden], by layer in layer order. */
  readonly ffnRouters: ReadonlyMap<number, TrainTensor>;

  constructor(
    readonly device: GPUDevice,
    readonly adapter: LoadedAdapter,
  ) {
    const spec = adapter.spec;
    refuseUntrainable(spec);
    const moe = spec.moe?.placement === "per_module" ? spec.moe : undefined;
    const ffn = spec.moe?.placement === "per_ffn" ? spec.moe : undefined;
    this.lora = spec.experts.map((e) => {
      const w = adapter.lora.get(loraKey(e.layer, e.module));
      if (!w) throw new Error(`adapter ${adapter.name}: no LoRA weights for layer ${e.layer} ${e.module}`);
      const at = `layer ${e.layer} ${e.module}`;
      const rank = storedRank(spec, e);
      const experts = ffn && FFN_MODULES.includes(e.module) ? ffn.experts : undefined;
      if (w.rank !== rank || w.a.length !== rank * e.inFeatures || w.b.length !== e.outFeatures * rank) {
        throw new Error(`adapter ${adapter.name}: ${at} holds rank ${w.rank} ([${w.a.length}] and [${w.b.length}] values), the spec stores rank ${rank}${experts ? ` (${experts} experts of rank ${e.rank})` : ""}`);
      }
      let router: Float32Array | undefined;
      if (moe) {
        router = adapter.moeRouters?.get(moeRouterKey(e.layer, e.module));
        if (!router || router.length !== moe.experts * e.inFeatures) throw new Error(`adapter ${adapter.name}: no per_module router [${moe.experts}, ${e.inFeatures}] for ${at}`);
        if (e.rank % moe.experts !== 0) throw new Error(`adapter ${adapter.name}: ${at} has rank ${e.rank}, which does not split into ${moe.experts} experts`);
      }
      return {
        layer: e.layer,
        module: e.module,
        rank,
        scaling: w.scaling,
        inFeatures: e.inFeatures,
        outFeatures: e.outFeatures,
        dropout: e.dropout,
        a: tensor(device, `${at} lora_A`, w.a),
        b: tensor(device, `${at} lora_B`, w.b),
        slots: createStorage(device, packLoraSlots([{ rank, scaling: w.scaling }]), `${at} slot`),
        ...(moe && router ? { moe: { experts: moe.experts, router: tensor(device, `${at} router`, router) } } : {}),
        ...(experts ? { ffn: { experts } } : {}),
      };
    });
    this.ffnRouters = new Map(
      (ffn ? ffnRoutedLayers(spec) : []).map((layer) => {
        const w = adapter.moeRouters?.get(moeRouterKey(layer, "ffn"));
        const want = ffn!.experts * spec.base.hiddenSize;
        if (!w || w.length !== want) throw new Error(`adapter ${adapter.name}: no per_ffn router [${ffn!.experts}, ${spec.base.hiddenSize}] for layer ${layer}`);
        return [layer, tensor(device, `layer ${layer} ffn router`, w)] as const;
      }),
    );
    this.routers = new Map(
      [...(adapter.router ?? new Map<number, RouterWeights>())].map(([layer, r]) => [
        layer,
        {
          layer,
          experts: r.experts,
          gate: tensor(device, `layer ${layer} router`, r.gate),
          ...(r.pooler ? { pooler: tensor(device, `layer ${layer} pooler`, r.pooler) } : {}),
          ...(r.rational
            ? { rational: tensor(device, `layer ${layer} rational`, Float32Array.from([...r.rational.numerator, ...r.rational.denominator]), true) }
            : {}),
          numeratorLength: r.rational?.numerator.length ?? 0,
        },
      ]),
    );
  }

  /** Bytes on the device: each tensor four times (values, gradient, two moments). */
  get bytes(): number {
    return this.tensors.reduce((n, t) => n + 4 * t.count * 4, 0);
  }

  /** Every trainable tensor, in a fixed order (the gradient norm sums them in this order). */
  get tensors(): TrainTensor[] {
    const out: TrainTensor[] = this.lora.flatMap((l) => [l.a, l.b]);
    for (const r of this.routers.values()) out.push(...[r.gate, r.pooler, r.rational].filter((t): t is TrainTensor => t !== undefined));
    for (const l of this.lora) if (l.moe) out.push(l.moe.router);
    out.push(...this.ffnRouters.values());
    return out;
  }

  loraOf(layer: number, module: ExpertModule): TrainLora | undefined {
    return this.lora.find((l) => l.layer === layer && l.module === module);
  }

  /** The current weights as an adapter in memory (what writeAdapter saves). */
  async toAdapter(): Promise<LoadedAdapter> {
    const read = (t: TrainTensor) => readBuffer(this.device, t.value, 0, t.count * 4);
    const lora = new Map<ReturnType<typeof loraKey>, LoraWeights>();
    for (const l of this.lora) lora.set(loraKey(l.layer, l.module), { a: await read(l.a), b: await read(l.b), rank: l.rank, scaling: l.scaling });
    if (this.adapter.spec.moe) {
      const moeRouters = new Map<MoeRouterKey, Float32Array>();
      for (const l of this.lora) if (l.moe) moeRouters.set(moeRouterKey(l.layer, l.module), await read(l.moe.router));
      for (const [layer, w] of this.ffnRouters) moeRouters.set(moeRouterKey(layer, "ffn"), await read(w));
      return { ...this.adapter, lora, moeRouters };
    }
    if (this.routers.size === 0) return { ...this.adapter, lora };
    const router = new Map<number, RouterWeights>();
    for (const [layer, r] of this.routers) {
      const before = this.adapter.router!.get(layer)!;
      const rational = r.rational ? await read(r.rational) : undefined;
      router.set(layer, {
        ...before,
        gate: await read(r.gate),
        ...(r.pooler ? { pooler: await read(r.pooler) } : {}),
        ...(rational ? { rational: { numerator: rational.slice(0, r.numeratorLength), denominator: rational.slice(r.numeratorLength) } } : {}),
      });
    }
    return { ...this.adapter, lora, router };
  }

  destroy(): void {
    for (const t of this.tensors) for (const b of [t.value, t.grad, t.m, t.v]) b.destroy();
    for (const l of this.lora) l.slots.destroy();
  }
}
