// A sequence's routing as data: the gates of every (layer, module) in one flat row, the layout the
// LoRA kernels read (column layer * 7 + module index), and the decisions users see, per layer.
import { EXPERT_MODULES, type ExpertModule } from "../../compiler/model.ts";
import type { Tenant } from "./tenants.ts";

/** Gates of one layer's selected modules; a module left out has gate 0 and does no LoRA work. */
export type ModuleGates = Partial<Record<ExpertModule, number>>;

/** One router decision: per layer for prompt routing, per layer and position for token routing. */
export interface LayerRouting {
  readonly layer: number;
  /** The token position, for token routing only. */
  readonly position?: number;
  readonly experts: ModuleGates;
}

export const MODULES_PER_LAYER = EXPERT_MODULES.length;

/** Column of (layer, module) in a gates row. */
export function gateColumn(layer: number, module: ExpertModule): number {
  return layer * MODULES_PER_LAYER + EXPERT_MODULES.indexOf(module);
}

/** Plain LoRA's gates: 1 on every module the adapter has. */
export function allOnGates(tenant: Tenant, layers: number): Float32Array {
  const row = new Float32Array(layers * MODULES_PER_LAYER);
  for (let layer = 0; layer < layers; layer++) for (const m of EXPERT_MODULES) if (tenant.has(layer, m)) row[gateColumn(layer, m)] = 1;
  return row;
}

/** The decisions of the routed layers in one gates row (only selected modules, as the reference lists them). */
export function decisionsOf(row: Float32Array, layers: Iterable<number>, position?: number): LayerRouting[] {
  return [...layers].map((layer) => {
    const experts: ModuleGates = {};
    for (const m of EXPERT_MODULES) {
      const g = row[gateColumn(layer, m)]!;
      if (g !== 0) experts[m] = g;
    }
    return { layer, ...(position === undefined ? {} : { position }), experts };
  });
}

/** A gates row holding `decisions` (the inverse of decisionsOf): what merged mode folds in. */
export function gatesOf(decisions: readonly LayerRouting[], layers: number): Float32Array {
  const row = new Float32Array(layers * MODULES_PER_LAYER);
  for (const d of decisions) for (const [m, g] of Object.entries(d.experts)) row[gateColumn(d.layer, m as ExpertModule)] = g;
  return row;
}
