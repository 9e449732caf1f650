// `router { ... }` blocks -> RouterConfig, starting from the router the adapter has so far (or the defaults).
import type { RouterDecl, SelectClause } from "../grammar/ast.ts";
import { ROUTER_DEFAULTS } from "./defaults.ts";
import type { Activation, Pooling, RouterConfig, RoutingTime, Selection } from "./model.ts";
import type { Reporter } from "./reporter.ts";
import { didYouMean } from "./suggest.ts";
import { booleanValue, choiceValue, knownProperties, numberValue } from "./values.ts";

const POOLINGS: readonly Pooling[] = ["last", "mean", "max", "attention"];
const ACTIVATIONS: readonly Activation[] = ["none", "gelu", "relu"];
const WHENS: readonly RoutingTime[] = ["prompt", "token"];
const RULES: readonly Selection["rule"][] = ["top_k", "threshold", "dense"];
const ROUTER_KEYS = ["placement", "input", "pooling", "activation", "when", "noise", "balance"];

/** The router after applying a block; `router off` gives undefined (plain LoRA). */
export function applyRouter(
  decl: RouterDecl,
  current: RouterConfig | undefined,
  r: Reporter,
): RouterConfig | undefined {
  if (decl.off) return undefined;
  const router: { -readonly [K in keyof RouterConfig]: RouterConfig[K] } = { ...(current ?? ROUTER_DEFAULTS) };
  for (const prop of knownProperties(decl.properties, ROUTER_KEYS, "router", r)) {
    switch (prop.key.name) {
      case "placement":
        router.placement = choiceValue(prop, ["per_layer"], r) ?? router.placement;
        break;
      case "input":
        router.input = choiceValue(prop, ["layer_input"], r) ?? router.input;
        break;
      case "pooling":
        router.pooling = choiceValue(prop, POOLINGS, r) ?? router.pooling;
        break;
      case "activation":
        router.activation = choiceValue(prop, ACTIVATIONS, r) ?? router.activation;
        break;
      case "when":
        router.when = choiceValue(prop, WHENS, r) ?? router.when;
        break;
      case "noise":
        router.noise = booleanValue(prop, r) ?? router.noise;
        break;
      case "balance": {
        const n = numberValue(prop, r);
        if (n === undefined) break;
        if (n.value < 0) r.report("MIL405", n.span, `balance must be 0 or more, got ${n.text}`);
        else {
          if (n.value > 1) {
            r.report(
              "MIL502",
              n.span,
              `balance ${n.text} is above 1 and will likely swamp the language-model loss`,
              "typical values are 0.01 to 0.1",
            );
          }
          router.balance = n.value;
        }
        break;
      }
    }
  }
  if (decl.select !== undefined) router.selection = selection(decl.select, r) ?? router.selection;
  return router;
}

function selection(clause: SelectClause, r: Reporter): Selection | undefined {
  const rule = clause.rule.name;
  const arg = clause.argument;
  switch (rule) {
    case "top_k":
      if (arg === undefined) {
        r.report("MIL404", clause.span, "`select top_k` needs the number of experts to keep", "write `select top_k 2`");
        return undefined;
      }
      if (!arg.integer || arg.value < 1) {
        r.report("MIL402", arg.span, `top_k must be a positive integer, got ${arg.text}`);
        return undefined;
      }
      if (arg.value === 1) {
        r.report(
          "MIL501",
          arg.span,
          "with top_k 1 the softmax over one expert is always 1, so the router gets no gradient from the loss",
          "use `select top_k 2` or `select dense`",
        );
      }
      return { rule, k: arg.value };
    case "threshold":
      if (arg === undefined) {
        r.report("MIL404", clause.span, "`select threshold` needs a gate threshold", "write `select threshold 0.2`");
        return undefined;
      }
      if (!(arg.value > 0 && arg.value < 1)) {
        r.report("MIL403", arg.span, `threshold must be between 0 and 1 (exclusive), got ${arg.text}`);
        return undefined;
      }
      return { rule, threshold: arg.value };
    case "dense":
      if (arg !== undefined) {
        r.report("MIL404", arg.span, "`select dense` takes no argument: every expert is used", "write `select dense`");
        return undefined;
      }
      return { rule };
    default:
      r.report("MIL104", clause.rule.span, `unknown selection rule \`${rule}\``, didYouMean(rule, RULES));
      return undefined;
  }
}
