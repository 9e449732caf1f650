// `router { ... }` blocks -> the adapter's routing (MiLoRA's per-layer router, or a per-token
// Mixture-of-LoRA baseline's), starting from the routing the adapter has so far (or the defaults).
import type { Property, RouterDecl, SelectClause } from "../grammar/ast.ts";
import { MOE_DEFAULTS, ROUTER_DEFAULTS } from "./defaults.ts";
import type { Activation, MoePlacement, MoeRouting, Pooling, RouterConfig, RoutingTime, Selection } from "./model.ts";
import { RATIONAL_DEFAULT_ORDERS, RATIONAL_ORDER_LIMITS, type RationalOrders } from "./rational.ts";
import type { Reporter } from "./reporter.ts";
import { didYouMean } from "./suggest.ts";
import { MAX_MOE_EXPERTS } from "./limits.ts";
import { booleanValue, choiceValue, knownProperties, numberValue } from "./values.ts";

const POOLINGS: readonly Pooling[] = ["last", "mean", "max", "attention"];
const ACTIVATIONS: readonly Activation[] = ["none", "gelu", "relu", "rational"];
const WHENS: readonly RoutingTime[] = ["prompt", "token"];
const RULES: readonly Selection["rule"][] = ["top_k", "threshold", "dense"];
const PLACEMENTS = ["per_layer", "per_module", "per_ffn"] as const;
/** Keys of MiLoRA's per-layer router only: a per-token baseline's router reads each token's own input, plainly. */
const LAYER_ROUTER_KEYS = ["input", "pooling", "activation", "when", "noise"];
const ROUTER_KEYS = ["placement", ...LAYER_ROUTER_KEYS, "balance", "num_experts"];

/** An adapter's routing: MiLoRA's router, a per-token baseline's (`moe`), or neither (plain LoRA). */
export interface Routing {
  readonly router?: RouterConfig;
  readonly moe?: MoeRouting;
}

/** The routing after applying a block; `router off` gives neither router (plain LoRA). */
export function applyRouter(decl: RouterDecl, current: Routing | undefined, r: Reporter): Routing {
  if (decl.off) return {};
  const props = knownProperties(decl.properties, ROUTER_KEYS, "router", r);
  for (const prop of props) {
    if (prop.options !== undefined && prop.key.name !== "activation") {
      r.report("MIL406", prop.key.span, `\`${prop.key.name}\` takes no options block`, "only `activation rational { numerator M denominator N }` has options");
    }
  }
  // The placement decides which keys apply, wherever in the block it is written.
  const placementProp = props.find((p) => p.key.name === "placement");
  const written = placementProp && choiceValue(placementProp, PLACEMENTS, r);
  const placement = written ?? current?.moe?.placement ?? "per_layer";
  if (placement === "per_layer") return { router: applyLayerRouter(decl, props, current?.router ?? ROUTER_DEFAULTS, r) };
  const start = current?.moe?.placement === placement ? current.moe : MOE_DEFAULTS[placement];
  return { moe: applyMoeRouter(decl, props, placement, start, r) };
}

/** A per_module or per_ffn router block over `start`. */
function applyMoeRouter(decl: RouterDecl, props: readonly Property[], placement: MoePlacement, start: MoeRouting, r: Reporter): MoeRouting {
  const moe: { -readonly [K in keyof MoeRouting]: MoeRouting[K] } = { ...start };
  for (const prop of props) {
    switch (prop.key.name) {
      case "num_experts": {
        const n = numberValue(prop, r);
        if (n === undefined) break;
        if (!n.integer || n.value < 2 || n.value > MAX_MOE_EXPERTS) r.report("MIL407", n.span, `num_experts must be an integer from 2 to ${MAX_MOE_EXPERTS}, got ${n.text}`);
        else moe.experts = n.value;
        break;
      }
      case "balance":
        moe.balance = balanceValue(prop, r) ?? moe.balance;
        break;
      case "placement":
        break;
      default:
        r.report(
          "MIL407",
          prop.key.span,
          `\`${prop.key.name}\` applies to MiLoRA's per_layer router only: a ${placement} router routes every token on the module's own input`,
          "drop the key, or write `placement per_layer`",
        );
    }
  }
  if (decl.select !== undefined) {
    const chosen = selection(decl.select, r);
    if (chosen?.rule === "threshold") {
      r.report("MIL407", decl.select.rule.span, `a ${placement} router keeps top_k experts or all of them (dense); threshold selection is MiLoRA's per_layer router's`, "write `select top_k 2 renormalize` or `select dense`");
    } else if (chosen !== undefined) moe.selection = chosen;
  }
  return moe;
}

/** `balance`: a coefficient of 0 or more (a warning above 1). */
function balanceValue(prop: Property, r: Reporter): number | undefined {
  const n = numberValue(prop, r);
  if (n === undefined) return undefined;
  if (n.value < 0) {
    r.report("MIL405", n.span, `balance must be 0 or more, got ${n.text}`);
    return undefined;
  }
  if (n.value > 1) r.report("MIL502", n.span, `balance ${n.text} is above 1 and will likely swamp the language-model loss`, "typical values are 0.01 to 0.1");
  return n.value;
}

/** MiLoRA's per-layer router block over `start`. */
function applyLayerRouter(decl: RouterDecl, props: readonly Property[], start: RouterConfig, r: Reporter): RouterConfig {
  const router: { -readonly [K in keyof RouterConfig]: RouterConfig[K] } = { ...start };
  for (const prop of props) {
    switch (prop.key.name) {
      case "placement":
        break;
      case "num_experts":
        r.report("MIL407", prop.key.span, "num_experts applies to per_module and per_ffn routers: MiLoRA's experts are the layer's enabled modules", "drop the key, or write `placement per_module` or `placement per_ffn`");
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
      case "balance":
        router.balance = balanceValue(prop, r) ?? router.balance;
        break;
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
