// The GPU adapter store: several adapters (tenants) resident at once over one base, addressed by
// name. Each (layer, module) holds every slot's LoRA stacked as the LoRA kernels read it
// (compiler/kernels/lora.ts): A [slots, R, in], B [slots, out, R] zero past a slot's rank, per slot
// { rank, scaling }, with rank 0 for a module the adapter lacks, and DoRA's factors [slots, out] (1 for a
// plain LoRA slot). A and the slots of the modules whose shrink is one dispatch (the plan's
// `lora_shrink` groups: q/k/v, gate/up) share one buffer each per layer, module-major, each module's
// region 256-byte aligned (runtime/gpu/layouts.ts LORA_REGION_BYTES), so the group's shrink binds one
// A and one slots buffer (8 storage buffers a stage is WebGPU's default limit) and every per-module
// kernel binds its module's region as a range. Router weights stay per adapter.
import { loraARows, loraSlotStride, packLoraSlots, type LoraSlotInfo } from "../gpu/layouts.ts";
import { EXPERT_MODULES, storedRank, type ExpertModule, type MoeRouting } from "../../compiler/model.ts";
import { loraGroups, type Plan } from "../package/format.ts";
import { rationalInit } from "../../compiler/rational.ts";
import { loraKey, moeRouterKey, type LoadedAdapter, type LoraKey, type MoeRouterKey, type RouterWeights } from "../formats/adapter.ts";
import { createStorage, type BufferArg } from "../gpu/kernel-runner.ts";
import { MiloraError } from "../errors.ts";
import { adapterDoraFactors } from "./dora.ts";

/** An adapter the store cannot take (wrong base, rank too high, no free slot, name in use). */
export class AdapterStoreError extends MiloraError {
  override name = "AdapterStoreError";
  readonly kind = "adapter";
}

/** A byte range of a buffer, as a kernel binds it. */
export type BufferRange = Exclude<BufferArg, GPUBuffer>;

/** One module's stacked LoRA weights of every slot (A and slots: its region of its group's buffers). */
export interface StackedLora {
  readonly a: BufferRange;
  readonly b: GPUBuffer;
  readonly slots: BufferRange;
  /** DoRA's factors d = m / ||W + s B A||_row per slot and output row; 1 for plain LoRA. */
  readonly dora: GPUBuffer;
}

/** The A and slots of a group of modules in one layer, module-major (the group shrink's bindings and strides). */
export interface StackedLoraGroup {
  readonly modules: readonly ExpertModule[];
  readonly a: GPUBuffer;
  readonly slots: GPUBuffer;
  /** Rows of A per module region (params.aRows), LoraSlots per module region (params.slotStride). */
  readonly aRows: number;
  readonly slotStride: number;
}

/**
 * A layer's router on the GPU: gate [experts, hidden]; for attention pooling the pooler's w_sa [hidden];
 * for the rational activation its coefficients a_0..a_m, b_1..b_n in one buffer.
 */
export interface GpuRouter {
  readonly gate: GPUBuffer;
  readonly experts: readonly ExpertModule[];
  readonly pooler?: GPUBuffer;
  readonly rational?: GPUBuffer;
}

/**
 * A per-token Mixture-of-LoRA router of every slot (plan.moe): weight [slots, E, in], and per slot
 * whether it routes here (1) or is a plain LoRA adapter's (0, so its rows run plain LoRA).
 */
export interface StackedMoeRouter {
  readonly weight: GPUBuffer;
  readonly routed: GPUBuffer;
}

export interface Tenant {
  readonly name: string;
  /** Its index in every stacked buffer (the LoRA kernels' rowAdapter value). */
  readonly slot: number;
  readonly adapter: LoadedAdapter;
  /** By layer; empty for plain LoRA. */
  readonly routers: ReadonlyMap<number, GpuRouter>;
  /** DoRA's factors of each of its DoRA modules (dora.ts); empty for plain LoRA. */
  readonly dora: ReadonlyMap<LoraKey, Float32Array>;
  /** Whether the adapter has a LoRA on (layer, module): other modules are never dispatched for it. */
  has(layer: number, module: ExpertModule): boolean;
}

