// Layer lists: `all`, or numbers and inclusive ranges such as `0..3, 8, 10..12`, checked against the base.
import type { NumberLiteral, Value } from "../grammar/ast.ts";
import { MAX_LAYER_LIST_ITEMS } from "./limits.ts";
import type { BaseModel } from "./model.ts";
import type { Reporter } from "./reporter.ts";
import { describeValue } from "./values.ts";

/** Every layer of a base, ascending. */
export function allLayers(base: BaseModel): number[] {
  return Array.from({ length: base.layers }, (_, i) => i);
}

/** The layers a list names, ascending and without repeats; undefined when any item has an error (reported). */
export function layerList(values: readonly Value[], base: BaseModel, r: Reporter): number[] | undefined {
  const [first] = values;
  if (values.length === 1 && first?.kind === "Ident" && first.name === "all") return allLayers(base);
  // checked first, so a list of 200,000 items costs one diagnostic, not one per item
  if (values.length > MAX_LAYER_LIST_ITEMS) {
    const extra = values[MAX_LAYER_LIST_ITEMS]!;
    const last = values[values.length - 1]!;
    r.report(
      "MIL212",
      { file: extra.span.file, start: extra.span.start, end: last.span.end },
      `a layer list has ${values.length} items; at most ${MAX_LAYER_LIST_ITEMS} are read, as many as the layers of milora's largest base`,
      "name layers once each, and use ranges such as 0..31",
    );
    return undefined;
  }
  const layers = new Set<number>();
  let ok = true;
  const inBase = (n: NumberLiteral): boolean => {
    if (!n.integer || n.value < 0) {
      r.report("MIL201", n.span, `a layer is a whole number from 0, got ${n.text}`);
      return false;
    }
    if (n.value >= base.layers) {
      r.report(
        "MIL208",
        n.span,
        `layer ${n.text} is outside base \`${base.name}\`, which has ${base.layers} layers (0..${base.layers - 1})`,
      );
      return false;
    }
    return true;
  };
  for (const value of values) {
    if (value.kind === "Number") {
      if (inBase(value)) layers.add(value.value);
      else ok = false;
    } else if (value.kind === "Range") {
      const ends = inBase(value.from) && inBase(value.to);
      if (ends && value.from.value > value.to.value) {
        r.report(
          "MIL209",
          value.span,
          `layer range ${describeValue(value)} is reversed`,
          `write ${value.to.text}..${value.from.text}`,
        );
      }
      if (!ends || value.from.value > value.to.value) ok = false;
      else for (let l = value.from.value; l <= value.to.value; l++) layers.add(l);
    } else {
      const hint = value.kind === "Ident" ? "use `all` alone, or numbers and ranges such as 0..3, 8" : undefined;
      r.report(
        "MIL201",
        value.span,
        `expected a layer number, a range a..b or \`all\`, got \`${describeValue(value)}\``,
        hint,
      );
      ok = false;
    }
  }
  return ok ? [...layers].sort((a, b) => a - b) : undefined;
}
