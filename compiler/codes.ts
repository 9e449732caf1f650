// The checker's diagnostic codes. Codes are stable: tests and docs/language.md refer to them.
// 1xx names, 2xx values, 3xx files and imports, 4xx routing, 5xx warnings.
import type { Severity } from "../grammar/diagnostic.ts";

export const CHECK_CODES = {
  MIL101: "unknown family",
  MIL102: "unknown expert module or group",
  MIL103: "unknown key",
  MIL104: "unknown value for a key with fixed choices",
  MIL105: "key or block given twice in one block",
  MIL106: "name defined twice (in this file or an imported one)",
  MIL107: "adapter on an undefined base",
  MIL108: "adapter extends an undefined adapter",
  MIL109: "adapters extend each other in a cycle",
  MIL201: "value of the wrong type or count",
  MIL202: "rank is not a positive integer",
  MIL203: "alpha is not positive",
  MIL204: "dropout outside [0, 1)",
  MIL205: "base size not positive (or not an integer)",
  MIL206: "hidden_size not divisible by heads",
  MIL207: "heads not divisible by kv_heads",
  MIL208: "layer outside the base",
  MIL209: "reversed layer range",
  MIL210: "adapter enables no experts",
  MIL211: "size above milora's limits",
  MIL212: "layer list longer than any base",
  MIL213: "base key its family does not have",
  MIL214: "rope_scaling option missing or out of range",
  MIL215: "options block on a base key that takes none",
  MIL216: "DoRA on some of an adapter's experts and not on others",
  MIL217: "DoRA under a per_module or per_ffn router",
  MIL218: "per_module rank that does not split evenly into num_experts",
  MIL219: "per_ffn router with no MLP module enabled",
  MIL301: "spec file missing or unreadable",
  MIL302: "import cycle",
  MIL303: "`from` config missing or unreadable",
  MIL304: "`from` config is not a JSON object",
  MIL305: "`from` config has an unsupported model_type",
  MIL306: "`from` config lacks a key or has one of the wrong type",
  MIL307: "`from` config uses an unsupported option",
  MIL308: "`from` config has a size above milora's limits",
  MIL401: "top_k larger than the experts enabled in a layer",
  MIL402: "top_k not a positive integer",
  MIL403: "threshold outside (0, 1)",
  MIL404: "selection rule with a missing or unexpected argument",
  MIL405: "balance coefficient negative",
  MIL406: "rational activation orders out of range, or an options block on another key",
  MIL407: "router key or selection of another placement, or num_experts out of range",
  MIL501: "top_k 1 renormalize gives the router no gradient",
  MIL502: "balance coefficient above 1",
  MIL503: "experts line overridden entirely by later lines",
  MIL504: "`at layers` names layers the adapter does not use",
} as const;

export type CheckCode = keyof typeof CHECK_CODES;

export function severityOf(code: CheckCode): Severity {
  return code.startsWith("MIL5") ? "warning" : "error";
}