export interface AdapterStoreOptions {
  readonly device: GPUDevice;
  readonly plan: Plan<ExpertModule>;
  /** Tenants resident at once. */
  readonly slots: number;
  /** The base checkpoint, whose weights DoRA's factors are computed from. */
  readonly checkpointDir: string;
}

export class AdapterStore {
  readonly #device: GPUDevice;
  readonly #plan: Plan<ExpertModule>;
  readonly #checkpointDir: string;
  readonly #stacks: StackedLora[][];
  /** Per layer, the plan's shrink groups; by module, its group and index in it. */
  readonly #groups: StackedLoraGroup[][];
  readonly #groupOf: ReadonlyMap<ExpertModule, readonly [group: number, index: number]>;
  /** plan.moe's routers: per (layer, module) for per_module, per (layer, "ffn") for per_ffn. */
  readonly #moeRouters = new Map<MoeRouterKey, StackedMoeRouter>();
  readonly #resident = new Map<string, Tenant>();
  readonly #free: number[];

  /** Tenants resident at once. */
  readonly slots: number;

  constructor(options: AdapterStoreOptions) {
    const { device, plan, slots } = options;
    this.slots = slots;
    this.#device = device;
    this.#plan = plan;
    this.#checkpointDir = options.checkpointDir;
    const R = plan.maxLoraRank;
    const groups = loraGroups(plan, EXPERT_MODULES);
    this.#groupOf = new Map(groups.flatMap((g, gi) => g.map((m, i) => [m, [gi, i] as const])));
    const slotStride = loraSlotStride(slots);
    const limit = device.limits.maxStorageBufferBindingSize;
    this.#groups = Array.from({ length: plan.dims.layers }, (_, layer) =>
      groups.map((modules) => {
        const inF = moduleShape(plan, modules[0]!)[1];
        const aRows = loraARows(slots, R, inF);
        const bytes = modules.length * aRows * inF * 4;
        if (bytes > limit)
          throw new AdapterStoreError(`the LoRA A of ${modules.join("/")} for ${slots} adapter slots of rank ${R} takes ${bytes} bytes, more than the device's largest storage binding (${limit}): serve fewer adapters or a lower largest rank`);
        const label = `lora layer ${layer} ${modules.join("/")}`;
        return { modules, a: createStorage(device, bytes, `${label} A`), slots: createStorage(device, modules.length * slotStride * 8, `${label} slots`), aRows, slotStride };
      }),
    );
    this.#stacks = Array.from({ length: plan.dims.layers }, (_, layer) =>
      EXPERT_MODULES.map((m) => {
        const [out, inF] = moduleShape(plan, m);
        const [gi, i] = this.#groupOf.get(m)!;
        const group = this.#groups[layer]![gi]!;
        const aBytes = group.aRows * inF * 4;
        const label = `lora layer ${layer} ${m}`;
        return {
          a: { buffer: group.a, offset: i * aBytes, size: aBytes },
          b: createStorage(device, slots * out * R * 4, `${label} B`),
          slots: { buffer: group.slots, offset: i * slotStride * 8, size: slotStride * 8 },
          dora: createStorage(device, new Float32Array(slots * out).fill(1), `${label} DoRA factors`),
        };
      }),
    );
    this.#free = Array.from({ length: slots }, (_, i) => slots - 1 - i);
    const moe = plan.moe;
    for (let layer = 0; moe && layer < plan.dims.layers; layer++) {
      const places: [MoeRouterKey, number][] =
        moe.placement === "per_ffn" ? [[moeRouterKey(layer, "ffn"), plan.dims.hidden]] : EXPERT_MODULES.map((m) => [moeRouterKey(layer, m), moduleShape(plan, m)[1]]);
      for (const [key, inF] of places) {
        this.#moeRouters.set(key, {
          weight: createStorage(device, slots * moe.experts * inF * 4, `moe router ${key} weight`),
          routed: createStorage(device, slots * 4, `moe router ${key} routed slots`),
        });
      }
    }
  }

  /** Uploads an adapter into a free slot. Throws AdapterStoreError naming what does not fit. */
  add(adapter: LoadedAdapter): Tenant {
    const { name, spec } = adapter;
    if (this.#resident.has(name)) throw new AdapterStoreError(`an adapter named "${name}" is already loaded`);
    const problems = this.#problems(adapter);
    if (problems.length > 0) throw new AdapterStoreError(`adapter ${name} (spec ${spec.name}) cannot be served:\n${problems.map((p) => `  ${p}`).join("\n")}`);
    if (this.#free.length === 0) throw new AdapterStoreError(`all ${this.slots} adapter slots are in use: unload one first`);
    const dora = adapterDoraFactors(adapter, this.#plan, this.#checkpointDir);
    const slot = this.#free.pop()!;
    const R = this.#plan.maxLoraRank;
    const queue = this.#device.queue;
    for (let layer = 0; layer < this.#plan.dims.layers; layer++) {
      EXPERT_MODULES.forEach((m, mi) => {
        const w = adapter.lora.get(loraKey(layer, m));
        const stack = this.#stacks[layer]![mi]!;
        const [out, inF] = moduleShape(this.#plan, m);
        let info: LoraSlotInfo = { rank: 0, scaling: 0 };
        const { a, slots } = stack;
        if (w) {
          queue.writeBuffer(a.buffer, a.offset + slot * R * inF * 4, w.a);
          // B's rows padded to R columns with zeros, as the expand kernel requires.
          const b = new Float32Array(out * R);
          for (let o = 0; o < out; o++) b.set(w.b.subarray(o * w.rank, (o + 1) * w.rank), o * R);
          queue.writeBuffer(stack.b, slot * out * R * 4, b);
          info = { rank: w.rank, scaling: w.scaling };
        }
        queue.writeBuffer(slots.buffer, slots.offset + slot * 8, packLoraSlots([info]));
        // every module, so no factor of a DoRA adapter that held the slot before is left behind
        queue.writeBuffer(stack.dora, slot * out * 4, dora.get(loraKey(layer, m)) ?? new Float32Array(out).fill(1));
      });
    }
    // Every MoE router's flag of this slot, so none of a routed adapter that held the slot before is left on.
    for (const [key, stack] of this.#moeRouters) {
      const w = adapter.moeRouters?.get(key);
      if (w) queue.writeBuffer(stack.weight, slot * w.length * 4, w);
      queue.writeBuffer(stack.routed, slot * 4, Uint32Array.of(w ? 1 : 0));
    }
    const routers = new Map<number, GpuRouter>();
    // The rational activation's coefficients, a then b: the adapter's, else the GELU-fit initialisation.
    const orders = spec.router?.activation === "rational" ? spec.router.rational : undefined;
    const rational = orders && ((r: RouterWeights) => {
      const c = r.rational ?? rationalInit(orders);
      return Float32Array.of(...c.numerator, ...c.denominator);
    });
    for (const [layer, r] of adapter.router ?? []) {
      const label = `router ${name} layer ${layer}`;
      routers.set(layer, {
        gate: createStorage(this.#device, r.gate, `${label} gate`),
        experts: r.experts,
        ...(r.pooler ? { pooler: createStorage(this.#device, r.pooler, `${label} pooler`) } : {}),
        ...(rational ? { rational: createStorage(this.#device, rational(r), `${label} rational`) } : {}),
      });
    }
    const resident: Tenant = { name, slot, adapter, routers, dora, has: (layer, m) => adapter.lora.has(loraKey(layer, m)) };
    this.#resident.set(name, resident);
    return resident;
  }

  /** Frees an adapter's slot (its stale weights stay but no row points at them). */
  remove(name: string): void {
    const r = this.#resident.get(name);
    if (!r) throw new AdapterStoreError(`no adapter named "${name}" is loaded`);
    for (const router of r.routers.values()) for (const b of [router.gate, router.pooler, router.rational]) b?.destroy();
    this.#resident.delete(name);
    this.#free.push(r.slot);
  }

  get(name: string): Tenant | undefined {
    return this.#resident.get(name);
  }

  names(): string[] {
    return [...this.#resident.keys()];
  }

  /** plan.moe's router of every slot at `key`; undefined when the plan routes nothing there. */
  moeRouter(key: MoeRouterKey): StackedMoeRouter | undefined {
    return this.#moeRouters.get(key);
  }

  /** The stacked buffers of one (layer, module). */
  stack(layer: number, module: ExpertModule): StackedLora {
    return this.#stacks[layer]![EXPERT_MODULES.indexOf(module)]!;
  }

  /** The shared A and slots of the plan's shrink group `modules` in `layer` (as the plan's lora_shrink op names it). */
  group(layer: number, modules: readonly ExpertModule[]): StackedLoraGroup {
    const group = this.#groups[layer]![this.#groupOf.get(modules[0]!)![0]]!;
    if (group.modules.join() !== modules.join()) throw new Error(`no LoRA group ${modules.join("/")}: the store holds ${group.modules.join("/")}`);
    return group;
  }

  destroy(): void {
    for (const name of this.names()) this.remove(name);
    for (const s of this.#stacks.flat()) for (const b of [s.b, s.dora]) b.destroy();
    for (const g of this.#groups.flat()) for (const b of [g.a, g.slots]) b.destroy();
    for (const r of this.#moeRouters.values()) for (const b of [r.weight, r.routed]) b.destroy();
  }

  #problems(adapter: LoadedAdapter): string[] {
    const d = this.#plan.dims;
    const base = adapter.spec.base;
    const problems: string[] = [];
    const pairs: [string, number, number][] = [
      ["hidden_size", base.hiddenSize, d.hidden],
      ["layers", base.layers, d.layers],
      ["intermediate_size", base.intermediateSize, d.intermediate],
      ["heads", base.heads, d.heads],
      ["kv_heads", base.kvHeads, d.kvHeads],
    ];
    for (const [key, theirs, ours] of pairs) if (theirs !== ours) problems.push(`its base ${base.name} has ${key} ${theirs}, the engine's ${this.#plan.base} ${ours}`);
    const moe = adapter.spec.moe;
    const planMoe = this.#plan.moe;
    if (moe !== undefined && (planMoe === undefined || planMoe.placement !== moe.placement || planMoe.experts !== moe.experts || !sameSelection(planMoe.selection, moe.selection))) {
      const describe = (m: typeof moe) => `${m.placement} routing over ${m.experts} experts (${m.selection.rule === "top_k" ? `top_k ${m.selection.k}${m.selection.renormalize ? " renormalize" : ""}` : "dense"})`;
      problems.push(`it has ${describe(moe)}, but the engine's kernels were made for ${planMoe ? describe(planMoe) : "no per-token routing"}: serve it with an engine planned for its spec`);
    }
    for (const e of adapter.spec.experts) {
      if (e.dora && adapter.lora.get(loraKey(e.layer, e.module))?.magnitude?.length !== e.outFeatures) {
        problems.push(`layer ${e.layer} ${e.module} is DoRA but has no magnitude vector of ${e.outFeatures} values`);
      }
      const rank = storedRank(adapter.spec, e);
      if (rank > this.#plan.maxLoraRank) {
        problems.push(`layer ${e.layer} ${e.module} has rank ${rank}${rank === e.rank ? "" : ` (${adapter.spec.moe!.experts} experts of rank ${e.rank})`}, above the engine's largest LoRA rank ${this.#plan.maxLoraRank} (option maxLoraRank)`);
      }
    }
    return problems;
  }
}

/** [out, in] of a module's weight: the shape the plan's tensor table gives it. */
function moduleShape(plan: Plan, module: ExpertModule): [number, number] {
  const t = plan.tensors.find((t) => t.role === "linear" && t.module === module);
  if (t === undefined || t.shape.length !== 2) throw new AdapterStoreError(`the plan has no linear weight for ${module}`);
  return [t.shape[0]!, t.shape[1]!];
}

function sameSelection(a: MoeRouting["selection"], b: MoeRouting["selection"]): boolean {
  return a.rule === b.rule && (a.rule === "dense" || (b.rule === "top_k" && a.k === b.k && a.renormalize === b.renormalize));
}
