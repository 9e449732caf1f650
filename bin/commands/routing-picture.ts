// `milora run --routing-svg FILE`: the run's routing as one picture (runtime/pictures/heatmap.ts), a
// panel per tenant side by side: layers x modules for prompt routing, tokens x layers for per-token
// routing (labelled with the tokens when the model has a tokenizer).
import { writeFileSync } from "node:fs";
import type { Adapter } from "../../compiler/model.ts";
import type { Generation } from "../../runtime/engine/requests.ts";
import type { LayerRouting } from "../../runtime/engine/routing.ts";
import { routingSvg, type RoutingPanel } from "../../runtime/pictures/heatmap.ts";

export interface RoutingPictureRun {
  /** The tenant (adapter) name; undefined for the base model alone. */
  readonly tenant: string | undefined;
  readonly result: Generation;
  /** The tenant's spec: a plain LoRA adapter (no router) is drawn with its modules at gate 1. */
  readonly spec?: Adapter;
}

/** Plain LoRA's "routing": every module the adapter has, on at gate 1, in every layer it covers. */
function allOn(spec: Adapter): LayerRouting[] {
  return spec.layers.map((layer) => ({ layer, experts: Object.fromEntries(spec.experts.filter((e) => e.layer === layer).map((e) => [e.module, 1])) }));
}

/** The panels of a run: the prompt's tokens then the generated ones label token-routed strips. */
export function routingPanels(runs: readonly RoutingPictureRun[], prompt: readonly number[], decodeOne?: (token: number) => string): RoutingPanel[] {
  return runs.map(({ tenant, result, spec }) => {
    const ids = [...prompt, ...result.tokens];
    // A per-token baseline chooses experts inside each module: it has no per-layer gates to draw.
    const moe = spec?.moe;
    const subtitle =
      tenant === undefined ? "no adapter: nothing is routed" : moe ? `${moe.placement} routing among experts inside the modules at every token: not drawn` : "no routers (plain LoRA): every module on";
    return {
      title: tenant ?? "base model",
      routing: result.routing ?? (spec && !spec.router && !moe ? allOn(spec) : []),
      ...(decodeOne ? { tokens: ids.map(decodeOne) } : {}),
      ...(result.routing === undefined ? { subtitle } : {}),
    };
  });
}

export function writeRoutingSvg(file: string, runs: readonly RoutingPictureRun[], prompt: readonly number[], decodeOne?: (token: number) => string): void {
  writeFileSync(file, routingSvg(routingPanels(runs, prompt, decodeOne)));
}
