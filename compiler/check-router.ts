// `router { ... }` blocks -> RouterConfig, starting from the router the adapter has so far (or the defaults).
import type { Property, RouterDecl, SelectClause } from "../grammar/ast.ts";
import { ROUTER_DEFAULTS } from "./defaults.ts";
import type { Activation, Pooling, RouterConfig, RoutingTime, Selection } from "./model.ts";
import { RATIONAL_DEFAULT_ORDERS, RATIONAL_ORDER_LIMITS, type RationalOrders } from "./rational.ts";
import type { Reporter } from "./reporter.ts";
import { didYouMean } from "./suggest.ts";
import { booleanValue, choiceValue, knownProperties, numberValue } from "./values.ts";

const POOLINGS: readonly Pooling[] = ["last", "mean", "max", "attention"];
const ACTIVATIONS: readonly Activation[] = ["none", "gelu", "relu", "rational"];
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
    if (prop.options !== undefined && prop.key.name !== "activation") {
      r.report("MIL406", prop.key.span, `\`${prop.key.name}\` takes no options block`, "only `activation rational { numerator M denominator N }` has options");
    }
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
      case "activation": {
        const activation = choiceValue(prop, ACTIVATIONS, r);
        if (activation === undefined) break;
        if (activation !== "rational") {
          if (prop.options !== undefined) r.report("MIL406", prop.key.span, `activation ${activation} takes no options block`, "only `activation rational` has options (numerator, denominator)");
          router.activation = activation;
          delete router.rational;
          break;
        }
        const orders = rationalOrders(prop, router.rational ?? RATIONAL_DEFAULT_ORDERS, r);
        if (orders === undefined) break;
        router.activation = "rational";
        router.rational = orders;
        break;
      }
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

/** `activation rational { numerator M denominator N }`: the orders, starting from `current`. */
function rationalOrders(prop: Property, current: RationalOrders, r: Reporter): RationalOrders | undefined {
  const orders = { ...current };
  let ok = true;
  for (const option of knownProperties(prop.options ?? [], ["numerator", "denominator"], "rational activation", r)) {
    const key = option.key.name as keyof RationalOrders;
    const n = numberValue(option, r);
    if (n === undefined) {
      ok = false;
      continue;
    }
    const [lo, hi] = RATIONAL_ORDER_LIMITS[key];
    if (!n.integer || n.value < lo || n.value > hi) {
      r.report("MIL406", n.span, `rational ${key} order must be an integer from ${lo} to ${hi}, got ${n.text}`, `the paper's orders are numerator ${RATIONAL_DEFAULT_ORDERS.numerator} denominator ${RATIONAL_DEFAULT_ORDERS.denominator}`);
      ok = false;
      continue;
    }
    orders[key] = n.value;
  }
  return ok ? orders : undefined;
}

/** `renormalize` after the rule's argument: whether it was written (undefined after an error). */
function renormalizeOf(clause: SelectClause, r: Reporter): boolean | undefined {
  const m = clause.modifier;
  if (m === undefined) return false;
  if (m.name === "renormalize") return true;
  r.report("MIL104", m.span, `unknown selection modifier \`${m.name}\``, didYouMean(m.name, ["renormalize"]));
  return undefined;
}

function selection(clause: SelectClause, r: Reporter): Selection | undefined {
  const rule = clause.rule.name;
  const arg = clause.argument;
  const renormalize = renormalizeOf(clause, r);
  if (renormalize === undefined) return undefined;
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
      // Renormalised over one survivor, the gate is constantly 1. The paper's gate (the expert's
      // probability over all experts) is not constant, so plain `top_k 1` is fine.
      if (arg.value === 1 && renormalize) {
        r.report(
          "MIL501",
          clause.modifier!.span,
          "with top_k 1 renormalize the gate of the one chosen expert is always 1, so the router gets no gradient from the loss",
          "drop `renormalize` (the gate is then the expert's softmax probability) or use `select top_k 2 renormalize`",
        );
      }
      return { rule, k: arg.value, renormalize };
    case "threshold":
      if (arg === undefined) {
        r.report("MIL404", clause.span, "`select threshold` needs a gate threshold", "write `select threshold 0.2`");
        return undefined;
      }
      if (!(arg.value > 0 && arg.value < 1)) {
        r.report("MIL403", arg.span, `threshold must be between 0 and 1 (exclusive), got ${arg.text}`);
        return undefined;
      }
      return { rule, threshold: arg.value, renormalize };
    case "dense":
      if (arg !== undefined) {
        r.report("MIL404", arg.span, "`select dense` takes no argument: every expert is used", "write `select dense`");
        return undefined;
      }
      if (renormalize) {
        r.report("MIL404", clause.modifier!.span, "`select dense` gates are the softmax over every expert and already sum to 1", "write `select dense`");
        return undefined;
      }
      return { rule };
    default:
      r.report("MIL104", clause.rule.span, `unknown selection rule \`${rule}\``, didYouMean(rule, RULES));
      return undefined;
  }
}
