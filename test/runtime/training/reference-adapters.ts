// Shared by the training tests: the per-token Mixture-of-LoRA specs they train (per_module, MOELoRA;
// per_ffn, MixLoRA), the float64 training reference's view (test/reference/train.ts) of an adapter in
// memory, and how close the reference's routing came to a tie.
import { FFN_MODULES, type Adapter, type BaseModel, type ExpertModule, type MoeRouting } from "../../../compiler/model.ts";
import { peftSpec } from "../../../examples/random-adapter.ts";
import { moeRouterKey, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import type { ReferenceLora, ReferenceMoe, ReferenceTrainAdapter } from "../../reference/train.ts";

export type Placement = MoeRouting["placement"];
export const PLACEMENTS: readonly Placement[] = ["per_module", "per_ffn"];

export const topK = (k: number, renormalize: boolean): MoeRouting["selection"] => ({ rule: "top_k", k, renormalize });
export const DENSE: MoeRouting["selection"] = { rule: "dense" };

/**
 * A per-token baseline's spec: `modules` of every layer at `rank` (alpha 2 rank) and E experts: per_module
 * splits each module's rank among its E experts under a router per module; per_ffn gives each MLP module
 * E experts of that rank (stacked to rank E x rank) under one router per layer with an MLP module.
 */
export function moeSpec(o: {
  readonly placement: Placement;
  readonly base: BaseModel;
  readonly modules: readonly ExpertModule[];
  readonly rank: number;
  readonly experts: number;
  readonly selection: MoeRouting["selection"];
  readonly balance: number;
  readonly dropout?: number;
}): Adapter {
  if (o.placement === "per_ffn" && !o.modules.some((m) => FFN_MODULES.includes(m))) throw new Error("moeSpec: a per_ffn adapter needs an MLP module (MIL219)");
  const plain = peftSpec({ base: o.base, modules: o.modules, rank: o.rank, alpha: 2 * o.rank, seed: 0, name: o.placement === "per_ffn" ? "mixlora" : "moe" });
  return {
    ...plain,
    experts: plain.experts.map((e) => ({ ...e, dropout: o.dropout ?? 0 })),
    moe: { placement: o.placement, experts: o.experts, selection: o.selection, balance: o.balance },
  };
}

/** The reference's LoRA of an adapter in memory (float64 copies; a per_ffn MLP module's experts stacked, as in memory). */
export function referenceLora(adapter: LoadedAdapter): Map<string, ReferenceLora> {
  return new Map([...adapter.lora].map(([key, w]): [string, ReferenceLora] => [key, { a: Float64Array.from(w.a), b: Float64Array.from(w.b), rank: w.rank, scaling: w.scaling }]));
}

/** The reference's LoRA and routers (float64 copies) of a per_module or per_ffn adapter in memory. */
export function referenceMoeAdapter(adapter: LoadedAdapter): Pick<ReferenceTrainAdapter, "lora" | "moe" | "balance"> {
  const moe = adapter.spec.moe;
  if (!moe) throw new Error("referenceMoeAdapter: not a per-token baseline");
  // A router per module (per_module) or per layer with an MLP module (per_ffn), keyed as the reference keys them.
  const routed: [number, ExpertModule | "ffn"][] =
    moe.placement === "per_ffn"
      ? [...new Set(adapter.spec.experts.filter((e) => FFN_MODULES.includes(e.module)).map((e) => e.layer))].map((layer) => [layer, "ffn"])
      : adapter.spec.experts.map((e) => [e.layer, e.module]);
  const routers = new Map(routed.map(([layer, at]) => [`${layer}.${at}`, Float64Array.from(adapter.moeRouters!.get(moeRouterKey(layer, at))!)] as const));
  const selection: ReferenceMoe["selection"] = moe.selection.rule === "dense" ? { rule: "dense" } : { rule: "top_k", k: moe.selection.k, renormalize: moe.selection.renormalize };
  return { lora: referenceLora(adapter), moe: { ...(moe.placement === "per_ffn" ? { placement: "per_ffn" } : {}), experts: moe.experts, selection, routers }, balance: moe.balance };
}

/** The smallest logit gap between the last kept expert and the best dropped one over the decisions (Infinity when all are kept). */
export function closestCall(decisions: readonly { readonly logits: readonly number[]; readonly gates: readonly number[] }[]): number {
  let closest = Infinity;
  for (const d of decisions) {
    const kept = d.logits.filter((_, e) => d.gates[e] !== 0);
    const dropped = d.logits.filter((_, e) => d.gates[e] === 0);
    if (dropped.length > 0) closest = Math.min(closest, Math.min(...kept) - Math.max(...dropped));
  }
  return closest;
}
