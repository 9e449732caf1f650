// Kernel resolution: the WGSL the engine dispatches, by what it is for. The plan's kernels come by key
// (each checked against its family's interface when the engine loads); the few a plan cannot hold in
// advance (routers of adapters registered later under another router, row blocks of a weight split
// finer than the plan assumed) come from the caller's resolver, made once each.
import { isDeepStrictEqual } from "node:util";
import type { ExpertModule, RouterConfig } from "../../compiler/model.ts";
import type { KernelSource } from "../gpu/kernel.ts";
import { interfaceProblem, layerTensor, type FamilyBinding, type KernelFamily, type Plan, type PlanKernel, type PlanOp } from "../package/format.ts";
import { EngineError } from "./engine-error.ts";
import type { Tenant } from "./tenants.ts";
import type { GpuWeights } from "./weights.ts";

/** The router kernels of one layer, as the engine dispatches them. */
export interface RouterKernels {
  readonly score?: KernelSource;
  readonly pool?: KernelSource;
  readonly gate: KernelSource;
}

/** Makes kernels the plan does not hold (see EngineOptions.resolver). */
export interface KernelResolver {
  /** The kernels of a router with `config` in a layer whose enabled modules are `experts`. */
  router(config: RouterConfig, hidden: number, experts: readonly ExpertModule[]): RouterKernels;
  /** The variant of the plan's linear kernel `kernel` for a row block of `rows` outputs. */
  block(kernel: PlanKernel, rows: number): KernelSource;
}

export interface EngineKernelsOptions {
  readonly plan: Plan<ExpertModule>;
  /** The WGSL by kernel key, covering the plan's kernel set. */
  readonly kernels: ReadonlyMap<string, KernelSource>;
  readonly resolver: KernelResolver | undefined;
}

type LinearOp = Extract<PlanOp, { op: "linear" }>;

export class EngineKernels {
  readonly #plan: Plan<ExpertModule>;
  readonly #kernels: ReadonlyMap<string, KernelSource>;
  readonly #resolver: KernelResolver | undefined;
  /** Kernels from the resolver, so each is made once. */
  readonly #resolved = new Map<string, KernelSource>();
  readonly #resolvedRouters = new Map<string, RouterKernels>();

  /** Throws EngineError when a kernel of the plan is missing or does not match its family's interface. */
  constructor(options: EngineKernelsOptions) {
    const { plan, kernels } = options;
    const missing = plan.kernels.filter((k) => !kernels.has(k.key)).map((k) => k.key);
    if (missing.length > 0) throw new EngineError(`no WGSL was given for kernel${missing.length === 1 ? "" : "s"} ${missing.join(", ")} of the plan`);
    for (const k of plan.kernels) {
      const problem = interfaceProblem(k.family, kernels.get(k.key)!);
      if (problem !== undefined) throw new EngineError(`kernel ${k.key}: ${problem}`);
    }
    this.#plan = plan;
    this.#kernels = kernels;
    this.#resolver = options.resolver;
  }

  /**
   * The plan's kernel `key`, typed by its family's bindings (FAMILY_BINDINGS: checked at load), so a
   * dispatch naming a binding the family lacks does not compile.
   */
  get<F extends KernelFamily>(_family: F, key: string): KernelSource<FamilyBinding<F>> {
    return this.#kernels.get(key)! as KernelSource<FamilyBinding<F>>;
  }

  /** The kernel for a row block of `rows` outputs of a split weight: the plan's, else the resolver's. */
  block(op: LinearOp, family: "matmul" | "matvec", rows: number): KernelSource<FamilyBinding<"matmul" | "matvec">> {
    const planned = op.blocks?.find((b) => b.rows === rows)?.[family];
    if (planned !== undefined) return this.get(family, planned);
    const key = op[family];
    const id = `block ${key} ${rows}`;
    let source = this.#resolved.get(id);
    if (source === undefined) {
      if (this.#resolver === undefined) {
        throw new EngineError(`${op.module}'s weight is split into blocks of ${rows} rows, finer than the plan's binding size assumes, and the plan has no kernel for them: recompile for a smaller binding size`);
      }
      source = this.#resolver.block(this.#plan.kernels.find((k) => k.key === key)!, rows);
      this.#resolved.set(id, source);
    }
    return source as KernelSource<FamilyBinding<"matmul" | "matvec">>;
  }

  /** A router's kernels in `layer`: the plan's when it was made for this router, else the resolver's. */
  router(config: RouterConfig, layer: number, experts: readonly ExpertModule[]): RouterKernels {
    const planned = this.#plan.routers.find((r) => r.layer === layer);
    if (planned && isDeepStrictEqual(this.#plan.router, config) && isDeepStrictEqual([...planned.experts], [...experts])) {
      const { score, pool, gate } = planned;
      return { ...(score ? { score: this.#kernels.get(score)! } : {}), ...(pool ? { pool: this.#kernels.get(pool)! } : {}), gate: this.#kernels.get(gate)! };
    }
    const id = `router ${JSON.stringify(config)} ${experts.join(",")}`;
    let kernels = this.#resolvedRouters.get(id);
    if (kernels === undefined) {
      if (this.#resolver === undefined) throw new EngineError(`the plan has no router kernels for this adapter's router in layer ${layer}: it was made for another router`);
      kernels = this.#resolver.router(config, this.#plan.dims.hidden, experts);
      this.#resolvedRouters.set(id, kernels);
    }
    return kernels;
  }

  /** Every kernel a tenant's sequences dispatch besides the plan's (its routers'), to compile them when it is loaded. */
  ofTenant(tenant: Tenant): KernelSource[] {
    const config = tenant.adapter.spec.router;
    if (!config) return [];
    return [...tenant.routers].flatMap(([layer, router]) => Object.values(this.router(config, layer, router.experts)));
  }

  /** The plan's kernels and the row-block kernels of the weights as uploaded: what a step may dispatch without a tenant. */
  *all(weights: GpuWeights): Iterable<KernelSource> {
    yield* this.#kernels.values();
    for (const op of [...this.#plan.layer, ...this.#plan.head]) {
      if (op.op !== "linear") continue;
      const weight = weights.get(layerTensor(op.weight, 0));
      if (weight.blocks.length === 1) continue;
      for (const b of weight.blocks) for (const family of ["matmul", "matvec"] as const) yield this.block(op, family, b.rows);
    }
  }
}
