// The defaults a spec gets for what it leaves out: the one place they are written down
// (docs/language.md repeats them). Values follow the MiLoRA authors' public code, except the gates:
// the paper's un-renormalised top-k softmax probabilities (eq. 3), not the code's renormalised ones.
import type { MoePlacement, MoeRouting, RouterConfig } from "./model.ts";

/** LoRA options of an expert module that no `experts` line has set. */
export const LORA_DEFAULTS = {
  rank: 8,
  alpha: 32,
  dropout: 0.3,
  rslora: false,
  dora: false,
} as const;

/** The router an adapter gets when it has no `router` block (and the start of any `router { }` block). */
export const ROUTER_DEFAULTS: RouterConfig = {
  placement: "per_layer",
  input: "layer_input",
  pooling: "last",
  selection: { rule: "top_k", k: 2, renormalize: false },
  activation: "none",
  when: "prompt",
  noise: true,
  balance: 0.1,
};

/**
 * Where a `router { placement per_module | per_ffn }` block starts: the MiLoRA paper's MOELoRA setting
 * (8 experts of rank r/8, top 4) and MixLoRA's (8 experts, top 2, renormalised as Mixtral's router),
 * with the load-balancing coefficient 0.01 of the MixLoRA paper.
 */
export const MOE_DEFAULTS: Readonly<Record<MoePlacement, MoeRouting>> = {
  per_module: { placement: "per_module", experts: 8, selection: { rule: "top_k", k: 4, renormalize: true }, balance: 0.01 },
  per_ffn: { placement: "per_ffn", experts: 8, selection: { rule: "top_k", k: 2, renormalize: true }, balance: 0.01 },
};
