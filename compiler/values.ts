// Reading typed values out of `key value` properties, reporting a value of the wrong type or count.
import type { NumberLiteral, Property, Span, Value } from "../grammar/ast.ts";
import type { Reporter } from "./reporter.ts";
import { didYouMean } from "./suggest.ts";

/** A value as the user wrote it, for messages. */
export function describeValue(value: Value): string {
  switch (value.kind) {
    case "Number":
      return value.text;
    case "String":
      return JSON.stringify(value.value);
    case "Boolean":
      return String(value.value);
    case "Ident":
      return value.name;
    case "Range":
      return `${value.from.text}..${value.to.text}`;
  }
}

/** Spans from the first value to the last, or the key when there are none. */
function valuesSpan(prop: Property): Span {
  const first = prop.values[0];
  const last = prop.values[prop.values.length - 1];
  return first && last ? { file: first.span.file, start: first.span.start, end: last.span.end } : prop.key.span;
}

function single(prop: Property, expected: string, r: Reporter): Value | undefined {
  const [value] = prop.values;
  if (value === undefined || prop.values.length > 1) {
    r.report(
      "MIL201",
      valuesSpan(prop),
      `\`${prop.key.name}\` takes one value (${expected}), got ${prop.values.length}`,
    );
    return undefined;
  }
  return value;
}

export function numberValue(prop: Property, r: Reporter): NumberLiteral | undefined {
  const value = single(prop, "a number", r);
  if (value === undefined || value.kind === "Number") return value;
  r.report("MIL201", value.span, `\`${prop.key.name}\` expects a number, got \`${describeValue(value)}\``);
  return undefined;
}

export function booleanValue(prop: Property, r: Reporter): boolean | undefined {
  const value = single(prop, "true or false", r);
  if (value === undefined) return undefined;
  if (value.kind === "Boolean") return value.value;
  r.report("MIL201", value.span, `\`${prop.key.name}\` expects true or false, got \`${describeValue(value)}\``);
  return undefined;
}

/** One of a fixed set of words; an unknown word gets a "did you mean". */
export function choiceValue<C extends string>(prop: Property, choices: readonly C[], r: Reporter): C | undefined {
  const value = single(prop, choices.join(" | "), r);
  if (value === undefined) return undefined;
  if (value.kind !== "Ident") {
    r.report(
      "MIL201",
      value.span,
      `\`${prop.key.name}\` expects one of ${choices.join(" | ")}, got \`${describeValue(value)}\``,
    );
    return undefined;
  }
  if ((choices as readonly string[]).includes(value.name)) return value.name as C;
  r.report("MIL104", value.span, `unknown ${prop.key.name} \`${value.name}\``, didYouMean(value.name, choices));
  return undefined;
}

/**
 * The properties of one block with unknown keys and repeated keys reported; of a repeated key the first
 * is kept. `unknownHint` may explain a key before the generic "did you mean".
 */
export function knownProperties(
  props: readonly Property[],
  keys: readonly string[],
  what: string,
  r: Reporter,
  unknownHint?: (key: string) => string | undefined,
): Property[] {
  const seen = new Map<string, Property>();
  for (const prop of props) {
    const key = prop.key.name;
    if (!keys.includes(key)) {
      r.report("MIL103", prop.key.span, `unknown ${what} key \`${key}\``, unknownHint?.(key) ?? didYouMean(key, keys));
      continue;
    }
    const first = seen.get(key);
    if (first !== undefined) {
      r.report(
        "MIL105",
        prop.key.span,
        `\`${key}\` is already set in this block (line ${first.key.span.start.line})`,
        "remove one of them",
      );
      continue;
    }
    seen.set(key, prop);
  }
  return [...seen.values()];
}
