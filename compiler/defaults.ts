// The defaults a spec gets for what it leaves out: the one place they are written down
// (docs/language.md repeats them). Values follow the MiLoRA authors' public code, except the gates:
// the paper's un-renormalised top-k softmax probabilities (eq. 3), not the code's renormalised ones.
import type { RouterConfig } from "./model.ts";

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
