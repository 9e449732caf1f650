// Shared by the per_module (MOELoRA) training tests: a per_module spec over a base, and the float64
// training reference's view (test/reference/train.ts) of a per_module adapter in memory.
import type { Adapter, BaseModel, ExpertModule, MoeRouting } from "../../../compiler/model.ts";
import { peftSpec } from "../../../examples/random-adapter.ts";
import { moeRouterKey, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import type { ReferenceLora, ReferenceMoe, ReferenceTrainAdapter } from "../../reference/train.ts";

export const topK = (k: number, renormalize: boolean): MoeRouting["selection"] => ({ rule: "top_k", k, renormalize });
export const DENSE: MoeRouting["selection"] = { rule: "dense" };

/** A per_module adapter's spec: `modules` of every layer at `rank` (alpha 2 rank), E experts each. */
export function moeSpec(o: {
  readonly base: BaseModel;
  readonly modules: readonly ExpertModule[];
  readonly rank: number;
  readonly experts: number;
  readonly selection: MoeRouting["selection"];
  readonly balance: number;
  readonly dropout?: number;
}): Adapter {
  const plain = peftSpec({ base: o.base, modules: o.modules, rank: o.rank, alpha: 2 * o.rank, seed: 0, name: "moe" });
  return {
    ...plain,
    experts: plain.experts.map((e) => ({ ...e, dropout: o.dropout ?? 0 })),
    moe: { placement: "per_module", experts: o.experts, selection: o.selection, balance: o.balance },
  };
}

/** The reference's LoRA and per_module routers (float64 copies) of an adapter in memory. */
export function referenceMoeAdapter(adapter: LoadedAdapter): Pick<ReferenceTrainAdapter, "lora" | "moe" | "balance"> {
  const moe = adapter.spec.moe;
  if (!moe || moe.placement !== "per_module") throw new Error("referenceMoeAdapter: not a per_module adapter");
  const lora = new Map([...adapter.lora].map(([key, w]): [string, ReferenceLora] => [key, { a: Float64Array.from(w.a), b: Float64Array.from(w.b), rank: w.rank, scaling: w.scaling }]));
  const routers = new Map(adapter.spec.experts.map((e) => [`${e.layer}.${e.module}`, Float64Array.from(adapter.moeRouters!.get(moeRouterKey(e.layer, e.module))!)] as const));
  const selection: ReferenceMoe["selection"] = moe.selection.rule === "dense" ? { rule: "dense" } : { rule: "top_k", k: moe.selection.k, renormalize: moe.selection.renormalize };
  return { lora, moe: { experts: moe.experts, selection, routers }, balance: moe.balance };
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
