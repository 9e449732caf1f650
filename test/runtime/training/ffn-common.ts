// Shared by the per_ffn (MixLoRA) training tests: a per_ffn spec over a base, and the float64 training
// reference's view (test/reference/train.ts) of a per_ffn adapter in memory.
import { FFN_MODULES, type Adapter, type BaseModel, type ExpertModule, type MoeRouting } from "../../../compiler/model.ts";
import { peftSpec } from "../../../examples/random-adapter.ts";
import { moeRouterKey, type LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import type { ReferenceLora, ReferenceMoe, ReferenceTrainAdapter } from "../../reference/train.ts";

/**
 * A per_ffn adapter's spec: `modules` of every layer at `rank` (alpha 2 rank; an MLP module holds E
 * experts of that rank, stacked to rank E x rank), one router of E experts per layer with an MLP module.
 */
export function ffnSpec(o: {
  readonly base: BaseModel;
  readonly modules: readonly ExpertModule[];
  readonly rank: number;
  readonly experts: number;
  readonly selection: MoeRouting["selection"];
  readonly balance: number;
  readonly dropout?: number;
}): Adapter {
  if (!o.modules.some((m) => FFN_MODULES.includes(m))) throw new Error("ffnSpec: a per_ffn adapter needs an MLP module (MIL219)");
  const plain = peftSpec({ base: o.base, modules: o.modules, rank: o.rank, alpha: 2 * o.rank, seed: 0, name: "mixlora" });
  return {
    ...plain,
    experts: plain.experts.map((e) => ({ ...e, dropout: o.dropout ?? 0 })),
    moe: { placement: "per_ffn", experts: o.experts, selection: o.selection, balance: o.balance },
  };
}

/** The reference's LoRA (the MLP modules' stacked, as in memory) and per_ffn routers (float64 copies) of an adapter in memory. */
export function referenceFfnAdapter(adapter: LoadedAdapter): Pick<ReferenceTrainAdapter, "lora" | "moe" | "balance"> {
  const moe = adapter.spec.moe;
  if (!moe || moe.placement !== "per_ffn") throw new Error("referenceFfnAdapter: not a per_ffn adapter");
  const lora = new Map([...adapter.lora].map(([key, w]): [string, ReferenceLora] => [key, { a: Float64Array.from(w.a), b: Float64Array.from(w.b), rank: w.rank, scaling: w.scaling }]));
  const routers = new Map(
    [...new Set(adapter.spec.experts.filter((e) => FFN_MODULES.includes(e.module)).map((e) => e.layer))].map((layer) => [`${layer}.ffn`, Float64Array.from(adapter.moeRouters!.get(moeRouterKey(layer, "ffn"))!)] as const),
  );
  const selection: ReferenceMoe["selection"] = moe.selection.rule === "dense" ? { rule: "dense" } : { rule: "top_k", k: moe.selection.k, renormalize: moe.selection.renormalize };
  return { lora, moe: { placement: "per_ffn", experts: moe.experts, selection, routers }, balance: moe.balance };
}
