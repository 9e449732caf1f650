// Merged mode, for one tenant: its LoRA folded into the base weights (W + g * scaling * B A) for one
// routing decision, so sequences without an adapter then run the base kernels only; unmerging puts
// back what the changed weights held before. A DoRA module folds to W + g (d * (W + scaling * B A) - W),
// with the factors d the tenant was loaded with (dora.ts): exactly what the unmerged kernels compute.
import type { ExpertModule } from "../../compiler/model.ts";
import type { Plan } from "../package/format.ts";
import { loraKey } from "../formats/adapter.ts";
import { EngineError } from "./engine-error.ts";
import { allOnGates, gateColumn, gatesOf, type LayerRouting } from "./routing.ts";
import type { Tenant } from "./tenants.ts";
import type { GpuWeights } from "./weights.ts";

export interface MergedModeOptions {
  readonly device: GPUDevice;
  readonly plan: Plan<ExpertModule>;
  readonly weights: GpuWeights;
}

/** The tenant folded into the base weights, and what the changed weights held before. */
interface MergedState {
  readonly tenant: string;
  readonly originals: ReadonlyMap<string, Float32Array>;
}

export class MergedMode {
  readonly #device: GPUDevice;
  readonly #plan: Plan<ExpertModule>;
  readonly #weights: GpuWeights;
  #merged: MergedState | undefined;

  constructor(options: MergedModeOptions) {
    this.#device = options.device;
    this.#plan = options.plan;
    this.#weights = options.weights;
  }

  /** The merged tenant's name, if any. */
  get tenant(): string | undefined {
    return this.#merged?.tenant;
  }

  /**
   * Folds `tenant` into the base weights for one routing decision (a prompt-routed adapter's `routing`,
   * e.g. a sequence's; gate 1 everywhere for plain LoRA). Token routing cannot be folded.
   */
  async merge(tenant: Tenant, routing?: readonly LayerRouting[]): Promise<void> {
    if (this.#merged) throw new EngineError(`adapter ${this.#merged.tenant} is already merged: unmerge it first`);
    const { name } = tenant;
    const router = tenant.adapter.spec.router;
    const moe = tenant.adapter.spec.moe;
    if (router?.when === "token" || moe) throw new EngineError(`adapter ${name} routes every token${moe ? ` (${moe.placement})` : ""}, which no single set of merged weights can express`);
    if (router && !routing) throw new EngineError(`adapter ${name} is routed: merging needs a routing decision (a prompt's)`);
    const { layers } = this.#plan.dims;
    const gates = routing ? gatesOf(routing, layers) : allOnGates(tenant, layers);
    const originals = new Map<string, Float32Array>();
    for (const { layer, module } of tenant.adapter.spec.experts) {
      const g = gates[gateColumn(layer, module)]!;
      if (g === 0) continue;
      const key = loraKey(layer, module);
      const w = tenant.adapter.lora.get(key)!;
      const tensor = this.#plan.tensors.find((t) => t.layer === layer && t.module === module)!.name;
      const original = await this.#weights.read(this.#device, tensor);
      originals.set(tensor, original);
      this.#weights.write(this.#device.queue, tensor, foldLora(original, w.a, w.b, w.rank, g, w.scaling, tenant.dora.get(key)));
    }
    this.#merged = { tenant: name, originals };
  }

  /** Restores the base weights a merge changed (nothing when none is merged). */
  unmerge(): void {
    if (!this.#merged) return;
    for (const [name, data] of this.#merged.originals) this.#weights.write(this.#device.queue, name, data);
    this.#merged = undefined;
  }
}

/**
 * W + g * scaling * B A for W [out, in] row-major, A [rank, in], B [out, rank]; with DoRA factors d [out],
 * W + g (d * (W + scaling * B A) - W), row o being (1 + g (d_o - 1)) W_o + g d_o scaling (B A)_o.
 */
function foldLora(w: Float32Array, a: Float32Array, b: Float32Array, rank: number, gate: number, scaling: number, dora?: Float32Array): Float32Array {
  const inF = a.length / rank;
  const out = Float32Array.from(w);
  for (let o = 0; o < out.length / inF; o++) {
    const d = dora?.[o] ?? 1;
    if (d !== 1) for (let i = 0; i < inF; i++) out[o * inF + i]! *= 1 + gate * (d - 1);
    for (let j = 0; j < rank; j++) {
      const coef = gate * d * scaling * b[o * rank + j]!;
      for (let i = 0; i < inF; i++) out[o * inF + i]! += coef * a[j * inF + i]!;
    }
  }
  return out;
}
